"""Chunked, resumable folders, and the digests that tell whether a folder (or a saved result) belongs to a run.

A `ChunkFolder` holds a manifest naming the run it belongs to and, per process, chunk files written atomically
and listed in that process's progress file once in place: a crash at any moment loses at most the chunk being
written, and a rerun of the same run continues from the finished chunks. A folder of another run is refused with
the differences named (`check_same_run`). The partial folder of a run (`storage.runs`) and the gradient store
(`storage.gradient_store`) are both chunk folders.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_influence.engine.distribution import Distribution
from lightning_influence.errors import ResultMismatchError
from lightning_influence.model.twice_differentiable import TwiceDifferentiable
from lightning_influence.storage.files import (
    atomic_save_array,
    atomic_write_json,
    load_array,
    read_json,
    tensor_digest,
    to_jsonable,
)

__all__ = [
    "ChunkFolder", "check_model", "check_same_run", "index_digest", "parameter_digest", "projection_metadata",
]


def parameter_digest(model: TwiceDifferentiable) -> str:
    """A hash of the weights the influence depends on: every parameter and buffer of the module, bit-exact."""
    module = model.module
    named = [(f"param:{n}", p) for n, p in module.named_parameters()]
    named += [(f"buffer:{n}", b) for n, b in module.named_buffers()]
    return tensor_digest([("selected:" + ",".join(model.param_names), torch.zeros(0))] + named)


def index_digest(indices: Sequence[int]) -> str:
    """A hash of a list of dataset indices, in order."""
    return tensor_digest([("indices", torch.tensor(list(indices), dtype=torch.long))])


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


def projection_metadata(model: TwiceDifferentiable) -> dict[str, Any] | None:
    """What reproduces the model's gradient projection (`Projection.describe`), None without one."""
    return None if model.projection is None else to_jsonable(model.projection.describe())


def _projection_label(projection: dict[str, Any] | None) -> str:
    """A projection's metadata in a few words, for messages."""
    if projection is None:
        return "none"
    return f"{projection['kind']}, projection_dim={projection['dim_per_layer']}, seed={projection['seed']}"


def check_model(saved: dict[str, Any], model: TwiceDifferentiable, what: str) -> None:
    """Refuse a model whose parameter selection, weights, loss or gradient projection differ from those `saved`
    (a metadata dict with ``parameter_names``, ``fingerprint.parameters``, ``loss`` and ``projection``) records;
    `what` names what was saved."""
    names = saved.get("parameter_names")
    if names is not None and list(names) != model.param_names:
        raise ValueError(
            f"The model's parameter selection {model.param_names} differs from the saved one {names}; wrap "
            "the module with params=result.metadata['parameter_names']."
        )
    digest = saved.get("fingerprint", {}).get("parameters")
    if digest is not None and digest != parameter_digest(model):
        raise ValueError(
            f"The model's weights differ from the weights {what} was computed with (parameter hash mismatch); "
            f"{what} only scores data for the same weights. Load the same checkpoint."
        )
    loss = saved.get("loss")
    if loss is not None and loss != model.loss_name:
        raise ValueError(
            f"The model's loss {model.loss_name!r} differs from the loss {what} was computed with ({loss!r}); "
            f"{what} only scores data for the same loss. Wrap the module with that loss_fn."
        )
    saved_projection, projection = saved.get("projection"), projection_metadata(model)
    if saved_projection != projection:
        raise ValueError(
            f"The model's gradient projection ({_projection_label(projection)}) differs from the one {what} was "
            f"computed with ({_projection_label(saved_projection)}); {what} only scores gradients projected the "
            "same way. Wrap the module with the saved projection_dim, projection_seed and projection "
            "(metadata['projection'])."
        )


class ChunkFolder:
    """A folder of per-process chunks: ``manifest.json`` (the run's identity, written by global rank zero and
    checked by every process) and ``rank{r}-of-{w}/`` with the chunk files and a ``progress.json`` listing the
    finished ones. A chunk counts as finished only once its file is in place (atomic rename) and listed."""

    def __init__(self, folder: Path, distribution: Distribution, identity: dict[str, Any],
                 header: dict[str, Any]) -> None:
        self.folder = folder
        self.distribution = distribution
        manifest = folder / "manifest.json"
        if distribution.is_global_zero and not manifest.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(manifest, {**header, "identity": identity})
        distribution.barrier()
        stored = read_json(manifest)
        check_same_run(stored.get("identity"), to_jsonable(identity), folder)
        self.rank_dir = folder / f"rank{distribution.rank}-of-{distribution.world_size}"
        self.rank_dir.mkdir(parents=True, exist_ok=True)
        self.progress_file = self.rank_dir / "progress.json"
        finished = read_json(self.progress_file)["finished"] if self.progress_file.is_file() else []
        self.finished = {(stage, int(chunk)) for stage, chunk in finished}

    def chunk_file(self, stage: str, chunk: int, rank_dir: Path | None = None) -> Path:
        """Where chunk `chunk` of `stage` lives (in this process's folder, or in `rank_dir`)."""
        return (rank_dir or self.rank_dir) / f"{stage}-{chunk:06d}.npy"

    def done(self, stage: str, chunk: int) -> bool:
        return (stage, chunk) in self.finished and self.chunk_file(stage, chunk).is_file()

    def save_chunk(self, stage: str, chunk: int, block: Tensor, record: dict[str, Any]) -> None:
        atomic_write_json(self.chunk_file(stage, chunk).with_suffix(".json"), to_jsonable(record))
        atomic_save_array(self.chunk_file(stage, chunk), block)
        self.finished.add((stage, chunk))
        atomic_write_json(self.progress_file, {"finished": sorted(self.finished)})

    def load_record(self, stage: str, chunk: int) -> dict[str, Any]:
        """The record stored with a finished chunk (written before the chunk itself)."""
        return read_json(self.chunk_file(stage, chunk).with_suffix(".json"))

    def load_stage(self, stage: str, num_chunks: int, axis: int) -> Tensor:
        blocks = [load_array(self.chunk_file(stage, chunk), mmap=False) for chunk in range(num_chunks)]
        return torch.cat(blocks, dim=axis)
