"""Reports of an `InfluenceResult`: tables, image grids, histograms and scalars, to loggers and to disk.

Each logger gets what it supports: scalars through `log_metrics` (every Lightning logger), and text, images and
histograms where its `experiment` has `add_text` / `add_image` / `add_histogram` (TensorBoard's SummaryWriter).
A logger that fails is warned about, never raised from. The same tables (markdown and CSV) and grids (PNG)
are written beside the saved tensors, so a run without loggers still has its report.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_influence.errors import warn_user
from lightning_influence.model.data import IndexedData
from lightning_influence.storage.files import atomic_write_bytes, atomic_write_text
from lightning_influence.storage.result import InfluenceResult

TAG = "influence"
_TILE = 96  # pixels per image in a grid
_CAPTION = 30  # pixels of caption under each tile


@dataclass
class Row:
    """One line of a report table."""

    kind: str  # "helpful", "harmful" or "self"
    rank: int
    train_index: int
    label: str
    score: float


@dataclass
class QueryReport:
    """The top helpful and harmful training examples of one query."""

    position: int
    query_index: int
    label: str
    rows: list[Row]


def label_text(target: Any) -> str:
    """A short printable label of one example's target (a class, a value, or a shape)."""
    if isinstance(target, Tensor):
        if target.numel() == 1:
            value = target.item()
            return str(value) if isinstance(value, int) else f"{value:.4g}"
        return f"tensor{tuple(target.shape)}"
    return str(target)


def _pick(inputs: Any, position: int) -> Any:
    return inputs[position] if isinstance(inputs, Tensor) else None


def build_tables(
    result: InfluenceResult, train_data: IndexedData, query_data: IndexedData, top_k: int
) -> tuple[list[QueryReport], list[Row], dict[int, tuple[Any, str]], dict[int, tuple[Any, str]]]:
    """Per-query top-k tables, the self-influence table, and (input, label) of every example they name."""
    k = min(top_k, result.num_train)
    tops = [(result.top_helpful(m, k), result.top_harmful(m, k)) for m in range(result.num_queries)]
    self_top = result.top_self_influence(k) if result.self_influence is not None else None
    needed = sorted({int(i) for pair in tops for top in pair for i in top.indices}
                    | ({int(i) for i in self_top.indices} if self_top is not None else set()))
    train_inputs, train_targets = train_data.examples(needed)
    train = {index: (_pick(train_inputs, n), label_text(train_targets[n])) for n, index in enumerate(needed)}
    query_ids = [int(i) for i in result.query_indices]
    query_inputs, query_targets = query_data.examples(query_ids)
    queries = {index: (_pick(query_inputs, n), label_text(query_targets[n])) for n, index in enumerate(query_ids)}

    reports = []
    for m, (helpful, harmful) in enumerate(tops):
        # Only positive scores are listed as helpful and only negative ones as harmful.
        rows = [Row(kind, rank + 1, int(i), train[int(i)][1], float(s))
                for kind, top in (("helpful", helpful), ("harmful", harmful))
                for rank, (i, s) in enumerate(zip(top.indices, top.scores))
                if (float(s) > 0 if kind == "helpful" else float(s) < 0)]
        reports.append(QueryReport(m, query_ids[m], queries[query_ids[m]][1], rows))
    self_rows = []
    if self_top is not None:
        self_rows = [Row("self", rank + 1, int(i), train[int(i)][1], float(s))
                     for rank, (i, s) in enumerate(zip(self_top.indices, self_top.scores))]
    return reports, self_rows, train, queries


def query_markdown(report: QueryReport) -> str:
    """A markdown table of one query's top helpful and harmful training examples."""
    lines = [
        f"**Query {report.position}** (dataset index {report.query_index}, label {report.label}). "
        "Positive score: the training example helped (removing it would raise the query's loss).",
        "",
        "| | rank | train index | label | score |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r.kind} | {r.rank} | {r.train_index} | {r.label} | {r.score:.4e} |" for r in report.rows]
    for kind, sign in (("helpful", "positive"), ("harmful", "negative")):
        if not any(r.kind == kind for r in report.rows):
            lines.append(f"| {kind} | – | none with a {sign} score | | |")
    return "\n".join(lines)


