"""The one path from data to an `InfluenceResult`: query gradients → factors → scores → self-influence.

Training data is read in a fixed order by dataset index (a sequential loader over a `Subset` of this process's
shard), never in a training loader's shuffled order. Everything computed is stored in `save_dir` as soon as it
exists — the factors, then the scores chunk by chunk — so a rerun with the same arguments resumes from the
finished chunks and ends bit-identical to an uninterrupted run. The folder looks like::

    save_dir/
      partial/                 while running: manifest.json (the run's fingerprint), factors, per-rank chunks
      result/                  when done: the InfluenceResult folder (metadata.json written last)

A folder written for other weights, method, λ, data or queries is refused with the differences named.
No mathematics lives here: the engine (`fit_solver`, `scoring`) does it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, default_collate

from lightning_influence.curvature.operator import Curvature, check_curvature
from lightning_influence.model.data import progress_bar, split_batch
from lightning_influence.engine.distribution import Distribution, local_distribution
from lightning_influence.enums import InfluenceType, InversionMethod
from lightning_influence.engine.functional import fit_solver
from lightning_influence.storage.result import FORMAT_VERSION, METADATA_FILE, InfluenceResult, parameter_digest
from lightning_influence.engine.scoring import perturbation_score_blocks, stacked_gradients
from lightning_influence.solvers import Solver, make_solver
from lightning_influence.checks import check_regularization, positive_int
from lightning_influence.storage.files import (
    atomic_save_array,
    atomic_write_json,
    check_writable_folder,
    load_array,
    read_json,
    tensor_digest,
    to_jsonable,
)
from lightning_influence.model.twice_differentiable import TwiceDifferentiable

BatchTransform = Callable[[Any], Any]
#: Called after each stored chunk with (stage, chunk number, number of chunks); a hook for progress or tests.
ChunkHook = Callable[[str, int, int], None]

__all__ = ["IndexedData", "ResultMismatchError", "compute_influence"]


class ResultMismatchError(ValueError):
    """A save dir holds results of another run (other weights, method, λ, data or queries)."""


class _TransformedLoader:
    """A loader whose batches pass through the user's `batch_transform`; iterable many times, with a length."""

    def __init__(self, loader: DataLoader, transform: BatchTransform, name: str) -> None:
        self.loader, self.transform, self.name = loader, transform, name

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield _apply_transform(self.transform, batch, self.name)


def _apply_transform(transform: BatchTransform, batch: Any, name: str) -> Any:
    try:
        return transform(batch)
    except Exception as error:
        raise ValueError(
            f"batch_transform failed on a batch of {name} ({type(error).__name__}: {error}); it must map a "
            "collated batch to (inputs, targets)."
        ) from error


