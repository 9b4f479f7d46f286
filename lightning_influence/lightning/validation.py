"""`validate`: how good are influence scores on the user's own model? Retrain through `pl.Trainer` and compare.

For K random subsets of the training examples (fraction α), a fresh LightningModule is trained on each through
a real `pl.Trainer` with the user's settings, and the query outputs of the retrained models are compared with
the scores: the linear datamodeling score (LDS, `storage/validation.py`), optionally leave-one-out for the
most helpful and harmful examples of a few queries, and the two-seed noise ceiling. Several score matrices are
compared on the same retrainings, which cost nothing more.

Every finished retraining is stored at once in ``save_dir`` (atomically, one JSON file each), so an interrupted
validation continues where it stopped and a rerun with the same settings gives the same numbers::

    save_dir/
      manifest.json          what the retrainings depend on; a folder of other retrainings is refused
      retrain/<key>.json     one per finished retraining: seed, dataset indices trained on, query losses, margins
      validation.json        the report;  scatter.png  predicted against actual
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import pickle
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset

from lightning_influence.checks import flag, positive_int
from lightning_influence.errors import warn_user
from lightning_influence.model.data import IndexedData, progress_bar, split_batch, to_model
from lightning_influence.reports.images import png
from lightning_influence.storage.files import (
    atomic_write_bytes,
    atomic_write_json,
    check_writable_folder,
    read_json,
    tensor_digest,
    to_jsonable,
)
from lightning_influence.storage.result import METADATA_FILE, InfluenceResult
from lightning_influence.storage.chunks import check_same_run
from lightning_influence.storage.validation import (
    LEAVE_ONE_OUT_STREAM,
    TRAINING_STREAM,
    ceiling_per_query,
    derived_seed,
    lds_per_query,
    mean_defined,
    pearson,
    sign_agreement,
    subset_positions,
    subset_size,
    subset_sums,
)

ScoresLike = Union[InfluenceResult, Tensor, str, os.PathLike]
ModuleFactory = Callable[[], pl.LightningModule]
Output = Literal["loss", "margin"]
#: Called after each stored retraining with its record (key, seed, indices, loss, margin, seconds).
RetrainHook = Callable[[dict[str, Any]], None]

TAG = "validation"
#: Trainer settings of every retraining unless the user's `trainer_kwargs` say otherwise: one device, and nothing
#: written or shown (no logger, checkpoints, progress bar or model summary), K times over.
QUIET_TRAINER: dict[str, Any] = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                                 "enable_model_summary": False, "devices": 1}
_FORMAT_VERSION = 1


# -- options ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ValidationSettings:
    """The options that decide what is retrained and measured, checked when they are given.

    Attributes:
        num_subsets: K random subsets, each retrained (≥ 2; dattri and TRAK use ≥ 50 for published figures).
        fraction: α in (0, 1), the share of the training examples each subset keeps.
        seed: decides the subsets and every retraining's seed.
        output: what a retrained model is judged by, per query: ``"loss"`` (LDS against −loss) or ``"margin"``
            (the correct logit minus the log-sum-exp of the others, for classifiers). Under cross-entropy both
            increase with the probability of the correct class, so their (rank) LDS agree; other losses differ.
        ceiling: retrain every subset with a second seed to measure the noise ceiling (doubles the cost).
        leave_one_out: retrain without each of the top-k helpful and top-k harmful examples of the first
            `leave_one_out_queries` queries (0: off).
        leave_one_out_queries: how many queries (the first ones) leave-one-out examines.
        num_workers: parallel worker processes (spawned, one thread each); 0 retrains in this process.
    """

    num_subsets: int = 20
    fraction: float = 0.5
    seed: int = 0
    output: Output = "loss"
    ceiling: bool = True
    leave_one_out: int = 0
    leave_one_out_queries: int = 3
    num_workers: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.num_subsets, bool) or not isinstance(self.num_subsets, int) or self.num_subsets < 2:
            raise ValueError(f"num_subsets must be an integer ≥ 2 (a rank correlation needs at least two "
                             f"retrainings; ≥ 20 for a usable LDS), got {self.num_subsets!r}.")
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not 0 < self.fraction < 1:
            raise ValueError(f"fraction must be a number strictly between 0 and 1 (the share of training examples "
                             f"each subset keeps; 0.5 as in TRAK and dattri), got {self.fraction!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer ≥ 0, got {self.seed!r}.")
        if self.output not in ("loss", "margin"):
            raise ValueError(f"output must be 'loss' or 'margin', got {self.output!r}.")
        flag("ceiling", self.ceiling)
        for name in ("leave_one_out", "num_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer ≥ 0, got {value!r}.")
        positive_int("leave_one_out_queries", self.leave_one_out_queries)

    @property
    def replicates(self) -> int:
        return 2 if self.ceiling else 1


# -- what is retrained --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Retraining:
    """One retraining: its `key` (file name), the training `seed`, and the dataset `indices` it trains on."""

    key: str
    seed: int
    indices: tuple[int, ...]


class Reinitialised:
    """A module factory from a module: deep copies of it, re-initialised by every submodule's
    `reset_parameters()` under the retraining's seed (so each seed starts from its own random weights)."""

    def __init__(self, module: pl.LightningModule) -> None:
        if not isinstance(module, pl.LightningModule):
            raise TypeError(f"module must be a LightningModule or a function that builds one, got "
                            f"{type(module).__name__}.")
        stuck = [name or type(module).__name__ for name, sub in module.named_modules()
                 if any(True for _ in sub.parameters(recurse=False))
                 and not callable(getattr(sub, "reset_parameters", None))]
        if stuck:
            raise TypeError(
                f"Cannot re-initialise {type(module).__name__}: {stuck} hold parameters but have no "
                "reset_parameters(). Pass a function that builds a fresh module instead, e.g. module=MyModule or "
                "functools.partial(MyModule, hidden=32)."
            )
        self.module = copy.deepcopy(module)  # LightningModule.__getstate__ leaves the trainer behind

    def __call__(self) -> pl.LightningModule:
        module = copy.deepcopy(self.module)
        for sub in module.modules():
            if callable(getattr(sub, "reset_parameters", None)):
                sub.reset_parameters()
        return module


