"""Per-example facts that reports and the dashboard show: label, the model's prediction and loss, a suspect-label
mark, a thumbnail (image inputs), a description (the user's `describe(input)` text, else the raw features) and the
user's own ID where the data gives one (`IndexedData.ids`).

They are gathered in one pass over the data when the report is written and saved in `report/examples/`, so that
the dashboard can show any training example without the user's dataset or model. Arrays are `.npy` files
(memory-mapped on read); texts are one UTF-8 file with an offsets array, so reading example i touches its bytes
alone, also for millions of examples.

Thumbnails and descriptions are kept for every training example when that fits in ALL_EXAMPLES_BUDGET bytes,
else for the examples the dashboard's rankings can name: the top DASHBOARD_TOP helpful and harmful examples of
every query and the top SELF_RANKING by self-influence. Labels, predictions, losses and IDs are kept for all.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_influence.engine.predictions import example_row, losses_and_predictions
from lightning_influence.model.data import IndexedData, iterate_batches, split_batch
from lightning_influence.model.twice_differentiable import TwiceDifferentiable
from lightning_influence.reports.images import thumbnail, thumbnail_side
from lightning_influence.storage.files import (
    atomic_save_array,
    atomic_write_bytes,
    atomic_write_json,
    read_json,
    replace_folder,
    staging_folder,
)
from lightning_influence.storage.result import InfluenceResult

#: Describes one example's input (as the dataset yields it) in words, e.g. a tokenizer's decode.
Describe = Callable[[Any], str]

FORMAT_VERSION = 1
MANIFEST = "examples.json"
SPLITS = ("train", "query")
DESCRIPTION_CHARS = 300
ALL_EXAMPLES_BUDGET = 256 * 2**20
DASHBOARD_TOP = 50
SELF_RANKING = 500


def label_text(target: Any) -> str:
    """A short printable label of one example's target (a class, a value, or a shape)."""
    if isinstance(target, Tensor):
        if target.numel() != 1:
            return f"tensor{tuple(target.shape)}"
        target = target.item()
    return f"{target:.4g}" if isinstance(target, float) else str(target)


def labels_of(targets: Any) -> list[str]:
    """`label_text` of every example of a collated batch of targets."""
    if isinstance(targets, Tensor) and targets.ndim <= 1:
        return [label_text(value) for value in targets.reshape(-1).tolist()]
    return [label_text(target) for target in targets]


def feature_text(value: Any, shown: int = 8) -> str:
    """Raw features in brief: the first values of a tensor and how many there are."""
    if not isinstance(value, Tensor):
        return repr(value)[:DESCRIPTION_CHARS]
    flat = value.detach().cpu().reshape(-1)
    text = ", ".join(label_text(v) for v in flat[:shown].tolist())
    return f"[{text}, … {flat.numel()} values]" if flat.numel() > shown else f"[{text}]"


def top_positions(values: Tensor, k: int, largest: bool) -> tuple[list[int], list[float]]:
    """Positions and values of the k largest (or smallest) entries of a row of scores, best first."""
    top = torch.as_tensor(values).topk(min(k, len(values)), largest=largest)
    return top.indices.tolist(), top.values.tolist()


def named_positions(result: InfluenceResult) -> np.ndarray:
    """Training positions the dashboard's rankings can name (sorted): the top DASHBOARD_TOP helpful and harmful
    examples of every query and the top SELF_RANKING by self-influence. Reads one row of scores at a time."""
    named: set[int] = set()
    for query in range(result.num_queries):
        for largest in (True, False):
            named.update(top_positions(result.scores[query], DASHBOARD_TOP, largest)[0])
    if result.self_influence is not None:
        named.update(top_positions(result.self_influence, SELF_RANKING, True)[0])
    return np.array(sorted(named), dtype=np.int64)


# -- writing --------------------------------------------------------------------------------------------------
def _save_texts(folder: Path, name: str, texts: Sequence[str]) -> None:
    encoded = [text.encode("utf-8") for text in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(blob) for blob in encoded], out=offsets[1:])
    atomic_write_bytes(folder / f"{name}.txt", b"".join(encoded))
    atomic_save_array(folder / f"{name}_offsets.npy", offsets)


def _batches(data: IndexedData, dataset_indices: list[int], model: TwiceDifferentiable | None, batch_size: int
             ) -> Iterator[tuple[Any, Any, Tensor | None, Tensor | None]]:
    """(inputs, targets, per-example losses, predicted classes) of each batch, in the order of `dataset_indices`."""
    loader = data.loader(dataset_indices, batch_size)
    if model is None:
        for batch in loader:
            yield (*split_batch(batch), None, None)
        return
    with model.evaluating():
        for _, inputs, targets in iterate_batches(loader, model.device, model.dtype, name=data.name):
            losses, predicted = losses_and_predictions(model, inputs, targets)
            yield inputs, targets, losses.float().cpu(), None if predicted is None else predicted.cpu()