class IndexedData:
    """A map-style dataset read by dataset index in a fixed order, batched with its own collate function.

    Args:
        data: a map-style `Dataset`, or a `DataLoader` whose dataset and collate function are used (its
            sampler and shuffling are ignored, so indices stay those of the dataset).
        batch_transform: maps a collated batch to `(inputs, targets)` when tuples/lists/dicts do not suffice.
        name: how errors refer to this data.
    """

    def __init__(self, data: Dataset | DataLoader, *, batch_transform: BatchTransform | None = None,
                 name: str = "data") -> None:
        collate: Callable[[list[Any]], Any] = default_collate
        dataset: Any = data
        if isinstance(data, DataLoader):
            dataset = data.dataset
            if data.batch_sampler is not None:  # automatic batching: its collate_fn makes batches from items
                collate = data.collate_fn
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                f"{name} is an IterableDataset; influence ties every score to a dataset index, so it needs a "
                "map-style Dataset (with __getitem__ and __len__). Materialise the data as such a Dataset."
            )
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"{name} must be a map-style torch Dataset or a DataLoader over one, got {type(data).__name__}."
            )
        if len(dataset) == 0:
            raise ValueError(f"{name} is empty; pass a dataset with at least one example.")
        if batch_transform is not None and not callable(batch_transform):
            raise TypeError(f"batch_transform must be callable as batch_transform(batch), got {batch_transform!r}.")
        self.dataset = dataset
        self.collate_fn = collate
        self.batch_transform = batch_transform
        self.name = name

    def __len__(self) -> int:
        return len(self.dataset)

    def check_indices(self, indices: Sequence[int] | None, what: str) -> list[int]:
        """All indices (None) or the given ones, checked to be distinct integers within the dataset."""
        if indices is None:
            return list(range(len(self)))
        values = indices.tolist() if isinstance(indices, Tensor) else list(indices)
        if not values:
            raise ValueError(f"{what} is empty; pass at least one dataset index.")
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(self)]
        if bad:
            raise ValueError(f"{what} must be integers in [0, {len(self)}) for {self.name}, got {bad[:5]}.")
        if len(set(values)) != len(values):
            raise ValueError(f"{what} repeats dataset indices; each example may appear once.")
        return values

    def loader(self, indices: Sequence[int], batch_size: int) -> Iterable[Any]:
        """Batches of the examples at `indices`, in that order."""
        loader = DataLoader(Subset(self.dataset, list(indices)), batch_size=batch_size, shuffle=False,
                            collate_fn=self.collate_fn)
        return loader if self.batch_transform is None else _TransformedLoader(loader, self.batch_transform, self.name)

    def examples(self, indices: Sequence[int]) -> tuple[Any, Tensor]:
        """`(inputs, targets)` of the examples at `indices`, collated as one batch (for reports)."""
        batch = self.collate_fn([self.dataset[int(i)] for i in indices])
        if self.batch_transform is not None:
            batch = _apply_transform(self.batch_transform, batch, self.name)
        return split_batch(batch)


def versions() -> dict[str, str]:
    """Versions of the packages the numbers depend on, for the metadata."""
    found = {"torch": torch.__version__}
    for key, package in (("pytorch_lightning", "pytorch-lightning"), ("lightning_influence", "lightning-influence")):
        try:
            found[key] = package_metadata.version(package)
        except package_metadata.PackageNotFoundError:
            found[key] = "unknown"
    return found


_LABELS = {
    "parameters": "model weights (parameter hash)",
    "query_gradients": "query data (hash of query gradients)",
    "train_indices": "training indices",
    "query_indices": "query indices",
}


def check_same_run(saved: dict[str, Any] | None, current: dict[str, Any], where: Path) -> None:
    """Raise `ResultMismatchError` naming every field where a stored run differs from this one."""
    saved = saved or {}
    differences = []
    for key, value in current.items():
        if saved.get(key) != value:
            label = _LABELS.get(key, key)
            old, new = saved.get(key, "missing"), value
            if isinstance(old, str) and isinstance(new, str) and len(new) == 64:
                old, new = old[:12], new[:12]
            differences.append(f"{label}: stored {old!r}, now {new!r}")
    if differences:
        raise ResultMismatchError(
            f"{str(where)!r} holds influence results of a different run, which cannot be resumed or reused "
            f"({'; '.join(differences)}). Pass another save_dir, or delete that folder to start over."
        )


class _PartialRun:
    """The `partial/` folder: a manifest with the run's fingerprint, the factors, and per-rank score chunks.

    A chunk counts as finished only once its file is in place (atomic rename) and listed in the rank's
    progress file, so a crash at any point loses at most the chunk being written.
    """

    def __init__(self, folder: Path, distribution: Distribution, fingerprint: dict[str, Any]) -> None:
        self.folder = folder
        self.distribution = distribution
        manifest = folder / "manifest.json"
        if distribution.is_global_zero and not manifest.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(manifest, {"format_version": FORMAT_VERSION, "fingerprint": fingerprint})
        distribution.barrier()
        stored = read_json(manifest)
        check_same_run(stored.get("fingerprint"), fingerprint, folder)
        self.rank_dir = folder / f"rank{distribution.rank}-of-{distribution.world_size}"
        self.rank_dir.mkdir(parents=True, exist_ok=True)
        self.progress_file = self.rank_dir / "progress.json"
        finished = read_json(self.progress_file)["finished"] if self.progress_file.is_file() else []
        self.finished = {(stage, int(chunk)) for stage, chunk in finished}

    def load_factors(self) -> tuple[Tensor, dict[str, Any]] | None:
        info_file = self.folder / "factors_info.json"
        if not info_file.is_file():  # written after the factors, so its presence means both are complete
            return None
        return load_array(self.folder / "factors.npy", mmap=False), read_json(info_file)

    def save_factors(self, factors: Tensor, info: dict[str, Any]) -> None:
        if self.distribution.is_global_zero:
            atomic_save_array(self.folder / "factors.npy", factors)
            atomic_write_json(self.folder / "factors_info.json", info)

    def _chunk_file(self, stage: str, chunk: int) -> Path:
        return self.rank_dir / f"{stage}-{chunk:06d}.npy"

    def done(self, stage: str, chunk: int) -> bool:
        return (stage, chunk) in self.finished and self._chunk_file(stage, chunk).is_file()

    def save_chunk(self, stage: str, chunk: int, block: Tensor) -> None:
        atomic_save_array(self._chunk_file(stage, chunk), block)
        self.finished.add((stage, chunk))
        atomic_write_json(self.progress_file, {"finished": sorted(self.finished)})

    def load_stage(self, stage: str, num_chunks: int, axis: int) -> Tensor:
        blocks = [load_array(self._chunk_file(stage, chunk), mmap=False) for chunk in range(num_chunks)]
        return torch.cat(blocks, dim=axis)


