"""Storing a run as it goes, and resuming it: the chunk loop over the engine's stages, and the run's identity.

Training data is read in a fixed order by dataset index (a sequential loader over a `Subset` of this process's
shard), never in a training loader's shuffled order. Everything computed is stored in `save_dir` as soon as it
exists — the factors, then the scores chunk by chunk — so a rerun with the same arguments resumes from the
finished chunks and ends bit-identical to an uninterrupted run. The folder looks like::

    save_dir/
      partial/                 while running: manifest.json (the run's identity), factors, per-rank chunks
      gradients/               with store_gradients: the GradientStore of the training gradients
      result/                  when done: the InfluenceResult folder (metadata.json written last)

A run is identified by its `InfluenceArguments` (all but `self_influence`, which a finished run can add, and
`on_unconverged`), the loss, the model's weights and parameters, the data and the queries; a folder written for
another run is refused with the differences named. Every stage's convergence goes into the metadata
(``stages``: the factors' solve, and each chunk's record, with every self-influence solve in it), checked with
`lightning_influence.engine.trust`; a run that fails those checks is saved marked untrustworthy (``trustworthy``,
``warnings``) or refused, as `on_unconverged` says. No non-finite chunk is stored. No mathematics lives here:
the engine does it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_influence.engine.arguments import InfluenceArguments
from lightning_influence.engine.distribution import Distribution
from lightning_influence.engine.engine import InfluenceEngine
from lightning_influence.engine.trust import (
    chunked_warnings,
    merge_records,
    record_warnings,
    solve_record,
    stage_summary,
)
from lightning_influence.enums import InfluenceType
from lightning_influence.errors import ConvergenceError, NonFiniteError, warn_user
from lightning_influence.model.data import IndexedData, progress_bar, sample_positions
from lightning_influence.model.twice_differentiable import TwiceDifferentiable, check_finite
from lightning_influence.solvers.krylov import SINGULAR_HINT
from lightning_influence.storage.files import (
    atomic_save_array,
    atomic_write_json,
    check_writable_folder,
    TREE_FILE,
    load_array,
    load_tree,
    read_json,
    save_tree,
    tensor_digest,
    to_jsonable,
)
from lightning_influence.storage.chunks import (
    ChunkFolder, check_same_run, index_digest, parameter_digest, projection_metadata,
)
from lightning_influence.storage.gradient_store import GradientStore
from lightning_influence.storage.result import FORMAT_VERSION, METADATA_FILE, InfluenceResult

#: Called after each stored chunk with (stage, chunk number, number of chunks); a hook for progress or tests.
ChunkHook = Callable[[str, int, int], None]

__all__ = ["ChunkHook", "compute_influence", "run_identity"]

#: Metadata fields that, with the digests under "fingerprint", decide whether two runs are the same run.
_IDENTITY_FIELDS = ("method", "method_kwargs", "hessian_regularization", "curvature", "block_diagonal",
                    "influence_type", "batch_size", "chunk_batches", "max_memory", "parameter_names", "dtype",
                    "num_train", "num_queries", "chunk_size", "world_size", "loss", "curvature_samples",
                    "curvature_seed", "query_rank", "projection")


def versions() -> dict[str, str]:
    """Versions of the packages the numbers depend on, for the metadata."""
    found = {"torch": torch.__version__}
    for key, package in (("pytorch_lightning", "pytorch-lightning"), ("lightning_influence", "lightning-influence")):
        try:
            found[key] = package_metadata.version(package)
        except package_metadata.PackageNotFoundError:
            found[key] = "unknown"
    return found


def run_identity(metadata: dict[str, Any]) -> dict[str, Any]:
    """What makes a run the same run, read from its metadata: the identity fields and the digests."""
    return {**{key: metadata.get(key) for key in _IDENTITY_FIELDS}, **metadata.get("fingerprint", {})}


class _PartialRun(ChunkFolder):
    """The `partial/` folder: a chunk folder of per-rank score chunks, with the factors (and, for a gradient
    store, the fitted solver's state) beside the manifest."""

    def __init__(self, folder: Path, distribution: Distribution, identity: dict[str, Any]) -> None:
        super().__init__(folder, distribution, identity, {"format_version": FORMAT_VERSION})

    def load_factors(self) -> tuple[Tensor, dict[str, Any]] | None:
        info_file = self.folder / "factors_info.json"
        if not info_file.is_file():  # written after the factors, so its presence means both are complete
            return None
        return load_array(self.folder / "factors.npy", mmap=False), read_json(info_file)

    def save_factors(self, factors: Tensor, info: dict[str, Any]) -> None:
        if self.distribution.is_global_zero:
            atomic_save_array(self.folder / "factors.npy", factors)
            atomic_write_json(self.folder / "factors_info.json", info)

    def load_solver_state(self) -> dict[str, Any] | None:
        folder = self.folder / "solver"
        return load_tree(folder) if (folder / TREE_FILE).is_file() else None

    def save_solver_state(self, state: dict[str, Any]) -> None:
        if self.distribution.is_global_zero:
            save_tree(self.folder / "solver", state)


class _Stage(NamedTuple):
    """A chunked stage: its name, the axis of its blocks along which examples lie, and how a chunk is computed."""

    name: str
    axis: int
    compute: Callable[[Iterable[Any]], Tensor]


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[f"{name}_seconds"] = time.perf_counter() - start


def compute_influence(
    model: TwiceDifferentiable,
    training_data: IndexedData,
    query_data: IndexedData,
    arguments: InfluenceArguments,
    *,
    save_dir: str | Path,
    train_indices: Sequence[int] | None = None,
    query_indices: Sequence[int] | None = None,
    progress: bool = False,
    distribution: Distribution | None = None,
    on_chunk: ChunkHook | None = None,
) -> InfluenceResult:
    """Influence of the training examples at `train_indices` on the queries at `query_indices`, stored in
    `save_dir/result` (and resumed from `save_dir/partial` after an interruption).

    Every process of `distribution` calls this with the same arguments; each scores its shard of the training
    indices, and only global rank zero writes shared files. Chunks hold `arguments.chunk_size` training
    examples, fewer where the memory budget cannot hold their [M, chunk] scores (and perturbations). A stage
    that did not converge or broke the bounds of `lightning_influence.engine.trust` makes the result
    untrustworthy: `arguments.on_unconverged` raises `ConvergenceError` as soon as that is known (before
    anything is saved as a result), warns, or ignores it; the result says so either way. `dry_run` checks
    these inputs in seconds beforehand.
    """
    distribution = distribution if distribution is not None else Distribution()
    train_indices, query_indices = _checked_inputs(training_data, query_data, arguments, train_indices, query_indices)
    folder = Path(save_dir)
    with distribution.stage("checking save_dir"):
        if distribution.is_global_zero:
            check_writable_folder(folder)

    started, timings = time.perf_counter(), {}
    shard = distribution.shard(train_indices)
    drawn = sample_positions(len(train_indices), arguments.curvature_samples, arguments.curvature_seed)
    curvature_shard = distribution.shard([train_indices[position] for position in drawn])
    engine = InfluenceEngine(model, training_data.loader(curvature_shard, arguments.batch_size), arguments,
                             distribution=distribution, progress=progress)
    with _timed(timings, "query_gradients"), distribution.stage("query gradients"):
        rhs = engine.query_gradients(query_data, query_indices)
    metadata = _run_metadata(model, arguments, training_data, train_indices, query_indices, rhs,
                             distribution.world_size)
    result_dir = folder / "result"
    if (result_dir / METADATA_FILE).is_file():
        existing = InfluenceResult.load(result_dir)
        check_same_run(run_identity(existing.metadata), run_identity(metadata), result_dir)
        if not arguments.self_influence or existing.self_influence is not None:
            _warn_untrustworthy(distribution, existing, arguments, result_dir)
            if _add_gradient_store(engine, existing, lambda: engine.fit().state_dict(), training_data,
                                   train_indices, folder):
                _save(distribution, existing, result_dir)
            return existing
    run = _PartialRun(folder / "partial", distribution, run_identity(metadata))
    with _timed(timings, "factors"):
        factors, info, resumed = _factors(engine, run, rhs)
    solver_state = _solver_state(engine, run) if arguments.store_gradients else None
    stages: dict[str, Any] = {"factors": solve_record(rhs, factors, info, arguments.curvature)}
    warnings = _agreed_warnings(distribution, record_warnings("influence factors", stages["factors"]), arguments)
    local, records, redone = _chunked_stages(engine, run, factors, shard, len(train_indices), metadata["chunk_size"],
                                             training_data, (query_data, query_indices), on_chunk, timings)
    for name, chunk_records in records.items():
        stages[name] = stage_summary(chunk_records)
        warnings += _agreed_warnings(distribution, chunked_warnings(name.replace("_", "-"), chunk_records), arguments)
    result = _gathered(distribution, local, shard, factors, query_indices)
    timings["total_seconds"] = time.perf_counter() - started
    convergence = {k: v for k, v in info.items() if k not in ("method", "options", "regularization", "choices")}
    result.metadata = to_jsonable({**metadata, "self_influence": arguments.self_influence,
                                   "num_curvature_examples": len(drawn), "choices": info.get("choices"),
                                   "convergence": convergence, "stages": stages, "trustworthy": not warnings,
                                   "warnings": warnings, "timings": timings, "resumed": resumed or redone})
    _add_gradient_store(engine, result, lambda: solver_state, training_data, train_indices, folder)
    _save(distribution, result, result_dir, run.folder)
    _warn_untrustworthy(distribution, result, arguments, result_dir)
    return result


def _checked_inputs(training_data: IndexedData, query_data: IndexedData, arguments: InfluenceArguments,
                    train_indices: Sequence[int] | None, query_indices: Sequence[int] | None
                    ) -> tuple[list[int], list[int]]:
    """The training and query indices of a run, its inputs checked."""
    for name, value in (("training_data", training_data), ("query_data", query_data)):
        if not isinstance(value, IndexedData):
            raise TypeError(f"{name} must be an IndexedData over a map-style dataset, got {type(value).__name__}.")
    if not isinstance(arguments, InfluenceArguments):
        raise TypeError(f"arguments must be an InfluenceArguments, got {type(arguments).__name__}.")
    return training_data.check_indices(train_indices, "train_indices"), query_data.check_indices(query_indices,
                                                                                                 "query_indices")


def _save(distribution: Distribution, result: InfluenceResult, result_dir: Path, partial: Path | None = None) -> None:
    """Save `result` in `result_dir` (by global rank zero), then remove the run's `partial` folder."""
    with distribution.stage("saving the result"):
        if distribution.is_global_zero:
            result.save(result_dir)
            if partial is not None:
                shutil.rmtree(partial, ignore_errors=True)
    result.folder = result_dir


#: The gradient store's folder in save_dir, beside result/.
STORE_FOLDER = "gradients"


def _add_gradient_store(engine: InfluenceEngine, result: InfluenceResult, solver_state: Callable[[], dict[str, Any]],
                        training_data: IndexedData, train_indices: Sequence[int], folder: Path) -> bool:
    """With `store_gradients`, build (or resume, or reuse) the gradient store in `folder/gradients`, one more
    streamed pass over the training gradients, and record it and the fitted solver's state (`solver_state()`,
    when `result` has none) in `result`; whether `result` changed. Collective."""
    arguments, model = engine.arguments, engine.model
    if not arguments.store_gradients:
        return False
    started = time.perf_counter()
    chunk_size = arguments.chunk_size
    budget = arguments.max_memory if arguments.max_memory is not None else model.max_memory
    if budget is not None:  # a chunk's gradients [chunk, d] are held at once before they are written
        chunk_size = max(1, min(chunk_size, budget // (model.gradient_dim * model.dtype.itemsize)))
    with _named("the gradient store"):
        store = GradientStore.build(model, training_data, folder / STORE_FOLDER, dtype=arguments.store_dtype,
                                    chunk_size=chunk_size, batch_size=arguments.batch_size,
                                    train_indices=train_indices, distribution=engine.distribution,
                                    progress=engine.progress)
    place = {"path": f"../{STORE_FOLDER}", "dtype": store.dtype, "shape": [store.num_train, store.dim]}
    changed = result.solver_state is None or result.metadata.get("gradient_store") != place
    if result.solver_state is None:
        result.solver_state = solver_state()
    if changed:
        result.metadata["gradient_store"] = place
        result.metadata.setdefault("timings", {})["gradient_store_seconds"] = time.perf_counter() - started
    return changed


def _solver_state(engine: InfluenceEngine, run: _PartialRun) -> dict[str, Any]:
    """The fitted solver's state: stored in the partial folder by an earlier attempt, or taken from the engine's
    solver (fitted for the factors, or now) and stored there."""
    stored = run.load_solver_state()
    if stored is not None:
        return stored
    state = engine.fit().state_dict()
    run.save_solver_state(state)
    return state


def _chunked_stages(engine: InfluenceEngine, run: _PartialRun, factors: Tensor, shard: Sequence[int], num_train: int,
                    chunk_size: int, training_data: IndexedData, queries: tuple[IndexedData, Sequence[int]],
                    on_chunk: ChunkHook | None, timings: dict[str, float]
                    ) -> tuple[dict[str, Tensor], dict[str, list[dict[str, Any]]], bool]:
    """Every chunked stage on this process's shard: its values in shard order, every process's chunk records
    (the same on all), and whether stored chunks were reused."""
    distribution = engine.distribution
    chunks = [list(shard[start : start + chunk_size]) for start in range(0, len(shard), chunk_size)]
    largest_shard = -(-num_train // distribution.world_size)  # rank zero's
    num_positions = -(-largest_shard // chunk_size)  # chunk positions every process steps through in lockstep
    local: dict[str, Tensor] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    resumed = False
    for stage in _stages(engine, engine.arguments, factors):
        with _timed(timings, stage.name):
            local[stage.name], redone, mine = _run_stage(engine, run, stage, chunks, num_positions, training_data,
                                                         on_chunk)
        records[stage.name] = [record for part in distribution.gather_objects(mine) for record in part]
        resumed = resumed or redone
        if not chunks:  # an empty shard (fewer training examples than processes)
            local[stage.name] = _empty_stage(stage.name, factors, *queries)
    return local, records, resumed


#: How a refused run ends, with on_unconverged="raise".
_NOTHING_SAVED = ("Nothing was saved as a result; the finished stages stay in save_dir/partial, so a rerun with "
                  "on_unconverged='warn' resumes them and saves the result marked untrustworthy.")


def _agreed_warnings(distribution: Distribution, warnings: list[str], arguments: InfluenceArguments,
                     refusal: str = _NOTHING_SAVED) -> list[str]:
    """Every process's warnings, in order and without repeats (the same list on all); with
    on_unconverged='raise', a ConvergenceError (ending with `refusal`) on every process when there are any."""
    agreed = list(dict.fromkeys(w for part in distribution.gather_objects(warnings) for w in part))
    if agreed and arguments.on_unconverged == "raise":
        raise ConvergenceError(
            f"The influence result is not trustworthy (on_unconverged='raise'): {' '.join(agreed)} {refusal}", agreed
        )
    return agreed


def _warn_untrustworthy(distribution: Distribution, result: InfluenceResult, arguments: InfluenceArguments,
                        where: Path) -> None:
    """With on_unconverged='warn', one warning (from global rank zero) that a saved result is untrustworthy;
    'raise' refuses a reused untrustworthy result."""
    if result.trustworthy or arguments.on_unconverged == "ignore":
        return
    _agreed_warnings(distribution, result.warnings, arguments,
                     f"The result saved in {str(where)!r} stays there, marked so; on_unconverged='warn' returns it.")
    if distribution.is_global_zero:
        warn_user(
            f"The influence result in {str(where)!r} is not trustworthy: {' '.join(result.warnings)} It is "
            "saved marked so (result.trustworthy is False, result.warnings says why; the report says it above every "
            "table); on_unconverged='raise' refuses such results.",
            RuntimeWarning,
        )


def _chunk_size(model: TwiceDifferentiable, arguments: InfluenceArguments, training_data: IndexedData,
                train_indices: Sequence[int], num_queries: int) -> int:
    """Training examples per stored chunk: `arguments.chunk_size`, fewer where the memory budget (the run's, or
    else the model's) cannot hold a chunk's [M, chunk] scores and perturbations."""
    budget = arguments.max_memory if arguments.max_memory is not None else model.max_memory
    if budget is None:
        return arguments.chunk_size
    values_per_example = num_queries
    if arguments.influence_type is InfluenceType.perturbation:
        example_inputs = training_data.examples(train_indices[:1])[0]
        if isinstance(example_inputs, Tensor):
            values_per_example *= 1 + example_inputs[0].numel()
    return max(1, min(arguments.chunk_size, budget // (values_per_example * model.dtype.itemsize)))


def _run_metadata(model: TwiceDifferentiable, arguments: InfluenceArguments, training_data: IndexedData,
                  train_indices: Sequence[int], query_indices: Sequence[int], rhs: Tensor, world_size: int
                  ) -> dict[str, Any]:
    """The metadata known before any solve: the arguments, the sizes and the digests that identify the run."""
    return to_jsonable({
        **arguments.to_dict(),
        "num_train": len(train_indices), "num_queries": len(query_indices), "num_params": model.num_params,
        "gradient_dim": model.gradient_dim, "projection": projection_metadata(model), "loss": model.loss_name,
        "parameter_names": model.param_names, "dtype": str(model.dtype), "world_size": world_size,
        "chunk_size": _chunk_size(model, arguments, training_data, train_indices, len(query_indices)),
        "versions": versions(),
        "fingerprint": {
            "parameters": parameter_digest(model), "format_version": FORMAT_VERSION,
            "train_indices": index_digest(train_indices), "query_indices": index_digest(query_indices),
            "query_gradients": tensor_digest([("rhs", rhs)]),
        },
    })


def _factors(engine: InfluenceEngine, run: _PartialRun, rhs: Tensor) -> tuple[Tensor, dict[str, Any], bool]:
    """The influence factors and the solver's info: stored ones when a previous attempt got that far (then
    `resumed` is True), otherwise solved now and stored."""
    stored = run.load_factors()
    if stored is not None:
        factors, info = stored
        return factors.to(device=engine.model.device, dtype=engine.model.dtype), info, True
    with engine.distribution.stage("influence factors"), _named("the influence factors"):
        solution = engine.factors(rhs)
        factors, info = solution.x.contiguous(), to_jsonable(solution.info)
        run.save_factors(factors, info)
    return factors, info, False


def _stages(engine: InfluenceEngine, arguments: InfluenceArguments, factors: Tensor) -> list[_Stage]:
    """The chunked stages this run computes, in order."""
    stages = [_Stage("scores", 1, lambda data: engine.scores(data, factors))]
    if arguments.influence_type is InfluenceType.perturbation:
        stages.append(_Stage("perturbation", 1, lambda data: engine.perturbations(data, factors)))
    if arguments.self_influence:
        stages.append(_Stage("self_influence", 0, engine.self_influences))
    return stages


def _run_stage(engine: InfluenceEngine, run: _PartialRun, stage: _Stage, chunks: list[list[int]], num_positions: int,
               training_data: IndexedData, on_chunk: ChunkHook | None
               ) -> tuple[Tensor | None, bool, list[dict[str, Any]]]:
    """Compute and store every chunk of `stage` not already stored; this process's values of the stage joined
    in shard order (None for an empty shard), whether stored chunks were reused, and each chunk's record (what
    its solves reported, `trust.merge_records`, and its largest magnitude). A non-finite chunk is refused."""
    distribution, batch = engine.distribution, engine.arguments.batch_size
    todo = [c for c in range(len(chunks)) if not run.done(stage.name, c)]
    if stage.name == "self_influence":
        engine.prepare_self_influence(bool(todo))
    label = stage.name.replace("_", "-")
    with distribution.stage(label), _named(f"the {label}"):
        for chunk in progress_bar(engine.chunk_rounds(stage.name, todo, num_positions), engine.progress,
                                  f"Influence: {label}", total=len(todo)):
            block = stage.compute(training_data.loader(chunks[chunk] if chunk is not None else [], batch))
            solves = engine.take_solve_records()
            if chunk is not None:
                check_finite(block, f"the {label} of chunk {chunk}")
                largest = float(torch.maximum(block.max(), -block.min())) if block.numel() else 0.0
                record = merge_records(solves, chunk=chunk, rank=distribution.rank, max_abs=largest)
                run.save_chunk(stage.name, chunk, block, record)
                if on_chunk is not None:
                    on_chunk(stage.name, chunk, len(chunks))
        joined = run.load_stage(stage.name, len(chunks), stage.axis) if chunks else None
    return joined, len(todo) < len(chunks), [run.load_record(stage.name, c) for c in range(len(chunks))]


@contextmanager
def _named(step: str) -> Iterator[None]:
    """Name the step of the run (e.g. "the influence factors") in a NonFiniteError raised inside, and raise
    torch's LinAlgError (a factorisation of a singular or non-finite matrix) as one, never raw."""
    try:
        yield
    except NonFiniteError as error:
        raise error.during(step) from error
    except torch.linalg.LinAlgError as error:
        raise NonFiniteError(f"a linear-algebra routine ({error})", hint=SINGULAR_HINT).during(step) from error


def _gathered(distribution: Distribution, local: dict[str, Tensor], shard: Sequence[int], factors: Tensor,
              query_indices: Sequence[int]) -> InfluenceResult:
    """Every process's stages joined by dataset index into one result (on every process)."""
    positions = torch.tensor(list(shard), dtype=torch.long)
    scores, train_order = distribution.gather_by_index(local["scores"], positions)
    self_values = perturbation = None
    if "self_influence" in local:
        self_values = distribution.gather_by_index(local["self_influence"], positions)[0].cpu()
    if "perturbation" in local:
        moved = distribution.gather_by_index(local["perturbation"].movedim(1, -1), positions)[0]
        perturbation = moved.movedim(-1, 1).cpu()
    return InfluenceResult(
        scores=scores.cpu(), query_indices=torch.tensor(list(query_indices), dtype=torch.long),
        train_indices=train_order.cpu(), factors=factors.detach().cpu(), self_influence=self_values,
        perturbation=perturbation,
    )


def _empty_stage(stage: str, factors: Tensor, query_data: IndexedData, query_indices: Sequence[int]) -> Tensor:
    """What a stage gives for a process without training examples: no columns, the right trailing shape."""
    if stage == "self_influence":
        return factors.new_zeros(0)
    if stage == "perturbation":
        inputs, _ = query_data.examples(query_indices[:1])
        return factors.new_zeros(factors.shape[0], 0, *inputs.shape[1:])
    return factors.new_zeros(factors.shape[0], 0)