def _describe(describe: Describe | None, value: Any, index: int, name: str) -> str:
    """The user's description of one input (cut to DESCRIPTION_CHARS), else its raw features."""
    if describe is None:
        return feature_text(value)
    try:
        text = describe(value)
    except Exception as error:
        raise ValueError(f"describe failed on example {index} of {name} ({type(error).__name__}: {error}); it "
                         "must map one example's input to a string.") from error
    return str(text)[:DESCRIPTION_CHARS]


@dataclass
class _Columns:
    """What one pass over a split gathers, before it is saved."""

    labels: list[str]
    predictions: list[str]
    losses: list[np.ndarray]
    thumbnails: list[np.ndarray]
    descriptions: list[str]


def _gather(data: IndexedData, dataset_indices: list[int], kept: np.ndarray, side: int | None, describing: bool,
            model: TwiceDifferentiable | None, describe: Describe | None, batch_size: int) -> _Columns:
    columns = _Columns([], [], [], [], [])
    keep = np.zeros(len(dataset_indices), dtype=bool)
    keep[kept] = True
    blank = np.full((side or 1, side or 1, 3), 255, dtype=np.uint8)  # for an input that is not an image
    start = 0
    for inputs, targets, losses, predicted in _batches(data, dataset_indices, model, batch_size):
        labels = labels_of(targets)
        columns.labels += labels
        if losses is not None:
            columns.losses.append(losses.numpy())
        if predicted is not None:
            columns.predictions += [str(value) for value in predicted.tolist()]
        for row in np.flatnonzero(keep[start:start + len(labels)]):
            example = example_row(inputs, int(row))
            if side is not None:
                picture = thumbnail(example, side)
                columns.thumbnails.append(blank if picture is None else picture)
            if describing:
                columns.descriptions.append(_describe(describe, example, dataset_indices[start + row], data.name))
        start += len(labels)
    return columns


def _save_split(folder: Path, data: IndexedData, indices: Tensor, named: Callable[[], np.ndarray] | None,
                model: TwiceDifferentiable | None, describe: Describe | None, batch_size: int) -> None:
    """Gather and save one split; `named()` gives the positions to keep thumbnails for when not all fit (None:
    keep all)."""
    folder.mkdir(parents=True)
    dataset_indices = [int(i) for i in indices]
    count = len(dataset_indices)
    side = thumbnail_side(example_row(data.examples(dataset_indices[:1])[0], 0))
    describing = describe is not None or side is None
    per_example = (3 * side * side if side is not None else 0) + (DESCRIPTION_CHARS if describing else 0)
    keep_all = named is None or count * per_example <= ALL_EXAMPLES_BUDGET
    kept = np.arange(count) if keep_all else named()
    columns = _gather(data, dataset_indices, kept, side, describing, model, describe, batch_size)
    atomic_save_array(folder / "indices.npy", np.asarray(dataset_indices, dtype=np.int64))
    _save_texts(folder, "label", columns.labels)
    ids = data.ids(dataset_indices)
    if ids is not None:
        _save_texts(folder, "id", ids)
    info: dict[str, Any] = {"count": count, "all_kept": keep_all, "thumbnail_side": side,
                            "predictions": len(columns.predictions) == count,
                            "losses": bool(columns.losses), "descriptions": describing, "ids": ids is not None}
    if info["predictions"]:
        _save_texts(folder, "prediction", columns.predictions)
        suspect = np.array([a != b for a, b in zip(columns.labels, columns.predictions)], dtype=bool)
        atomic_save_array(folder / "suspect.npy", suspect)
    if info["losses"]:
        atomic_save_array(folder / "loss.npy", np.concatenate(columns.losses).astype(np.float32))
    if not keep_all:
        atomic_save_array(folder / "kept.npy", kept)
    if side is not None:
        atomic_save_array(folder / "thumbnails.npy", np.stack(columns.thumbnails))
    if describing:
        _save_texts(folder, "description", columns.descriptions)
    atomic_write_json(folder / "split.json", info)