def settings_markdown(result: InfluenceResult) -> str:
    """A markdown table of how the numbers were made: the method, curvature and λ that ran, each with its reason
    ("given", or what "auto" found); empty for a result without that record."""
    choices = result.metadata.get("choices") or {}
    if not choices:
        return ""
    rows = [("method", choices.get("method"), choices.get("method_reason")),
            ("curvature", choices.get("curvature"), choices.get("curvature_reason")),
            ("λ (hessian_regularization)", f"{choices.get('hessian_regularization', float('nan')):.4g}",
             choices.get("regularization_reason"))]
    lines = ["**Settings**", "", "| option | value | why |", "| --- | --- | --- |"]
    return "\n".join(lines + [f"| {name} | {value} | {reason} |" for name, value, reason in rows])


def self_influence_markdown(rows: Sequence[Row]) -> str:
    """A markdown table of the training examples with the highest self-influence."""
    lines = [
        "**Highest self-influence** (outliers and likely mislabelled examples)",
        "",
        "| rank | train index | label | self-influence |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {r.rank} | {r.train_index} | {r.label} | {r.score:.4e} |" for r in rows]
    return "\n".join(lines)


def as_image(value: Any) -> np.ndarray | None:
    """One example's input as an [H, W, 3] float image in [0, 1], or None if it does not look like an image.

    Images are [C, H, W] tensors with 1, 3 or 4 channels, or [H, W] tensors, at least 4 pixels a side.
    """
    if not isinstance(value, Tensor) or not value.is_floating_point() and value.dtype != torch.uint8:
        return None
    image = value.detach().cpu().float()
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4) or min(image.shape[1:]) < 4:
        return None
    image = image[:3]
    low, high = image.min(), image.max()
    image = (image - low) / (high - low) if high > low else torch.zeros_like(image)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image.permute(1, 2, 0).numpy()


_FRAME = {"query": (40, 90, 200), "helpful": (30, 150, 60), "harmful": (200, 40, 40)}


