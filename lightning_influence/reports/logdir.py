"""Influence runs under a log dir, as the dashboard sees them: found by their saved files, loaded memory-mapped,
and answered one row or one column of scores at a time, so that N may be in the millions.

A run is a folder holding `result/metadata.json` (complete) or `partial/` (still computing): the callback's
`<log_dir>/influence` and `<default_root_dir>/influence/version_N`, or any `save_dir`. Its per-example facts are
read from `report/examples` when the report has been written. A run that is rewritten (recomputed, or its report
written after its result) is reloaded on the next request.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from lightning_influence.reports.examples import (
    DASHBOARD_TOP,
    MANIFEST,
    SELF_RANKING,
    SPLITS,
    ExampleStore,
    SplitReader,
    top_positions,
)
from lightning_influence.reports.tables import csv_text, csv_value
from lightning_influence.storage.result import METADATA_FILE, InfluenceResult

RESCAN_SECONDS = 5.0  # how stale the list of runs may be
HISTOGRAM_BINS = 40
EXPORT_COLUMNS = ["train_index", "label", "prediction", "suspect_label", "loss", "self_influence", "description"]
_NOT_RUNS = {"result", "partial", "report", "checkpoints"}


class RequestError(ValueError):
    """A request the dashboard cannot answer, with the HTTP status (4xx) and a message for the user."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def find_runs(logdir: Path) -> dict[str, Path]:
    """Run name (its folder relative to `logdir`) → folder, for every influence run under `logdir`."""
    found: dict[str, Path] = {}
    for root, folders, _ in os.walk(logdir):
        here = Path(root)
        if (here / "result" / METADATA_FILE).is_file() or "partial" in folders:
            name = here.relative_to(logdir).as_posix()
            found[logdir.name if name == "." else name] = here
        folders[:] = sorted(f for f in folders if not f.startswith(".") and f not in _NOT_RUNS)
    return found