def save_examples(folder: str | Path, result: InfluenceResult, train_data: IndexedData, query_data: IndexedData,
                  *, model: TwiceDifferentiable | None = None, describe: Describe | None = None,
                  batch_size: int = 256) -> ExampleStore:
    """Gather every training and query example's facts in one pass each and save them in `folder` (replaced as a
    whole, manifest last); returns the store reading them back."""
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(target)
    try:
        _save_split(staging / "train", train_data, result.train_indices, lambda: named_positions(result), model,
                    describe, batch_size)
        _save_split(staging / "query", query_data, result.query_indices, None, model, describe, batch_size)
        atomic_write_json(staging / MANIFEST, {"format_version": FORMAT_VERSION, "splits": list(SPLITS)})
        replace_folder(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return ExampleStore(target)


# -- reading --------------------------------------------------------------------------------------------------
@dataclass
class Example:
    """One example as reports and the dashboard show it; None where the facts were not saved."""

    position: int
    index: int
    label: str | None
    prediction: str | None
    loss: float | None
    suspect: bool | None
    description: str | None
    thumbnail: bool
    id: str | None = None  # the user's own ID (`IndexedData.ids`); "" where a wrapped dataset has none


class _Texts:
    """A saved list of strings, read one at a time."""

    def __init__(self, folder: Path, name: str) -> None:
        self.path = folder / f"{name}.txt"
        self.offsets = np.load(folder / f"{name}_offsets.npy", mmap_mode="r")

    def __getitem__(self, row: int) -> str:
        start, stop = int(self.offsets[row]), int(self.offsets[row + 1])
        with open(self.path, "rb") as handle:
            handle.seek(start)
            return handle.read(stop - start).decode("utf-8")


def _optional(folder: Path | None, name: str, present: bool) -> np.ndarray | None:
    return np.load(folder / name, mmap_mode="r") if present and folder is not None else None


class SplitReader:
    """The saved facts of one split, memory-mapped; `folder` None gives a reader that knows the indices alone."""

    def __init__(self, folder: Path | None, indices: Any) -> None:
        info = read_json(folder / "split.json") if folder is not None else {}
        self.indices = np.load(folder / "indices.npy", mmap_mode="r") if folder is not None else np.asarray(indices)
        self.labels = _Texts(folder, "label") if folder is not None else None
        self.predictions = _Texts(folder, "prediction") if info.get("predictions") else None
        self.descriptions = _Texts(folder, "description") if info.get("descriptions") else None
        self.ids = _Texts(folder, "id") if info.get("ids") else None
        self.losses = _optional(folder, "loss.npy", info.get("losses", False))
        self.suspects = _optional(folder, "suspect.npy", info.get("predictions", False))
        self.thumbnails = _optional(folder, "thumbnails.npy", info.get("thumbnail_side") is not None)
        self.kept = _optional(folder, "kept.npy", not info.get("all_kept", True))
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def kept_row(self, position: int) -> int | None:
        """Row of `position` among the examples with a thumbnail and description, or None if it has none."""
        if self.kept is None:
            return position
        row = int(np.searchsorted(self.kept, position))
        return row if row < len(self.kept) and int(self.kept[row]) == position else None

    def example(self, position: int) -> Example:
        row = self.kept_row(position)
        return Example(
            position=position, index=int(self.indices[position]),
            label=None if self.labels is None else self.labels[position],
            prediction=None if self.predictions is None else self.predictions[position],
            loss=None if self.losses is None else float(self.losses[position]),
            suspect=None if self.suspects is None else bool(self.suspects[position]),
            description=None if self.descriptions is None or row is None else self.descriptions[row],
            thumbnail=self.thumbnails is not None and row is not None,
            id=None if self.ids is None else self.ids[position],
        )

    def thumbnail(self, position: int) -> np.ndarray | None:
        row = self.kept_row(position)
        return None if self.thumbnails is None or row is None else np.asarray(self.thumbnails[row])

    def position_of(self, index: int) -> int | None:
        """The position of dataset index `index`, or None when the split does not hold it."""
        if self._order is None:
            ascending = len(self.indices) < 2 or bool(np.all(np.diff(self.indices) > 0))
            self._order = np.arange(len(self.indices)) if ascending else np.argsort(self.indices, kind="stable")
        row = int(np.searchsorted(self.indices, index, sorter=self._order))
        if row < len(self.indices) and int(self.indices[self._order[row]]) == index:
            return int(self._order[row])
        return None


class ExampleStore:
    """Reads a folder written by `save_examples`; `ExampleStore.bare(result)` knows only the result's indices."""

    def __init__(self, folder: Path | None, result: InfluenceResult | None = None) -> None:
        if folder is not None:
            manifest = read_json(folder / MANIFEST)
            if manifest.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{folder} holds examples in format {manifest.get('format_version')!r}, this "
                                 f"version reads {FORMAT_VERSION}; rewrite the report.")
        self.train = SplitReader(folder and folder / "train", None if result is None else result.train_indices)
        self.query = SplitReader(folder and folder / "query", None if result is None else result.query_indices)

    @classmethod
    def bare(cls, result: InfluenceResult) -> ExampleStore:
        return cls(None, result)

    def split(self, name: str) -> SplitReader:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {name!r}.")
        return self.train if name == "train" else self.query
