"""Where this process stands among the processes that share an influence computation.

The engine sums over the training data through `Distribution.reducer`; each process scores its own shard of
dataset indices; `gather_by_index` joins the shards. One process is the plain case: the reducer does nothing,
the shard is everything, and gathering sorts its input.

Several processes come from a Lightning DDP-style strategy (`Distribution.from_trainer`) or from a user's own
`torch.distributed` process group (`Distribution.from_process_group`); there is no other launcher. Every
collective here is called by every process in the same order, shards may be uneven or empty, and
`Distribution.stage` turns a failure on one process into an error on all of them.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_influence.model.data import loader_length
from lightning_influence.curvature.reducer import DistributedReducer, LocalReducer, Reducer
from lightning_influence.engine.scoring import gradients, up_score_blocks
from lightning_influence.solvers import InverseHvpResult, Solver
from lightning_influence.model.twice_differentiable import TwiceDifferentiable

#: What `from_trainer` accepts, for error messages.
SUPPORTED = (
    "single-device strategies (any accelerator, devices=1) and DDP-style strategies (strategy='ddp', "
    "'ddp_spawn', 'ddp_fork', 'ddp_notebook'; gloo on CPU, nccl on GPU; several nodes through num_nodes)"
)

#: The collective timeout when neither the caller nor the strategy names one (torch.distributed's default).
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
    Both are None with one process. Build several-process instances with `from_trainer` or
    `from_process_group` rather than by hand.
    """

    reducer: Reducer = field(default_factory=LocalReducer)
    rank: int = 0
    world_size: int = 1
    group: Any = None
    control_group: Any = None

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
        )

    @classmethod
    def from_trainer(cls, trainer: Any, *, timeout: datetime.timedelta | None = None) -> Distribution:
        """The distribution of a Lightning `Trainer`'s processes, once its strategy has set up (e.g. in a hook
        such as `on_fit_end`). Collective under DDP: every rank must call it.

        One process (single-device strategies, devices=1) takes the plain path and pays nothing. DDP-style
        strategies reduce over the strategy's process group. Strategies that shard the parameters (FSDP,
        DeepSpeed, model parallel) and others are refused with what is supported. `timeout` bounds every
        collective of the influence computation (default: the strategy's own timeout).
        """
        strategy = trainer.strategy
        refuse_unsupported_strategy(strategy)
        if trainer.world_size == 1:
            return cls()
        dist = torch.distributed
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                f"The trainer runs {trainer.world_size} processes but torch.distributed is not initialised yet; "
                "build the Distribution after the strategy has set up (in on_fit_end or later)."
            )
        # A group of our own carries the data collectives, so the timeout is known (and may differ from training's).
        return cls.from_process_group(timeout=timeout or getattr(strategy, "_timeout", None) or DEFAULT_TIMEOUT)

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
        return self._gather_rows(rows)[0]

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

    def _gather_rows(self, rows: Tensor) -> tuple[Tensor, list[int]]:
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

    # ------------------------------------------------------------------ solving

    def solve(self, solver: Solver, rhs: Tensor) -> InverseHvpResult:
        """(H + λI)⁻¹ for this process's rows of `rhs` [n_local, p] (n_local may be 0, and differ by process).

        A solver whose `solve` runs reduced Hessian products (cg, lissa) needs every process to solve the same
        block, so the rows of all processes are solved together and each keeps its own; other solvers (direct,
        arnoldi) solve each process's rows alone.
        """
        if not self.is_distributed or not solver.collective_solve:
            if rhs.shape[0] == 0:
                return InverseHvpResult(rhs.clone(), {})
            return solver.solve(rhs)
        rows, lengths = self._gather_rows(rhs)
        if rows.shape[0] == 0:
            return InverseHvpResult(rhs.clone(), {})
        result = solver.solve(rows)
        start = sum(lengths[: self.rank])
        return InverseHvpResult(result.x[start : start + rhs.shape[0]], result.info)

    def solve_shared(self, solver: Solver, rhs: Tensor) -> InverseHvpResult:
        """(H + λI)⁻¹ for every row of `rhs` [M, p], the same block on every process; the result on every process.

        Iterative solvers (whose reduced Hessian products need every process on the same vectors) solve the
        whole block on every process; the others (direct, arnoldi) solve a share of the rows each, then gather.
        """
        if not self.is_distributed or solver.collective_solve:
            return solver.solve(rhs)
        positions = self.shard(range(rhs.shape[0]))
        local = self.solve(solver, rhs[positions])
        rows, _ = self.gather_rows_by_index(local.x, torch.tensor(positions, dtype=torch.int64))
        return InverseHvpResult(rows, local.info)

    def influence_factors(self, solver: Solver, rhs: Tensor, indices: Tensor) -> tuple[InverseHvpResult, Tensor]:
        """Factors s = (H + λI)⁻¹ ∇ℓ(z_query) for all M queries, [M, p] sorted by query index, on every process,
        from this process's share of query gradients `rhs` [m_local, p] and their query `indices` [m_local].

        Each process computes the gradients of its share only (`shard` of the query indices); they are gathered
        and solved with `solve_shared`.
        """
        rows, indices = self.gather_rows_by_index(rhs, indices)
        return self.solve_shared(solver, rows), indices

    def scores(
        self, model: TwiceDifferentiable, training_data: Iterable[Any], factors: Tensor, *, progress: bool = False
    ) -> Tensor:
        """Up-weighting influence of this process's shard on every query, [M, n_local] in loader order; an empty
        shard gives [M, 0]. Local: no collective, so processes may finish at different times."""
        if loader_length(training_data) == 0:
            return factors.new_zeros(factors.shape[0], 0)
        with model.evaluating():
            return torch.cat(list(up_score_blocks(model, training_data, factors, progress=progress)), dim=1)

    def self_influences(
        self, model: TwiceDifferentiable, training_data: Iterable[Any], solver: Solver, *, progress: bool = False
    ) -> Tensor:
        """Self-influence ⟨(H + λI)⁻¹ ∇ℓ(zᵢ), ∇ℓ(zᵢ)⟩ of every example of this process's shard, [n_local], in
        loader order; the shard may be empty. With iterative solvers the processes go batch round by batch
        round, solving the union of their batches together, until every shard is exhausted."""
        with model.evaluating():
            blocks = _gradient_blocks(model, training_data, progress)
            if not self.is_distributed or not solver.collective_solve:
                values = [(self.solve(solver, block).x * block).sum(1) for block in blocks]
            else:
                values = []
                while True:
                    block = next(blocks, None)
                    more = self.reducer.sum(
                        torch.tensor(float(block is not None), dtype=torch.float64, device=model.device)
                    )
                    if float(more) == 0:
                        break
                    if block is None:
                        block = torch.zeros(0, model.num_params, dtype=model.dtype, device=model.device)
                    values.append((self.solve(solver, block).x * block).sum(1))
        if not values:
            return torch.zeros(0, dtype=model.dtype, device=model.device)
        return torch.cat(values)

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

    def barrier(self) -> None:
        """Wait for every process (nothing to wait for with one). It is an empty `stage`: a process that fails
        in a stage while the others wait here makes them raise instead of waiting for ever."""
        with self.stage("barrier"):
            pass