def histogram_edges(low: float, high: float, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """`bins` equal-width bins over [low, high], except that 0 is always an edge when the range holds both signs,
    so that no bar mixes helpful and harmful scores."""
    if not low < 0 < high:
        return np.linspace(low, high, bins + 1) if high > low else np.array([low - 0.5, high + 0.5])
    negative = min(bins - 1, max(1, round(bins * -low / (high - low))))
    return np.concatenate([np.linspace(low, 0, negative + 1), np.linspace(0, high, bins - negative + 1)[1:]])


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_ino, status.st_mtime_ns


def read_column(path: Path, position: int) -> np.ndarray:
    """Column `position` of the C-order [M, N] matrix in a `.npy` file, read value by value (M reads of one
    value each): no mapping, so no read-ahead pulls in the megabytes around each row's value."""
    with open(path, "rb", buffering=0) as handle:
        version = np.lib.format.read_magic(handle)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        (rows, columns), fortran, dtype = header(handle)
        start, size = handle.tell(), dtype.itemsize
        if fortran:
            handle.seek(start + position * rows * size)
            return np.frombuffer(handle.read(rows * size), dtype=dtype).copy()
        values = bytearray()
        for row in range(rows):
            handle.seek(start + (row * columns + position) * size)
            values += handle.read(size)
    return np.frombuffer(values, dtype=dtype)  # a bytearray: writable, like every array handed on


def int_argument(value: str | None, name: str, low: int, high: int) -> int:
    """`value` as an integer in [low, high), or a RequestError naming `name` and the range."""
    if value is None:
        raise RequestError(f"Missing parameter {name!r}: an integer in [{low}, {high}).")
    try:
        number = int(value)
    except ValueError:
        raise RequestError(f"{name} must be an integer in [{low}, {high}), got {value!r}.") from None
    if not low <= number < high:
        raise RequestError(f"{name}={number} is out of range: it must be in [{low}, {high}).")
    return number


class InfluenceRun:
    """One run's saved result and examples, loaded lazily and memory-mapped, reloaded when rewritten."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name, self.folder = name, folder
        self._lock = threading.Lock()
        self._stamps: tuple[Any, ...] | None = None
        self._loaded: tuple[InfluenceResult, ExampleStore] | None = None

    def _paths(self) -> tuple[Path, Path]:
        return self.folder / "result" / METADATA_FILE, self.folder / "report" / "examples" / MANIFEST

    @property
    def complete(self) -> bool:
        return self._paths()[0].is_file()

    def load(self) -> tuple[InfluenceResult, ExampleStore]:
        """The result and examples, reloaded when their files changed; a RequestError while still computing."""
        metadata, manifest = self._paths()
        with self._lock:
            stamps = (_stamp(metadata), _stamp(manifest))
            if stamps[0] is None:
                raise RequestError(f"Run {self.name!r} is still computing: its result appears when the influence "
                                   "computation finishes.", 409)
            if stamps != self._stamps or self._loaded is None:
                try:
                    result = InfluenceResult.load(metadata.parent)
                    store = ExampleStore(manifest.parent, result) if stamps[1] else ExampleStore.bare(result)
                except (OSError, ValueError) as error:
                    raise RequestError(f"Run {self.name!r} cannot be read: {error}", 409) from error
                self._loaded, self._stamps = (result, store), stamps
            return self._loaded

    def info(self) -> dict[str, Any]:
        """The run's name and state, and for a complete run its sizes, what was saved, and whether the result is
        trustworthy (with the warnings that say why not)."""
        if not self.complete:
            return {"name": self.name, "state": "computing"}
        try:
            result, store = self.load()
        except RequestError as error:
            return {"name": self.name, "state": "unreadable", "message": str(error)}
        meta = result.metadata
        return {
            "name": self.name, "state": "complete", "num_queries": result.num_queries,
            "num_train": result.num_train, "method": meta.get("method"), "updated": self._stamps[0][1],
            "self_influence": result.self_influence is not None,
            "predictions": store.train.predictions is not None, "descriptions": store.train.descriptions is not None,
            "thumbnails": store.train.thumbnails is not None, "max_k": DASHBOARD_TOP, "max_self_k": SELF_RANKING,
            "trustworthy": result.trustworthy, "warnings": result.warnings,
        }

    def queries(self) -> list[dict[str, Any]]:
        result, store = self.load()
        return [asdict(store.query.example(q)) for q in range(result.num_queries)]

    def query(self, query: int, k: int) -> dict[str, Any]:
        """A query with its top-k helpful and harmful training examples and a histogram of its scores (one row)."""
        result, store = self.load()
        row = np.asarray(result.scores[query])
        answer: dict[str, Any] = {"query": asdict(store.query.example(query))}
        for kind, largest in (("helpful", True), ("harmful", False)):
            positions, scores = top_positions(row, k, largest)
            answer[kind] = [{**asdict(store.train.example(p)), "score": s} for p, s in zip(positions, scores)
                            if (s > 0 if largest else s < 0)]
        counts, edges = np.histogram(row, bins=histogram_edges(float(row.min()), float(row.max())))
        answer["histogram"] = {"counts": counts.tolist(), "edges": edges.tolist()}
        return answer

    def train_position(self, index: int, split: SplitReader) -> int:
        position = split.position_of(index)
        if position is None:
            raise RequestError(f"Training example {index} is not in run {self.name!r} (its {len(split)} training "
                               "examples are listed by dataset index).", 404)
        return position

    def train(self, index: int, k: int) -> dict[str, Any]:
        """A training example (by dataset index), its self-influence rank, and the queries it helps and hurts most
        (one column of scores)."""
        result, store = self.load()
        position = self.train_position(index, store.train)
        column = read_column(self.folder / "result" / "scores.npy", position)
        answer: dict[str, Any] = {"example": asdict(store.train.example(position)), "num_train": result.num_train}
        if result.self_influence is not None:
            values = np.asarray(result.self_influence)
            answer["self_influence"] = float(values[position])
            answer["self_rank"] = int(np.count_nonzero(values > values[position])) + 1
        for kind, largest in (("helps", True), ("hurts", False)):
            positions, scores = top_positions(column, k, largest)
            answer[kind] = [{**asdict(store.query.example(p)), "score": s} for p, s in zip(positions, scores)
                            if (s > 0 if largest else s < 0)]
        return answer

    def self_influence(self, k: int) -> list[dict[str, Any]]:
        """The k training examples of highest self-influence, highest first."""
        result, store = self.load()
        if result.self_influence is None:
            raise RequestError(f"Run {self.name!r} has no self-influence; compute it with self_influence=True.", 404)
        positions, scores = top_positions(np.asarray(result.self_influence), k, True)
        return [{**asdict(store.train.example(p)), "rank": n + 1, "self_influence": s}
                for n, (p, s) in enumerate(zip(positions, scores))]

    def export(self, indices: list[int]) -> str:
        """A CSV (EXPORT_COLUMNS) of the training examples with these dataset indices, in the given order."""
        result, store = self.load()
        rows = []
        for index in indices:
            position = self.train_position(index, store.train)
            example = store.train.example(position)
            value = None if result.self_influence is None else float(result.self_influence[position])
            rows.append([index, example.label, example.prediction, example.suspect, example.loss, value,
                         example.description])
        return csv_text(EXPORT_COLUMNS, ([csv_value(v) for v in row] for row in rows))

    def split(self, name: str | None) -> SplitReader:
        """The examples of split `name` ('train' or 'query')."""
        _, store = self.load()
        if name not in SPLITS:
            raise RequestError(f"split must be one of {list(SPLITS)}, got {name!r}.")
        return store.split(name)


class RunIndex:
    """The runs under a log dir, rescanned at most every RESCAN_SECONDS (or when an unknown run is asked for)."""

    def __init__(self, logdir: str | os.PathLike[str] | None) -> None:
        self.logdir = Path(logdir) if logdir else None  # None: TensorBoard runs without --logdir (e.g. --logdir_spec)
        self._runs: dict[str, InfluenceRun] = {}
        self._scanned = -float("inf")
        self._lock = threading.Lock()

    def runs(self, fresh: bool = False) -> dict[str, InfluenceRun]:
        with self._lock:
            if fresh or time.monotonic() - self._scanned > RESCAN_SECONDS:
                folders = find_runs(self.logdir) if self.logdir is not None and self.logdir.is_dir() else {}
                kept = {n: r for n, r in self._runs.items() if folders.get(n) == r.folder}
                self._runs = {n: kept.get(n) or InfluenceRun(n, f) for n, f in folders.items()}
                self._scanned = time.monotonic()
            return dict(self._runs)

    def get(self, name: str | None) -> InfluenceRun:
        if not name:
            raise RequestError("Missing parameter 'run': the name of an influence run (see /runs).")
        run = self.runs().get(name) or self.runs(fresh=True).get(name)
        if run is None:
            if self.logdir is None:
                raise RequestError("TensorBoard was started without --logdir; the INFLUENCE tab reads the runs under "
                                   "--logdir only.", 404)
            raise RequestError(f"Unknown run {name!r}; the runs under {str(self.logdir)!r} are {sorted(self.runs())}.",
                               404)
        return run
