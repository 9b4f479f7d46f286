"""How the processes that share an influence computation talk to each other: shard, gather, reduce, fail together.

This module only communicates; what to compute, and which stages run in lockstep, is decided by the engine.
One process is the plain case: the reducer does nothing, the shard is everything, and gathering sorts its input.
Several processes come from a `torch.distributed` process group (`Distribution.from_process_group`; a Lightning
trainer's DDP processes go through `lightning_influence.lightning.strategy`). Every collective here is called
by every process in the same order, shards may be uneven or empty, and `Distribution.stage` turns a failure on
one process into an error on all of them. The groups a distribution creates are destroyed by `close()` (or at
the end of a `with` block).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_influence.curvature.reducer import DistributedReducer, LocalReducer, Reducer

#: The collective timeout when the caller names none (torch.distributed's and Lightning's default).
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


class DistributedStageError(RuntimeError):
    """A stage of the influence computation failed on at least one process; raised on every process.

    `stage` names the stage, `failed_ranks` the processes where it failed and `messages` their errors
    (rank → "Type: message"), so every process's log says what went wrong where.
    """

    def __init__(self, stage: str, failed_ranks: list[int], messages: dict[int, str]) -> None:
        details = "; ".join(f"rank {rank}: {messages.get(rank, 'unknown error')}" for rank in failed_ranks)
        super().__init__(f"The influence stage {stage!r} failed on rank(s) {failed_ranks}: {details}")
        self.stage = stage
        self.failed_ranks = failed_ranks
        self.messages = messages


@dataclass
class Distribution:
    """This process's rank among `world_size` processes, and how sums over the training data are reduced.

    `group` carries the data collectives (the reducer's all-reduce and the gathers) and `control_group` (gloo,
    CPU) the per-stage failure flags, kept apart so a flag never meets a data collective of another process.
    Both are None with one process. Build several-process instances with `from_process_group` (or, under a
    Lightning trainer, `lightning_influence.lightning.strategy.distribution_for`) rather than by hand.
    """

    reducer: Reducer = field(default_factory=LocalReducer)
    rank: int = 0
    world_size: int = 1
    group: Any = None
    control_group: Any = None
    #: The process groups this distribution created, destroyed by `close`.
    owned_groups: tuple[Any, ...] = ()

    def __enter__(self) -> Distribution:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Destroy the process groups this distribution created (collective, like their creation); idempotent."""
        groups, self.owned_groups = self.owned_groups, ()
        if groups and torch.distributed.is_initialized():
            for group in groups:
                torch.distributed.destroy_process_group(group)

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_process_group(
        cls, group: Any = None, *, timeout: datetime.timedelta | None = None
    ) -> Distribution:
        """The distribution over an initialised `torch.distributed` process group (default: the whole world).

        Collective: every process of the default group must call it (it creates the control group, and a data
        group with `timeout` when one is given; otherwise `group` itself carries the data, with its own timeout).
        A one-process group gives the plain local distribution.
        """
        dist = torch.distributed
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "Distribution.from_process_group needs an initialised torch.distributed process group; call "
                "torch.distributed.init_process_group first, or use Distribution() for one process."
            )
        world_size = dist.get_world_size(group)
        if world_size == 1:
            return cls()
        ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
        control_timeout = 2 * (timeout or DEFAULT_TIMEOUT)
        data_group = group
        if timeout is not None:
            data_group = dist.new_group(ranks=ranks, timeout=timeout, backend=dist.get_backend(group))
        # The control group waits twice as long as the data group, so a process that failed outside a collective
        # is still waiting on its flag when the others' data collective times out and they come to compare flags.
        control_group = dist.new_group(ranks=ranks, timeout=control_timeout, backend="gloo")
        return cls(
            reducer=DistributedReducer(data_group),
            rank=dist.get_rank(group),
            world_size=world_size,
            group=data_group,
            control_group=control_group,
            owned_groups=(control_group,) if data_group is group else (data_group, control_group),
        )

    # ------------------------------------------------------------------ sharding and gathering

    def shard(self, indices: Sequence[int]) -> list[int]:
        """This process's share of `indices`: every world_size-th one from position `rank`, none repeated.

        Shards differ in size by at most one and are empty when there are fewer indices than processes; unlike
        `DistributedSampler`, nothing is repeated to even them out.
        """
        return list(indices)[self.rank :: self.world_size]

    def all_gather_rows(self, rows: Tensor) -> Tensor:
        """Every process's rows [n_rank, ...] joined in rank order, [Σ n_rank, ...], on every process.

        Shards may differ in length (and be empty); trailing shapes must agree, which is checked on all ranks.
        """
        return self.gather_rows_with_lengths(rows)[0]

    def gather_rows_by_index(self, rows: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Join per-process rows [n_local, ...] with their dataset indices [n_local] into [N, ...] and [N],
        sorted by dataset index, on every process; an index held by two processes is refused."""
        if indices.ndim != 1 or indices.shape[0] != rows.shape[0]:
            raise ValueError(
                f"indices must be one dataset index per row, shape [{rows.shape[0]}], got {tuple(indices.shape)}."
            )
        indices = indices.to(device=rows.device, dtype=torch.int64)
        if self.is_distributed:
            rows = self.all_gather_rows(rows)
            indices = self.all_gather_rows(indices)
        indices, order = indices.sort()
        repeated = indices[1:] == indices[:-1]
        if bool(repeated.any()):
            duplicates = indices[1:][repeated].unique()[:5].tolist()
            raise ValueError(
                f"Dataset indices {duplicates} were scored more than once across processes; shard the data with "
                "Distribution.shard (a DistributedSampler pads shards by repeating examples)."
            )
        return rows[order], indices

    def gather_by_index(self, values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Join per-process values [..., n_local] (last dim: examples) and their dataset indices [n_local]
        into [..., N] and [N], sorted by dataset index, on every process."""
        rows, indices = self.gather_rows_by_index(values.movedim(-1, 0), indices)
        return rows.movedim(0, -1), indices

    def gather_rows_with_lengths(self, rows: Tensor) -> tuple[Tensor, list[int]]:
        """`all_gather_rows` and the number of rows each process sent."""
        if not self.is_distributed:
            return rows, [rows.shape[0]]
        dist = torch.distributed
        # Shape first: [rows, ndim, trailing dims padded with -1], so uneven and mismatched shards are known.
        trailing = list(rows.shape[1:])
        if len(trailing) > 7:
            raise ValueError(f"Can gather tensors of at most 8 dimensions, got {rows.ndim}.")
        meta = torch.tensor([rows.shape[0], rows.ndim, *trailing] + [-1] * (7 - len(trailing)), device=rows.device)
        metas = [torch.empty_like(meta) for _ in range(self.world_size)]
        dist.all_gather(metas, meta, group=self.group)
        shapes = {tuple(m[1:].tolist()) for m in metas}
        if len(shapes) != 1:
            raise ValueError(
                f"Processes hold rows of different shapes ([ndim, *trailing dims] per rank: "
                f"{[m[1:].tolist() for m in metas]}); every process must compute the same queries and parameters."
            )
        lengths = [int(m[0]) for m in metas]
        longest = max(lengths)
        if longest == 0:
            return rows, lengths
        padded = rows.new_zeros((longest, *trailing))
        padded[: rows.shape[0]] = rows
        buckets = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(buckets, padded, group=self.group)
        return torch.cat([bucket[:length] for bucket, length in zip(buckets, lengths)]), lengths

    # ------------------------------------------------------------------ coordination

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Run one stage of the computation; if it raises on any process, raise `DistributedStageError` on every
        process when the stage ends (the failing process chains its own error).

        Failures outside collectives surface as soon as the other processes finish the stage; a process left
        waiting inside a collective by a failed peer is released by the collective timeout, then reports here.
        """
        if not self.is_distributed:
            yield
            return
        error: BaseException | None = None
        try:
            yield
        except Exception as caught:  # noqa: BLE001 - re-raised below, on every rank
            error = caught
        flags = torch.zeros(self.world_size, dtype=torch.int64)
        flags[self.rank] = int(error is not None)
        torch.distributed.all_reduce(flags, group=self.control_group)
        failed = flags.nonzero().squeeze(1).tolist()
        if not failed:
            return
        message = f"{type(error).__name__} in stage {name!r}: {error}" if error is not None else None
        messages: list[str | None] = [None] * self.world_size
        torch.distributed.all_gather_object(messages, message, group=self.control_group)
        stage_error = DistributedStageError(name, failed, {rank: str(messages[rank]) for rank in failed})
        if error is not None:
            raise stage_error from error
        raise stage_error

    def any_process(self, condition: bool) -> bool:
        """Whether `condition` holds on at least one process (collective; so every process takes one branch)."""
        if not self.is_distributed:
            return condition
        count = self.reducer.sum(torch.tensor(float(condition), dtype=torch.float64, device=self._device()))
        return float(count) > 0

    def gather_objects(self, value: Any) -> list[Any]:
        """Every process's small picklable `value` (records, messages), in rank order, on every process
        (collective; over the control group, so it never meets a data collective)."""
        if not self.is_distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, value, group=self.control_group)
        return gathered

    def _device(self) -> torch.device:
        """Where the data group's tensors live: the current CUDA device under NCCL, else the CPU."""
        backend = torch.distributed.get_backend(self.group)
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        """Wait for every process (nothing to wait for with one). It is an empty `stage`: a process that fails
        in a stage while the others wait here makes them raise instead of waiting for ever."""
        with self.stage("barrier"):
            pass


__all__ = ["DEFAULT_TIMEOUT", "DistributedStageError", "Distribution"]