def _gradient_blocks(model: TwiceDifferentiable, data: Iterable[Any], progress: bool) -> Iterator[Tensor]:
    """Per-example gradient blocks of a possibly empty shard (a loader of length 0 yields nothing)."""
    if loader_length(data) == 0:
        return iter(())
    return (block for _, block in gradients(model, data, name="training_data", progress=progress))


def refuse_unsupported_strategy(strategy: Any) -> None:
    """Raise for strategies the influence computation cannot run under, naming what it supports."""
    from pytorch_lightning.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        ParallelStrategy,
    )

    name = type(strategy).__name__
    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
        raise NotImplementedError(
            f"Influence functions are not supported under {name}: it shards the model's parameters across "
            f"processes, while the influence computation needs every parameter on every process. Supported: "
            f"{SUPPORTED}. Compute influence from a checkpoint with one of those, or with the functional API."
        )
    if isinstance(strategy, ParallelStrategy) and not isinstance(strategy, DDPStrategy):
        raise NotImplementedError(f"Influence functions are not supported under {name}. Supported: {SUPPORTED}.")


def local_distribution() -> Distribution:
    """The single-process distribution."""
    return Distribution()


__all__ = ["DistributedStageError", "Distribution", "SUPPORTED", "local_distribution", "refuse_unsupported_strategy"]
