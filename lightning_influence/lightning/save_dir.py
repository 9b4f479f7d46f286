"""Where a callback's run is saved when the user names no folder, and where it goes when that folder is taken.

Like Lightning's own callbacks, the default follows the logger: under a TensorBoard or CSV logger (whose log
dir is versioned on the filesystem) it is `<log_dir>/influence`; with no logger, or a logger that keeps its own
store (MLflow, W&B, …), it is `<default_root_dir>/influence/version_N`, never inside the other tool's store.
A folder that holds another run's result is left as it is: the new run goes to a fresh sibling folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

_VERSION = re.compile(r"version_(\d+)")


def default_save_dir(trainer: pl.Trainer) -> Path:
    """The run's default folder; the latest `version_N` under the root, so that a rerun of the same run
    resumes there (collective: every process must call it)."""
    if trainer.loggers and isinstance(trainer.loggers[0], (TensorBoardLogger, CSVLogger)):
        return Path(trainer.log_dir or ".") / "influence"
    root = Path(trainer.default_root_dir) / "influence"
    latest = max(_versions(root), default=0) if trainer.is_global_zero else 0
    return root / f"version_{trainer.strategy.broadcast(latest)}"


def fresh_sibling(trainer: pl.Trainer, folder: Path) -> Path:
    """A sibling of `folder` that does not exist yet: `version_{N+1}` (or later) beside a version folder, else
    `<name>_1`, `<name>_2`, …; chosen by global rank zero and shared (collective)."""
    match = _VERSION.fullmatch(folder.name)
    stem, number = ("version_", int(match[1]) + 1) if match else (f"{folder.name}_", 1)
    if trainer.is_global_zero:
        while (folder.parent / f"{stem}{number}").exists():
            number += 1
    return folder.parent / f"{stem}{trainer.strategy.broadcast(number)}"


def _versions(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return [int(match[1]) for path in root.iterdir() if (match := _VERSION.fullmatch(path.name)) and path.is_dir()]