def fresh_module(factory: ModuleFactory) -> pl.LightningModule:
    """`factory()`, refused unless it is a LightningModule."""
    module = factory()
    if not isinstance(module, pl.LightningModule):
        raise TypeError(
            f"The module factory returned a {type(module).__name__}, not a LightningModule; pass a function that "
            "builds a fresh LightningModule (e.g. the class itself, or functools.partial(MyModule, hidden=32))."
        )
    return module


@contextmanager
def isolated_randomness() -> Iterator[None]:
    """Leave the caller's random streams (python, numpy, torch) and Lightning's seed variables as they were."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    environment = {key: os.environ.get(key) for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    try:
        with torch.random.fork_rng(devices=None if torch.cuda.is_initialized() else []):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        for key, value in environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _silence_lightning() -> None:
    """No device banners or data-loader hints, K times over: Lightning's info logs and PossibleUserWarnings."""
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=PossibleUserWarning)


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """`_silence_lightning` for the block, then the caller's logging level and warning filters again. Entered once
    around all retrainings (each entry of `catch_warnings` would show once-only warnings again)."""
    logger = logging.getLogger("pytorch_lightning")
    level = logger.level
    try:
        with warnings.catch_warnings():
            _silence_lightning()
            yield
    finally:
        logger.setLevel(level)


def margins(outputs: Tensor, targets: Tensor) -> np.ndarray:
    """Per-example classification margin (TRAK's f = log p/(1 − p)): the correct class's logit minus the
    log-sum-exp of the others, or ±logit for one logit with 0/1 targets; NaN for outputs that are not logits."""
    outputs, targets = outputs.detach().double(), targets.detach()
    if outputs.ndim == 2 and outputs.shape[1] >= 2 and targets.ndim == 1 and not targets.is_floating_point():
        correct = outputs.gather(1, targets[:, None]).squeeze(1)
        others = outputs.scatter(1, targets[:, None], float("-inf")).logsumexp(1)
        return (correct - others).cpu().numpy()
    logits = outputs.reshape(len(targets), -1)
    if logits.shape[1] == 1 and bool(((targets == 0) | (targets == 1)).all()):
        return ((2 * targets.double().reshape(-1) - 1) * logits[:, 0]).cpu().numpy()
    return np.full(len(targets), np.nan)