def _fingerprint(model: TwiceDifferentiable, **fields: Any) -> dict[str, Any]:
    return to_jsonable({"parameters": parameter_digest(model), "parameter_names": model.param_names,
                        "dtype": str(model.dtype), "format_version": FORMAT_VERSION, **fields})


def compute_influence(
    model: TwiceDifferentiable,
    training_data: IndexedData,
    query_data: IndexedData,
    *,
    save_dir: str | Path,
    train_indices: Sequence[int] | None = None,
    query_indices: Sequence[int] | None = None,
    method: str | InversionMethod = "cg",
    method_kwargs: dict[str, Any] | None = None,
    hessian_regularization: float = 0.0,
    curvature: Curvature = "hessian",
    block_diagonal: bool = False,
    influence_type: str | InfluenceType = "up",
    self_influence: bool = False,
    batch_size: int = 64,
    chunk_batches: int = 8,
    progress: bool = False,
    distribution: Distribution | None = None,
    on_chunk: ChunkHook | None = None,
) -> InfluenceResult:
    """Influence of the training examples at `train_indices` on the queries at `query_indices`, stored in
    `save_dir/result` (and resumed from `save_dir/partial` after an interruption).

    Every process of `distribution` calls this with the same arguments; each scores its shard of the training
    indices, sums over the training data go through `distribution.reducer`, and only global rank zero writes
    shared files. Chunks hold `batch_size * chunk_batches` training examples, fewer where the model's
    `max_memory` cannot hold their [M, chunk] scores (and perturbations); the final [M, N] result, the factors
    [M, p] and the solver's own state are outside that budget.
    """
    distribution = distribution if distribution is not None else local_distribution()
    if not isinstance(model, TwiceDifferentiable):
        raise TypeError(f"model must be a TwiceDifferentiable, got {type(model).__name__}.")
    for name, value in (("training_data", training_data), ("query_data", query_data)):
        if not isinstance(value, IndexedData):
            raise TypeError(f"{name} must be an IndexedData over a map-style dataset, got {type(value).__name__}.")
    method = InversionMethod.parse(method)
    kind = InfluenceType.parse(influence_type)
    kwargs = dict(method_kwargs or {})
    configured = make_solver(method, **kwargs)  # validates the options before any work
    options = configured.options
    regularization = check_regularization(hessian_regularization)
    check_curvature(curvature, block_diagonal)
    batch_size = positive_int("batch_size", batch_size)
    chunk_size = batch_size * positive_int("chunk_batches", chunk_batches)
    train_indices = training_data.check_indices(train_indices, "train_indices")
    query_indices = query_data.check_indices(query_indices, "query_indices")
    if model.max_memory is not None:  # a chunk's scores (and perturbations) must fit in the budget
        values_per_example = len(query_indices)
        if kind is InfluenceType.perturbation:
            example_inputs = training_data.examples(train_indices[:1])[0]
            if isinstance(example_inputs, Tensor):
                values_per_example *= 1 + example_inputs[0].numel()
        chunk_size = max(1, min(chunk_size, model.max_memory // (values_per_example * model.dtype.itemsize)))
    folder = Path(save_dir)
    with distribution.stage("checking save_dir"):
        if distribution.is_global_zero:
            check_writable_folder(folder)

    timings: dict[str, float] = {}
    started = time.perf_counter()
    shard = distribution.shard(train_indices)
    with model.evaluating():
        clock = time.perf_counter()
        with distribution.stage("query gradients"):  # each process takes a share of the queries
            rhs = _query_gradients(model, query_data, query_indices, batch_size, distribution)
        timings["query_gradients_seconds"] = time.perf_counter() - clock
        fingerprint = _fingerprint(
            model, method=method.value, options=options, hessian_regularization=regularization,
            curvature=curvature, block_diagonal=block_diagonal,
            influence_type=kind.value, num_train=len(train_indices), train_indices=_index_digest(train_indices),
            num_queries=len(query_indices), query_indices=_index_digest(query_indices),
            query_gradients=tensor_digest([("rhs", rhs)]), batch_size=batch_size, chunk_size=chunk_size,
            world_size=distribution.world_size,
        )
        result_dir = folder / "result"
        if (result_dir / METADATA_FILE).is_file():
            existing = InfluenceResult.load(result_dir)
            check_same_run(existing.metadata.get("fingerprint"), fingerprint, result_dir)
            if bool(self_influence) <= (existing.self_influence is not None):
                return existing
        run = _PartialRun(folder / "partial", distribution, fingerprint)

        solver: Solver | None = None

        def fitted() -> Solver:
            nonlocal solver
            if solver is None:
                clock = time.perf_counter()
                solver = fit_solver(model, training_data.loader(shard, batch_size), method,
                                    hessian_regularization=regularization, curvature=curvature,
                                    block_diagonal=block_diagonal, progress=progress,
                                    reducer=distribution.reducer, **kwargs)
                timings["fit_seconds"] = time.perf_counter() - clock
            return solver

        stored = run.load_factors()
        resumed = stored is not None
        if stored is None:
            with distribution.stage("influence factors"):
                solution = distribution.solve_shared(fitted(), rhs)
                factors, info = solution.x.contiguous(), to_jsonable(solution.info)
                run.save_factors(factors, info)
        else:
            factors, info = stored
            factors = factors.to(device=model.device, dtype=model.dtype)

        stages: list[tuple[str, int, Callable[[Iterable[Any]], Tensor]]] = [
            ("scores", 1, lambda data: distribution.scores(model, data, factors)),
        ]
        if kind is InfluenceType.perturbation:
            stages.append(
                ("perturbation", 1, lambda data: torch.cat(list(perturbation_score_blocks(model, data, factors)), 1))
            )
        if self_influence:
            stages.append(("self_influence", 0, lambda data: distribution.self_influences(model, data, fitted())))
        chunks = [shard[start : start + chunk_size] for start in range(0, len(shard), chunk_size)]
        if self_influence and distribution.is_distributed:
            # Fitting is collective: every process fits if any still has self-influence chunks to compute.
            missing = sum(not run.done("self_influence", c) for c in range(len(chunks)))
            if float(distribution.reducer.sum(torch.tensor(float(missing), dtype=torch.float64,
                                                           device=model.device))) > 0:
                fitted()
        # Iterative solvers solve self-influence blocks together, so processes take chunk positions in lockstep
        # (a process with fewer or finished chunks joins with an empty one); the largest shard is rank zero's.
        lockstep = distribution.is_distributed and configured.collective_solve
        num_positions = -(-(-(-len(train_indices) // distribution.world_size)) // chunk_size)
        local: dict[str, Tensor] = {}
        for stage, axis, score in stages:
            clock = time.perf_counter()
            todo = [c for c in range(len(chunks)) if not run.done(stage, c)]
            resumed = resumed or len(todo) < len(chunks)
            collective = lockstep and stage == "self_influence"
            pending = set(todo)
            with distribution.stage(stage.replace("_", "-")):
                for chunk in progress_bar(range(num_positions) if collective else todo, progress,
                                          f"Influence: {stage.replace('_', '-')}"):
                    mine = chunk in pending
                    if collective and float(distribution.reducer.sum(
                            torch.tensor(float(mine), dtype=torch.float64, device=model.device))) == 0:
                        continue  # no process has this chunk position left
                    block = score(training_data.loader(chunks[chunk] if mine else [], batch_size))
                    if mine:
                        run.save_chunk(stage, chunk, block)
                        if on_chunk is not None:
                            on_chunk(stage, chunk, len(chunks))
                if chunks:
                    local[stage] = run.load_stage(stage, len(chunks), axis)
                else:  # an empty shard (fewer training examples than processes)
                    local[stage] = _empty_stage(stage, model, factors, query_data, query_indices)
            timings[f"{stage}_seconds"] = time.perf_counter() - clock

    positions = torch.tensor(shard, dtype=torch.long)
    scores, train_order = distribution.gather_by_index(local["scores"], positions)
    self_values = None
    if "self_influence" in local:
        self_values, _ = distribution.gather_by_index(local["self_influence"], positions)
    perturbation = None
    if "perturbation" in local:
        moved, _ = distribution.gather_by_index(local["perturbation"].movedim(1, -1), positions)
        perturbation = moved.movedim(-1, 1)
    timings["total_seconds"] = time.perf_counter() - started

    convergence = {k: v for k, v in info.items() if k not in ("method", "options", "regularization")}
    metadata = to_jsonable({
        "method": method.value, "options": options, "method_kwargs": kwargs,
        "hessian_regularization": regularization, "curvature": curvature, "block_diagonal": block_diagonal,
        "influence_type": kind.value,
        "num_train": len(train_indices), "num_queries": len(query_indices), "num_params": model.num_params,
        "parameter_names": model.param_names, "dtype": str(model.dtype), "self_influence": bool(self_influence),
        "batch_size": batch_size, "chunk_size": chunk_size, "max_memory": model.max_memory,
        "world_size": distribution.world_size, "convergence": convergence, "timings": timings, "versions": versions(), "resumed": resumed,
        "fingerprint": fingerprint,
    })
    result = InfluenceResult(
        scores=scores.cpu(), query_indices=torch.tensor(query_indices, dtype=torch.long),
        train_indices=train_order.cpu(), factors=factors.detach().cpu(),
        self_influence=None if self_values is None else self_values.cpu(), metadata=metadata,
        perturbation=None if perturbation is None else perturbation.cpu(),
    )
    with distribution.stage("saving the result"):  # written once, by global rank zero
        if distribution.is_global_zero:
            result.save(result_dir)
            shutil.rmtree(run.folder, ignore_errors=True)
    return result


def _query_gradients(model: TwiceDifferentiable, query_data: IndexedData, query_indices: Sequence[int],
                     batch_size: int, distribution: Distribution) -> Tensor:
    """Gradients of all queries [M, p] in `query_indices` order on every process; each process computes the
    share `distribution.shard` gives it (all of them with one process)."""
    positions = distribution.shard(range(len(query_indices)))
    if positions:
        mine = [query_indices[i] for i in positions]
        rhs = stacked_gradients(model, query_data.loader(mine, batch_size), name="query_data")
    else:
        rhs = torch.zeros(0, model.num_params, dtype=model.dtype, device=model.device)
    if not distribution.is_distributed:
        return rhs
    return distribution.gather_rows_by_index(rhs, torch.tensor(positions, dtype=torch.long))[0]


def _empty_stage(stage: str, model: TwiceDifferentiable, factors: Tensor, query_data: IndexedData,
                 query_indices: Sequence[int]) -> Tensor:
    """What a stage gives for a process without training examples: no columns, the right trailing shape."""
    if stage == "self_influence":
        return torch.zeros(0, dtype=model.dtype, device=model.device)
    if stage == "perturbation":
        inputs, _ = query_data.examples(query_indices[:1])
        return factors.new_zeros(factors.shape[0], 0, *inputs.shape[1:])
    return factors.new_zeros(factors.shape[0], 0)


def _index_digest(indices: Sequence[int]) -> str:
    return tensor_digest([("indices", torch.tensor(list(indices), dtype=torch.long))])