def image_grid(tiles: Sequence[tuple[np.ndarray, str, str]]) -> np.ndarray:
    """One row of images framed by kind (query blue, helpful green, harmful red) with two-line captions below
    each, as an [H, W, 3] uint8 array."""
    from PIL import Image, ImageDraw, ImageFont

    width = len(tiles) * (_TILE + 4) + 4
    canvas = Image.new("RGB", (width, _TILE + _CAPTION + 8), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for n, (image, caption, kind) in enumerate(tiles):
        picture = Image.fromarray((image * 255).round().astype(np.uint8)).resize((_TILE, _TILE), Image.NEAREST)
        left = 4 + n * (_TILE + 4)
        canvas.paste(picture, (left, 4))
        draw.rectangle((left - 2, 2, left + _TILE + 1, _TILE + 5), outline=_FRAME[kind], width=2)
        draw.multiline_text((left, _TILE + 6), caption, fill="black", font=font, spacing=2)
    return np.asarray(canvas)


def query_grid(report: QueryReport, query_input: Any, train: dict[int, tuple[Any, str]], limit: int = 6) -> np.ndarray | None:
    """The query beside its top helpful and harmful training images, captioned; None for non-image inputs."""
    query_image = as_image(query_input)
    if query_image is None:
        return None
    tiles = [(query_image, f"query #{report.query_index}\nlabel {report.label}", "query")]
    for kind in ("helpful", "harmful"):
        for row in [r for r in report.rows if r.kind == kind][:limit]:
            image = as_image(train[row.train_index][0])
            if image is None:
                return None
            sign = "+" if kind == "helpful" else "-"
            tiles.append((image, f"{sign}#{row.train_index} y={row.label}\n{row.score:.2e}", kind))
    return image_grid(tiles)


def self_influence_grid(rows: Sequence[Row], train: dict[int, tuple[Any, str]], limit: int = 10) -> np.ndarray | None:
    """The training images of highest self-influence with their (possibly wrong) labels; None if not images."""
    tiles = []
    for row in rows[:limit]:
        image = as_image(train[row.train_index][0])
        if image is None:
            return None
        tiles.append((image, f"#{row.train_index} y={row.label}\n{row.score:.2e}", "harmful"))
    return image_grid(tiles) if tiles else None


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def scalars(result: InfluenceResult) -> dict[str, float]:
    """Numbers worth plotting: time taken, solver convergence, sizes, largest self-influence."""
    meta = result.metadata
    values: dict[str, Any] = {
        "num_train": result.num_train,
        "num_queries": result.num_queries,
        "total_seconds": meta.get("timings", {}).get("total_seconds"),
    }
    for key in ("max_relative_residual", "iterations", "min_eigenvalue"):
        values[key] = meta.get("convergence", {}).get(key)
    if result.self_influence is not None:
        values["self_influence_max"] = float(torch.as_tensor(result.self_influence).max())
    return {f"{TAG}/{k}": float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def write_reports(
    result: InfluenceResult,
    *,
    train_data: IndexedData,
    query_data: IndexedData,
    top_k: int,
    folder: str | Path,
    loggers: Sequence[Any] = (),
    step: int = 0,
) -> Path:
    """Write the report into `folder` and to each logger (what it supports); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    reports, self_rows, train, queries = build_tables(result, train_data, query_data, top_k)
    grids = {r.position: query_grid(r, queries[r.query_index][0], train) for r in reports}
    self_grid = self_influence_grid(self_rows, train)

    sections = [settings_markdown(result), *(query_markdown(r) for r in reports),
                self_influence_markdown(self_rows) if self_rows else ""]
    markdown = "\n\n".join(section for section in sections if section)
    atomic_write_text(folder / "influence.md", markdown + "\n")
    atomic_write_text(folder / "top_influence.csv", _csv(
        ["query", "query_index", "query_label", "kind", "rank", "train_index", "train_label", "score"],
        ([r.position, r.query_index, r.label, row.kind, row.rank, row.train_index, row.label, repr(row.score)]
         for r in reports for row in r.rows)))
    if self_rows:
        atomic_write_text(folder / "self_influence.csv", _csv(
            ["rank", "train_index", "train_label", "self_influence"],
            ([row.rank, row.train_index, row.label, repr(row.score)] for row in self_rows)))
    for position, grid in grids.items():
        if grid is not None:
            atomic_write_bytes(folder / f"query_{position:03d}.png", _png(grid))
    if self_grid is not None:
        atomic_write_bytes(folder / "self_influence.png", _png(self_grid))

    numbers = scalars(result)
    for logger in loggers:
        _report_to_logger(logger, result, reports, self_rows, grids, self_grid, numbers, step)
    return folder


def _report_to_logger(
    logger: Any,
    result: InfluenceResult,
    reports: Sequence[QueryReport],
    self_rows: Sequence[Row],
    grids: dict[int, np.ndarray | None],
    self_grid: np.ndarray | None,
    numbers: dict[str, float],
    step: int,
) -> None:
    name = type(logger).__name__
    try:
        if numbers and hasattr(logger, "log_metrics"):
            logger.log_metrics(numbers, step=step)
        experiment = getattr(logger, "experiment", None)
        if callable(getattr(experiment, "add_text", None)):
            if settings_markdown(result):
                experiment.add_text(f"{TAG}/settings", settings_markdown(result), step)
            for report in reports:
                experiment.add_text(f"{TAG}/query_{report.position:03d}", query_markdown(report), step)
            if self_rows:
                experiment.add_text(f"{TAG}/self_influence", self_influence_markdown(self_rows), step)
        if callable(getattr(experiment, "add_image", None)):
            for position, grid in grids.items():
                if grid is not None:
                    experiment.add_image(f"{TAG}/query_{position:03d}", grid, step, dataformats="HWC")
            if self_grid is not None:
                experiment.add_image(f"{TAG}/self_influence", self_grid, step, dataformats="HWC")
        if callable(getattr(experiment, "add_histogram", None)):
            experiment.add_histogram(f"{TAG}/scores", torch.as_tensor(result.scores).flatten(), step)
            if result.self_influence is not None:
                experiment.add_histogram(f"{TAG}/self_influence", torch.as_tensor(result.self_influence), step)
        if callable(getattr(experiment, "flush", None)):
            experiment.flush()
        if callable(getattr(logger, "save", None)):
            logger.save()
    except Exception as error:  # a report must never break the run
        warn_user(f"Could not write the influence report to the {name}: {type(error).__name__}: {error}")