def query_outputs(module: torch.nn.Module, queries: IndexedData, indices: Sequence[int],
                  loss_fn: Callable[..., Tensor], batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-query loss and margin of a trained module (eval mode, no gradients), each [M]."""
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.get_default_dtype()
    losses: list[float] = []
    margin_parts = []
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for batch in queries.loader(indices, batch_size):
                inputs, targets = split_batch(batch)
                inputs, targets = to_model(inputs, device, dtype), to_model(targets, device, dtype)
                outputs = module(inputs)
                losses += [float(loss_fn(outputs[i : i + 1], targets[i : i + 1])) for i in range(len(targets))]
                margin_parts.append(margins(outputs, targets))
    finally:
        module.train(was_training)
    return np.asarray(losses, dtype=np.float64), np.concatenate(margin_parts)


def module_loss(module: torch.nn.Module, loss_fn: Callable[..., Tensor] | None) -> Callable[..., Tensor]:
    """`loss_fn`, or the module's own `loss_fn` / `criterion` attribute."""
    if loss_fn is not None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {loss_fn!r}.")
        return loss_fn
    for name in ("loss_fn", "criterion"):
        found = getattr(module, name, None)
        if callable(found):
            return found
    raise AttributeError(f"{type(module).__name__} has no callable `loss_fn` or `criterion` attribute; pass "
                         "loss_fn=... returning the batch mean loss (e.g. torch.nn.functional.cross_entropy).")


@dataclass
class Retrainer:
    """Everything a retraining needs (sent once to each worker process): how to build the module, the data and
    its loader settings, the Trainer's keyword arguments, and the queries to judge the retrained model on."""

    factory: ModuleFactory
    dataset: Dataset
    collate_fn: Callable[[list[Any]], Any]
    batch_size: int
    shuffle: bool
    trainer_kwargs: dict[str, Any]
    queries: IndexedData
    query_indices: list[int]
    loss_fn: Callable[..., Tensor] | None

    def build(self, seed: int) -> pl.LightningModule:
        """A fresh module under `seed` (the seed decides its initial weights and everything after)."""
        pl.seed_everything(seed, verbose=False)
        return fresh_module(self.factory)

    def judge(self, module: pl.LightningModule) -> tuple[np.ndarray, np.ndarray]:
        return query_outputs(module, self.queries, self.query_indices, module_loss(module, self.loss_fn))

    def __call__(self, job: Retraining) -> dict[str, Any]:
        """Train a fresh module on `job.indices` with `job.seed` through `pl.Trainer`; its record."""
        started = time.perf_counter()
        with isolated_randomness():
            module = self.build(job.seed)
            loader = DataLoader(Subset(self.dataset, list(job.indices)), batch_size=self.batch_size,
                                shuffle=self.shuffle, collate_fn=self.collate_fn,
                                generator=torch.Generator().manual_seed(job.seed))
            pl.Trainer(**self.trainer_kwargs).fit(module, loader)
            loss, margin = self.judge(module)
        if not np.isfinite(loss).all():
            raise FloatingPointError(
                f"Retraining {job.key} (seed {job.seed}) ended with non-finite query losses: the training diverged. "
                "Check the module's learning rate or pass steadier trainer_kwargs (e.g. gradient_clip_val)."
            )
        return {"key": job.key, "seed": job.seed, "indices": list(job.indices), "loss": loss.tolist(),
                "margin": None if np.isnan(margin).any() else margin.tolist(),
                "seconds": time.perf_counter() - started}


# -- retrainings, stored as they finish ---------------------------------------------------------------------
class RetrainingStore:
    """Finished retrainings by key: in memory, and in `folder/retrain/<key>.json` (atomic) when a folder is given.

    The folder's `manifest.json` holds the identity of the retrainings (data, queries, module, Trainer settings,
    subsets); a folder written for others is refused with the differences named.
    """

    def __init__(self, folder: Path | None, identity: dict[str, Any]) -> None:
        self.folder = folder
        self.records: dict[str, dict[str, Any]] = {}
        if folder is None:
            return
        check_writable_folder(folder)
        manifest = folder / "manifest.json"
        if manifest.is_file():
            check_same_run(read_json(manifest).get("identity"), identity, folder)
        else:
            atomic_write_json(manifest, {"format_version": _FORMAT_VERSION, "identity": identity})
        (folder / "retrain").mkdir(exist_ok=True)
        for path in sorted((folder / "retrain").glob("*.json")):
            record = read_json(path)
            self.records[record["key"]] = record

    def save(self, record: dict[str, Any]) -> None:
        if self.folder is not None:
            atomic_write_json(self.folder / "retrain" / f"{record['key']}.json", record)
        self.records[record["key"]] = record


_WORKER: Retrainer | None = None  # the retrainer of a worker process, set once by `_start_worker`


def _start_worker(retrainer: Retrainer) -> None:
    """Worker set-up: one intra-op thread (workers share the cores fairly), quiet Lightning, the retrainer."""
    global _WORKER
    torch.set_num_threads(1)
    _silence_lightning()  # for the worker's whole life
    _WORKER = retrainer


def _retrain_in_worker(job: Retraining) -> dict[str, Any]:
    assert _WORKER is not None, "the worker's initializer did not run"
    return _WORKER(job)


def run_retrainings(retrainer: Retrainer, jobs: Sequence[Retraining], store: RetrainingStore, num_workers: int,
                    on_retrain: RetrainHook | None = None, progress: bool = False) -> int:
    """Run every job not yet in `store`, storing each as it finishes; the number run now.

    With `num_workers` > 0 the jobs run in spawned processes (each single-threaded); the order they finish in
    does not matter, since every record is stored under its key and its seed depends on the key alone.
    """
    todo = [job for job in jobs if job.key not in store.records]
    if not todo:
        return 0

    def finished(record: dict[str, Any]) -> None:
        store.save(record)
        if on_retrain is not None:
            on_retrain(record)

    if num_workers == 0:
        with _quiet_lightning():
            for job in progress_bar(todo, progress, "Validation: retraining", total=len(todo)):
                finished(retrainer(job))
        return len(todo)
    context = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(num_workers, len(todo)), mp_context=context, initializer=_start_worker,
                             initargs=(retrainer,)) as pool:
        futures = [pool.submit(_retrain_in_worker, job) for job in todo]
        try:
            for future in progress_bar(as_completed(futures), progress, "Validation: retraining", total=len(todo)):
                finished(future.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return len(todo)


# -- the scores to judge ------------------------------------------------------------------------------------
@dataclass
class ScoreSet:
    """The score matrices to judge (name → [M, N] float64), the results they came from (with the folder to
    save each back to, if loaded from one), and the dataset indices of their columns and rows."""

    matrices: dict[str, np.ndarray]
    results: list[tuple[InfluenceResult, Path | None]] = field(default_factory=list)
    train_indices: list[int] | None = None
    query_indices: list[int] | None = None

    def agree(self, what: str, indices: Sequence[int], source: str) -> None:
        """Record the dataset indices `what` ('train_indices' or 'query_indices') that `source` names; all
        sources must name the same ones."""
        values = [int(i) for i in indices]
        known = getattr(self, what)
        if known is not None and known != values:
            raise ValueError(f"{source} names other {what} than the scores before it; every score matrix must "
                             "score the same training examples on the same queries.")
        setattr(self, what, values)


def _result_folder(path: Path) -> Path:
    """The folder holding a result's metadata.json: `path`, or its `result/` (a save_dir)."""
    return path / "result" if not (path / METADATA_FILE).is_file() and (path / "result").is_dir() else path


def load_scores(scores: ScoresLike | Mapping[str, ScoresLike]) -> ScoreSet:
    """The score matrices of `scores`: an `InfluenceResult`, a saved result's folder, a plain [M, N] tensor, or
    a dict name → any of those (compared on the same retrainings)."""
    items = list(scores.items()) if isinstance(scores, Mapping) else [(None, scores)]
    if not items:
        raise ValueError("scores is an empty dict; pass at least one score matrix.")
    found = ScoreSet({})
    for name, value in items:
        folder = None
        if isinstance(value, (str, os.PathLike)):
            folder = _result_folder(Path(value))
            value = InfluenceResult.load(folder, mmap=False)
        if isinstance(value, InfluenceResult):
            found.results.append((value, folder))
            found.agree("train_indices", value.train_indices.tolist(), f"scores {name or ''}".strip())
            found.agree("query_indices", value.query_indices.tolist(), f"scores {name or ''}".strip())
            name = name if name is not None else str(value.metadata.get("method", "scores"))
            value = value.scores
        if not isinstance(value, Tensor) or value.ndim != 2:
            raise TypeError(f"scores {name!r} must be an InfluenceResult, a saved result's folder or an [M, N] "
                            f"tensor, got {type(value).__name__} {tuple(getattr(value, 'shape', ()))}.")
        name = str(name if name is not None else "scores")
        matrix = value.detach().cpu().double().numpy()
        if not np.isfinite(matrix).all():
            raise ValueError(f"scores {name!r} hold NaN or Inf; validate finite scores.")
        shapes = {m.shape for m in found.matrices.values()}
        if shapes and matrix.shape not in shapes:
            raise ValueError(f"scores {name!r} have shape {matrix.shape}, the others {shapes.pop()}; every matrix "
                             "must score the same [M queries, N training examples].")
        found.matrices[name] = matrix
    return found


# -- what is measured ---------------------------------------------------------------------------------------
@dataclass
class ValidationReport:
    """What `validate` measured, every score oriented so that higher is better. `to_dict()` is what goes into
    the result's metadata (``metadata["validation"]``) and ``validation.json``.

    Attributes:
        output: what the retrained models were judged by: ``"loss"`` (the LDS correlates the summed scores with
            −loss, since positive I_up means helpful) or ``"margin"``.
        lds: per score matrix, the LDS averaged over queries (None where no query's output varied).
        lds_per_query: per score matrix, the LDS of each query [M] (None where undefined).
        ceiling: the two-seed noise ceiling averaged over queries: how well the outputs of one seed's retrainings
            rank those of another seed's on the same subsets (None with ``ceiling=False``).
        ceiling_per_query: [M], or None.
        leave_one_out: per score matrix, Pearson correlation and sign agreement of predicted (I_up / N) against
            actual change of the query loss when one training example is left out; None when not computed.
        leave_one_out_pairs: every (query, left-out example) examined, its actual change and each prediction.
        settings: the `ValidationSettings`, N, M, the subset size, and the Trainer settings of the retrainings.
        retrainings: how many retrainings the numbers rest on, how many ran now (the rest were stored), seconds.
    """

    output: str
    lds: dict[str, float | None]
    lds_per_query: dict[str, list[float | None]]
    ceiling: float | None
    ceiling_per_query: list[float | None] | None
    leave_one_out: dict[str, dict[str, float | None]] | None
    leave_one_out_pairs: list[dict[str, Any]]
    settings: dict[str, Any]
    retrainings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(asdict(self))

    def scalars(self) -> dict[str, float]:
        """The numbers worth plotting, by logger tag."""
        values: dict[str, float | None] = {f"{TAG}/lds/{name}": value for name, value in self.lds.items()}
        values[f"{TAG}/ceiling"] = self.ceiling
        for name, found in (self.leave_one_out or {}).items():
            values[f"{TAG}/loo_pearson/{name}"] = found["pearson"]
            values[f"{TAG}/loo_sign_agreement/{name}"] = found["sign_agreement"]
        return {tag: float(value) for tag, value in values.items() if value is not None}


def _number(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def _defined(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in np.atleast_1d(values)]


def target(loss: Sequence[float], margin: Sequence[float] | None, output: Output) -> np.ndarray:
    """The query outputs of one retrained model, oriented so that higher is better for the query."""
    if output == "loss":
        return -np.asarray(loss, dtype=np.float64)
    if margin is None or np.isnan(np.asarray(margin, dtype=np.float64)).any():
        raise ValueError("output='margin' needs class logits [B, C] with integer targets (or one logit with 0/1 "
                         "targets); this module's outputs have no margin. Use output='loss'.")
    return np.asarray(margin, dtype=np.float64)


@dataclass
class Plan:
    """The retrainings a validation rests on: the subsets (as positions, i.e. score columns) and the keys of
    their retrainings per seed, the (query, column) pairs leave-one-out examines, and every job."""

    subsets: list[np.ndarray]
    subset_keys: list[list[str]]
    pairs: list[tuple[int, int]]
    jobs: list[Retraining]


def _leave_one_out_pairs(matrix: np.ndarray, settings: ValidationSettings) -> list[tuple[int, int]]:
    """(query, column) of the top-k helpful and harmful training examples of the first queries."""
    k = min(settings.leave_one_out, matrix.shape[1])
    pairs: set[tuple[int, int]] = set()
    for query in range(min(settings.leave_one_out_queries, matrix.shape[0]) if k else 0):
        order = np.argsort(matrix[query], kind="stable")
        pairs.update((query, int(column)) for column in (*order[:k], *order[-k:]))
    return sorted(pairs)


def plan(settings: ValidationSettings, first: np.ndarray, train_indices: Sequence[int]) -> Plan:
    """Subsets k = 0..K−1, each retrained with `replicates` seeds; with leave-one-out, one retraining on all
    examples and one without each chosen example, all with one seed (so the difference is the example's)."""
    num_train, jobs = len(train_indices), []
    subsets = [subset_positions(num_train, settings.fraction, settings.seed, k) for k in range(settings.num_subsets)]
    keys = [[f"subset-{k:05d}-seed-{r}" for r in range(settings.replicates)] for k in range(settings.num_subsets)]
    for k, positions in enumerate(subsets):
        indices = tuple(int(train_indices[p]) for p in positions)
        jobs += [Retraining(key, derived_seed(settings.seed, TRAINING_STREAM, k, r), indices)
                 for r, key in enumerate(keys[k])]
    pairs = _leave_one_out_pairs(first, settings)
    if pairs:
        seed = derived_seed(settings.seed, LEAVE_ONE_OUT_STREAM)
        jobs.append(Retraining("loo-full", seed, tuple(int(i) for i in train_indices)))
        for column in sorted({column for _, column in pairs}):
            kept = tuple(int(i) for p, i in enumerate(train_indices) if p != column)
            jobs.append(Retraining(f"loo-without-{int(train_indices[column]):09d}", seed, kept))
    return Plan(subsets, keys, pairs, jobs)


def _leave_one_out(found: ScoreSet, store: RetrainingStore, pairs: list[tuple[int, int]]
                   ) -> tuple[dict[str, dict[str, float | None]] | None, list[dict[str, Any]], np.ndarray]:
    """Per matrix: Pearson and sign agreement of predicted (I_up / N) against actual loss changes; the pairs."""
    if not pairs:
        return None, [], np.zeros(0)
    train_indices = found.train_indices
    full = np.asarray(store.records["loo-full"]["loss"])
    actual = np.array([store.records[f"loo-without-{train_indices[column]:09d}"]["loss"][query] - full[query]
                       for query, column in pairs])
    predicted = {name: np.array([matrix[q, c] for q, c in pairs]) / matrix.shape[1]
                 for name, matrix in found.matrices.items()}
    summary = {name: {"pearson": _defined(pearson(values, actual))[0],
                      "sign_agreement": sign_agreement(values, actual)} for name, values in predicted.items()}
    rows = [{"query": found.query_indices[q], "train_index": train_indices[c], "actual": float(actual[n]),
             "predicted": {name: float(values[n]) for name, values in predicted.items()}}
            for n, (q, c) in enumerate(pairs)]
    return summary, rows, actual


Scatter = tuple[np.ndarray, np.ndarray, str, str, str]  # x, y, title, x label, y label


def analyse(found: ScoreSet, store: RetrainingStore, settings: ValidationSettings, the_plan: Plan
            ) -> tuple[ValidationReport, Scatter]:
    """The report from the stored retrainings, and the points of its scatter plot (first score matrix)."""
    targets = [np.stack([target(store.records[keys[r]]["loss"], store.records[keys[r]]["margin"], settings.output)
                         for keys in the_plan.subset_keys]) for r in range(settings.replicates)]
    per_query = {name: lds_per_query(matrix, the_plan.subsets, targets) for name, matrix in found.matrices.items()}
    ceiling = ceiling_per_query(targets[0], targets[1]) if settings.replicates == 2 else None
    loo, pairs, actual = _leave_one_out(found, store, the_plan.pairs)
    name, first = next(iter(found.matrices.items()))
    lds = {key: mean_defined(values) for key, values in per_query.items()}
    if pairs:
        scatter = (np.array([p["predicted"][name] for p in pairs]), actual,
                   f"leave-one-out, {name}: Pearson {_number(loo[name]['pearson'])}",
                   "predicted change of query loss (I_up / N)", "actual change")
    else:  # every query's subset sums and outputs, standardised per query so that queries share one plot
        standard = lambda a: (a - a.mean(0)) / np.where(a.std(0) > 0, a.std(0), 1.0)  # noqa: E731
        scatter = (standard(subset_sums(first, the_plan.subsets)).ravel(), standard(targets[0]).ravel(),
                   f"LDS {name}: {_number(lds[name])}",
                   "summed scores of the subset (standardised per query)",
                   f"{'−loss' if settings.output == 'loss' else 'margin'} after retraining (standardised)")
    records = [store.records[job.key] for job in the_plan.jobs]
    report = ValidationReport(
        output=settings.output, lds=lds, lds_per_query={key: _defined(v) for key, v in per_query.items()},
        ceiling=mean_defined(ceiling) if ceiling is not None else None,
        ceiling_per_query=_defined(ceiling) if ceiling is not None else None, leave_one_out=loo,
        leave_one_out_pairs=pairs,
        settings={**asdict(settings), "num_train": first.shape[1], "num_queries": first.shape[0],
                  "subset_size": subset_size(first.shape[1], settings.fraction)},
        retrainings={"count": len(records), "seconds": sum(r["seconds"] for r in records)},
    )
    return report, scatter


# -- where it goes ------------------------------------------------------------------------------------------
def scatter_image(points: Scatter) -> np.ndarray:
    """A scatter plot as an [H, W, 3] uint8 image: drawn by matplotlib when it is installed, else by PIL."""
    x, y, title, x_label, y_label = points
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return _pil_scatter(points)
    figure = Figure(figsize=(4.5, 4.5), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.scatter(x, y, s=10, alpha=0.6)
    axes.set_title(title, fontsize=10)
    axes.set_xlabel(x_label, fontsize=8)
    axes.set_ylabel(y_label, fontsize=8)
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _pil_scatter(points: Scatter, size: int = 400, margin: int = 40) -> np.ndarray:
    """The same plot without matplotlib: points scaled into a framed square, title and axis names as text."""
    from PIL import Image, ImageDraw

    x, y, title, x_label, y_label = points
    canvas = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((margin, margin, size - margin, size - margin), outline="black")
    draw.text((margin, 12), title, fill="black")
    draw.text((margin, size - margin + 8), f"x: {x_label}\ny: {y_label}", fill="black")
    span = size - 2 * margin
    unit = lambda a: (a - a.min()) / (a.max() - a.min()) if a.max() > a.min() else np.full_like(a, 0.5)  # noqa: E731
    for u, v in zip(unit(np.asarray(x, dtype=float)), unit(np.asarray(y, dtype=float))):
        left, top = margin + u * span, size - margin - v * span
        draw.ellipse((left - 2, top - 2, left + 2, top + 2), fill=(40, 90, 200))
    return np.asarray(canvas)


def _log(logger: Any, report: ValidationReport, image: np.ndarray, step: int) -> None:
    """Scalars to any logger, the scatter plot where the logger takes images; a failing logger only warns."""
    try:
        if callable(getattr(logger, "log_metrics", None)):
            logger.log_metrics(report.scalars(), step=step)
        experiment = getattr(logger, "experiment", None)
        if callable(getattr(experiment, "add_image", None)):
            experiment.add_image(f"{TAG}/scatter", image, step, dataformats="HWC")
        if callable(getattr(experiment, "flush", None)):
            experiment.flush()
    except Exception as error:  # a report must never break the run
        warn_user(f"Could not write the validation to the {type(logger).__name__}: {type(error).__name__}: {error}")


def publish(report: ValidationReport, points: Scatter, found: ScoreSet, folder: Path | None,
            loggers: Sequence[Any], step: int) -> None:
    """The report to `folder` (validation.json, scatter.png), to the loggers, and into each result's metadata
    (saved back to the folder it was loaded from)."""
    image = scatter_image(points)
    if folder is not None:
        atomic_write_json(folder / "validation.json", report.to_dict())
        atomic_write_bytes(folder / "scatter.png", png(image))
    for logger in loggers:
        _log(logger, report, image, step)
    for result, result_folder in found.results:
        result.metadata["validation"] = report.to_dict()
        if result_folder is not None:
            result.save(result_folder)


# -- the entry points ---------------------------------------------------------------------------------------
def _retrainer(module: ModuleFactory | pl.LightningModule, training_data: Dataset | DataLoader,
               training: IndexedData, queries: IndexedData, query_indices: list[int],
               trainer_kwargs: Mapping[str, Any] | None, batch_size: int | None,
               loss_fn: Callable[..., Tensor] | None) -> Retrainer:
    """The `Retrainer` of `validate`'s arguments: module factory, subset loaders like the user's, Trainer kwargs."""
    from lightning_influence.lightning.callback import InfluenceCallback  # here: the callback imports this module

    factory = Reinitialised(module) if isinstance(module, torch.nn.Module) else module
    if not callable(factory):
        raise TypeError(f"module must be a LightningModule or a function that builds one, got {module!r}.")
    if trainer_kwargs is not None and not isinstance(trainer_kwargs, Mapping):
        raise TypeError(f"trainer_kwargs must be a dict of pl.Trainer arguments, got {trainer_kwargs!r}.")
    kwargs = {**QUIET_TRAINER, **(trainer_kwargs or {})}
    if any(isinstance(callback, InfluenceCallback) for callback in kwargs.get("callbacks") or []):
        raise ValueError("trainer_kwargs['callbacks'] holds an InfluenceCallback: every retraining would compute "
                         "influence (and validate) again. Leave it out of the retrainings' callbacks.")
    if isinstance(training_data, DataLoader):
        batch_size = batch_size or training_data.batch_size
        shuffle = not isinstance(training_data.sampler, SequentialSampler)
    else:
        shuffle = True
    if batch_size is None:
        raise ValueError("Cannot tell the training batch size (a Dataset, or a DataLoader with a batch_sampler); "
                         "pass batch_size=... .")
    positive_int("batch_size", batch_size)
    return Retrainer(factory, training.dataset, training.collate_fn, batch_size, shuffle, kwargs, queries,
                     query_indices, loss_fn)


def _preflight(retrainer: Retrainer, settings: ValidationSettings) -> str:
    """Build and judge one module before any training, so that a bad factory, query data, loss or output fails
    at once; the digest of its initial weights (part of the retrainings' identity)."""
    with isolated_randomness(), _quiet_lightning():
        module = retrainer.build(derived_seed(settings.seed, TRAINING_STREAM, 0, 0))
        target(*retrainer.judge(module), settings.output)
    if settings.num_workers:
        try:
            pickle.dumps(retrainer)
        except Exception as error:
            raise TypeError(
                f"num_workers={settings.num_workers} sends the module factory, the data and the loss to worker "
                f"processes, but they cannot be pickled ({type(error).__name__}: {error}). Define them at module "
                "level (no lambdas or local classes), or use num_workers=0."
            ) from error
    return tensor_digest(sorted(module.state_dict().items()))


def _identity(retrainer: Retrainer, settings: ValidationSettings, train_indices: list[int], weights: str
              ) -> dict[str, Any]:
    """What the stored retrainings depend on (not K, the ceiling or leave-one-out: more of those add files)."""
    def digest(indices: list[int]) -> str:
        return tensor_digest([("indices", torch.tensor(indices, dtype=torch.long))])

    described = {key: value if isinstance(value, (bool, int, float, str, type(None))) else type(value).__qualname__
                 for key, value in sorted(retrainer.trainer_kwargs.items())}
    return {"num_train": len(train_indices), "train_indices": digest(train_indices),
            "query_indices": digest(retrainer.query_indices), "fraction": float(settings.fraction),
            "seed": settings.seed, "initial_weights": weights, "batch_size": retrainer.batch_size,
            "shuffle": retrainer.shuffle, "trainer_kwargs": described}


def _check_shape(found: ScoreSet, training: IndexedData, queries: IndexedData) -> None:
    """Fill in the default indices (all examples) and check that every matrix is [M queries, N examples]."""
    found.train_indices = training.check_indices(found.train_indices, "train_indices")
    found.query_indices = queries.check_indices(found.query_indices, "query_indices")
    shape = (len(found.query_indices), len(found.train_indices))
    for name, matrix in found.matrices.items():
        if matrix.shape != shape:
            raise ValueError(
                f"scores {name!r} have shape {matrix.shape}, but the data give [M={shape[0]} queries, N={shape[1]} "
                "training examples]; pass query_indices= and train_indices= naming the dataset index of each row "
                "and column (an InfluenceResult carries them)."
            )


def validate(
    scores: ScoresLike | Mapping[str, ScoresLike],
    module: ModuleFactory | pl.LightningModule,
    training_data: Dataset | DataLoader,
    query_data: Dataset | DataLoader | IndexedData,
    *,
    train_indices: Sequence[int] | None = None,
    query_indices: Sequence[int] | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    loss_fn: Callable[..., Tensor] | None = None,
    batch_transform: Callable[[Any], Any] | None = None,
    save_dir: str | os.PathLike[str] | None = None,
    loggers: Sequence[Any] = (),
    step: int = 0,
    progress: bool = False,
    on_retrain: RetrainHook | None = None,
    **settings: Any,
) -> ValidationReport:
    """Judge influence scores by retraining: LDS, optionally leave-one-out, and the two-seed noise ceiling.

    Args:
        scores: an `InfluenceResult`, a saved result's folder, a plain [M, N] tensor, or a dict name → any of
            those, all judged on the same retrainings. Results get ``metadata["validation"]`` (saved back to
            their folder when given as one).
        module: a function building a fresh LightningModule (called under each retraining's seed), or a module
            whose copies are re-initialised by ``reset_parameters()``.
        training_data: the Dataset, or a DataLoader whose batch size, shuffling and collate function the
            retrainings reuse; ``train_indices`` (default: all, or the result's) are the dataset indices of the
            score columns, and subsets are drawn from them.
        query_data: the queries' Dataset or DataLoader; ``query_indices`` (default: all, or the result's) are
            the dataset indices of the score rows.
        trainer_kwargs: `pl.Trainer` arguments of every retraining, over `QUIET_TRAINER`.
        loss_fn: ``loss_fn(outputs, targets)``, the batch mean loss; default the module's ``loss_fn`` or
            ``criterion``. ``batch_transform`` maps a query batch to ``(inputs, targets)`` if needed.
        save_dir: where retrainings are stored as they finish (a rerun continues) and the report is written.
        loggers: Lightning loggers for scalars and the scatter plot (at ``step``).
        on_retrain: called with each retraining's record once it is stored.
        **settings: the `ValidationSettings` (num_subsets=20, fraction=0.5, seed=0, output="loss",
            ceiling=True, leave_one_out=0, leave_one_out_queries=3, num_workers=0).
    """
    options = ValidationSettings(**settings)
    found = load_scores(scores)
    training = IndexedData(training_data, name="training_data")
    queries = query_data if isinstance(query_data, IndexedData) else IndexedData(
        query_data, batch_transform=batch_transform, name="query_data")
    for what, data, given in (("train_indices", training, train_indices), ("query_indices", queries, query_indices)):
        if given is not None:
            found.agree(what, data.check_indices(given, what), what)
    _check_shape(found, training, queries)
    retrainer = _retrainer(module, training_data, training, queries, found.query_indices, trainer_kwargs,
                           batch_size, loss_fn)
    identity = _identity(retrainer, options, found.train_indices, _preflight(retrainer, options))
    folder = Path(save_dir) if save_dir is not None else None
    store = RetrainingStore(folder, identity)
    the_plan = plan(options, next(iter(found.matrices.values())), found.train_indices)
    ran = run_retrainings(retrainer, the_plan.jobs, store, options.num_workers, on_retrain, progress)
    report, points = analyse(found, store, options, the_plan)
    report.settings["trainer_kwargs"] = identity["trainer_kwargs"]
    report.retrainings["run_now"] = ran
    publish(report, points, found, folder, loggers, step)
    return report


# -- after fit, from the callback ---------------------------------------------------------------------------
#: `validate` arguments the callback supplies itself.
_FROM_THE_CALLBACK = frozenset({"scores", "training_data", "query_data", "train_indices", "query_indices",
                                "loss_fn", "batch_transform", "loggers", "step"})


def check_validate_option(value: bool | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """`InfluenceCallback(validate=...)`: None or False (off), True (defaults), or a dict of `validate`'s
    keyword arguments (e.g. ``{"module": MyModule, "num_subsets": 50}``), checked at construction."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise TypeError(f"validate must be True, False, None or a dict of validate() options, got {value!r}.")
    named = set(inspect.signature(validate).parameters) - {"settings"}
    accepted = (named | {f.name for f in fields(ValidationSettings)}) - _FROM_THE_CALLBACK
    unknown = sorted(set(value) - accepted)
    if unknown:
        raise ValueError(f"validate has unknown option(s) {unknown}; it accepts {sorted(accepted)} (the callback "
                         "supplies the scores, data, queries, loss and loggers itself).")
    ValidationSettings(**{f.name: value[f.name] for f in fields(ValidationSettings) if f.name in value})
    return dict(value)


def refuse_multiprocess_validation(trainer: pl.Trainer) -> None:
    """Validation after fit retrains from the callback of a one-process trainer only."""
    if trainer.world_size > 1:
        raise NotImplementedError(
            f"InfluenceCallback(validate=...) runs under a one-process trainer, this one runs {trainer.world_size}. "
            "Call lightning_influence.validate(result, ...) from one process after fit instead."
        )


def fitted_trainer_kwargs(trainer: pl.Trainer) -> dict[str, Any]:
    """The settings of a fitted trainer that retrainings copy: length, clipping, accumulation, precision, device
    type (not its callbacks or loggers)."""
    return {"max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps, "precision": trainer.precision,
            "gradient_clip_val": trainer.gradient_clip_val, "gradient_clip_algorithm": trainer.gradient_clip_algorithm,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "accelerator": trainer.strategy.root_device.type}


def validate_after_fit(options: Mapping[str, Any], trainer: pl.Trainer, module: pl.LightningModule,
                       result: InfluenceResult, training: IndexedData, query: IndexedData,
                       loss_fn: Callable[..., Tensor] | None, folder: Path) -> ValidationReport:
    """Validate the callback's new result: retrain re-initialised copies of the fitted module (or
    ``options["module"]``) with the fitted trainer's settings and its loader's batch size and shuffling, store
    the retrainings in `folder/validation`, and save the result back with ``metadata["validation"]``."""
    options = dict(options)
    source = trainer.train_dataloader
    batch_size = options.pop("batch_size", None) or getattr(source, "batch_size", None)
    shuffle = not isinstance(getattr(source, "sampler", None), SequentialSampler)
    if batch_size is None:
        raise ValueError("Cannot tell the training batch size from the trainer; pass validate={'batch_size': ...}.")
    data = DataLoader(training.dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=training.collate_fn)
    options.setdefault("trainer_kwargs", fitted_trainer_kwargs(trainer))
    options.setdefault("save_dir", folder / "validation")
    factory = options.pop("module", None) or module
    report = validate(result, factory, data, query, loss_fn=loss_fn, loggers=trainer.loggers,
                      step=trainer.global_step, **options)
    result.save(folder / "result")
    return report
