"""Each logger gets what it can show, through its own API, and a logger that fails is warned about, never raised.

- every logger with `log_metrics` (all of Lightning's): the scalars;
- an `experiment` with `add_text` / `add_image` / `add_histogram` / `add_scalar` (TensorBoard's SummaryWriter):
  tables as text, grids as images, histograms, and the self-influence-by-rank series;
- a W&B run (`wandb` installed): tables as `wandb.Table`, grids as `wandb.Image`;
- an MLflow client with the logger's `run_id` (`mlflow` installed): the report's files as artifacts (the tables,
  grids and `influence.md`; not the dashboard's `examples/` store) and the tables through `log_table`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from lightning_influence.errors import warn_user


@dataclass
class Summaries:
    """Everything a report sends to loggers, keyed by tag."""

    step: int
    scalars: dict[str, float]
    series: dict[str, list[float]]  # values at steps 1, 2, … (ranks)
    texts: dict[str, str]
    images: dict[str, np.ndarray]
    captions: dict[str, str]  # per image tag
    histograms: dict[str, Tensor]
    tables: dict[str, tuple[Sequence[str], list[list[Any]]]]  # tag → (columns, rows)
    folder: Path


def _from(experiment: Any, package: str) -> bool:
    return type(experiment).__module__.split(".")[0] == package


def _tensorboard(experiment: Any, summaries: Summaries) -> None:
    step = summaries.step
    if callable(getattr(experiment, "add_text", None)):
        for tag, text in summaries.texts.items():
            experiment.add_text(tag, text, step)
    if callable(getattr(experiment, "add_image", None)):
        for tag, image in summaries.images.items():
            experiment.add_image(tag, image, step, dataformats="HWC")
    if callable(getattr(experiment, "add_histogram", None)):
        for tag, values in summaries.histograms.items():
            experiment.add_histogram(tag, values, step)
    if callable(getattr(experiment, "add_scalar", None)):
        for tag, values in summaries.series.items():
            for rank, value in enumerate(values, start=1):
                experiment.add_scalar(tag, value, rank)
    if callable(getattr(experiment, "flush", None)):
        experiment.flush()


def _wandb(run: Any, summaries: Summaries) -> None:
    import wandb

    payload: dict[str, Any] = {tag: wandb.Table(columns=list(columns), data=rows)
                               for tag, (columns, rows) in summaries.tables.items()}
    payload.update({tag: wandb.Image(image, caption=summaries.captions.get(tag))
                    for tag, image in summaries.images.items()})
    run.log(payload)


def _mlflow(client: Any, run_id: str, summaries: Summaries) -> None:
    for path in sorted(summaries.folder.iterdir()):
        if path.is_file():
            client.log_artifact(run_id, str(path), artifact_path="influence_report")
    for tag, (columns, rows) in summaries.tables.items():
        data = {column: [row[n] for row in rows] for n, column in enumerate(columns)}
        client.log_table(run_id, data=data, artifact_file=f"{tag}.json")


def send(logger: Any, summaries: Summaries) -> None:
    """Give `logger` what it supports; warn (never raise) when it fails."""
    try:
        if summaries.scalars and callable(getattr(logger, "log_metrics", None)):
            logger.log_metrics(summaries.scalars, step=summaries.step)
        experiment = getattr(logger, "experiment", None)
        if _from(experiment, "wandb"):
            _wandb(experiment, summaries)
        elif _from(experiment, "mlflow") and isinstance(getattr(logger, "run_id", None), str):
            _mlflow(experiment, logger.run_id, summaries)
        else:
            _tensorboard(experiment, summaries)
        if callable(getattr(logger, "save", None)):
            logger.save()
    except Exception as error:  # a report must never break the run
        warn_user(f"Could not write the influence report to the {type(logger).__name__}: "
                  f"{type(error).__name__}: {error}")
