"""`GradientStore`: the per-example training gradients gᵢ = ∇θ ℓ(zᵢ) [N, d], written once and memory-mapped,
so that new queries are scored as ⟨s, gᵢ⟩ without another pass over the training data.

d is the length of the model's per-example gradients (`TwiceDifferentiable.gradient_dim`). The store is a
`ChunkFolder`: each process writes its shard of the training examples (`Distribution.shard`, as a run scores them)
chunk by chunk, each chunk an atomically written `.npy` file [≤ chunk_size, d] in the store's dtype, so that an
interrupted build resumes from its finished chunks. Gradients are computed in a stream
(`engine.scoring.gradient_blocks`) and never held all at once. The folder::

    path/
      manifest.json           the store's identity: weights, parameters, loss, gradient space, dtype, data, chunks
      rank{r}-of-{w}/         each process's shard: gradients-000000.npy, ... and progress.json
      store.json              written last, by global rank zero: the shape [N, d], the dtype and every shard's
                              dataset indices in storage order

Reading memory-maps the chunk files and puts every example in the global order of a result's columns: sorted by
dataset index. float16 keeps about 3 significant digits (unit roundoff u = 2⁻¹¹) and bfloat16 about 2 (u = 2⁻⁸):
each stored gᵢ is gᵢ(1 + ε) elementwise with |ε| ≤ u, so a score differs from the exact one by at most
u · Σⱼ |sⱼ gᵢⱼ|. float16 cannot hold magnitudes above 65,504; such gradients are refused with a clear error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_influence.checks import STORE_DTYPES, StoreDtype, one_of, positive_int
from lightning_influence.engine.distribution import Distribution
from lightning_influence.engine.scoring import gradient_blocks
from lightning_influence.model.data import IndexedData, progress_bar
from lightning_influence.model.twice_differentiable import TwiceDifferentiable
from lightning_influence.storage.chunks import (
    ChunkFolder, check_model, check_same_run, index_digest, parameter_digest, projection_metadata,
)
from lightning_influence.storage.files import atomic_write_json, load_array, read_json, to_jsonable

__all__ = ["GradientStore"]

#: Bumped whenever the store's layout changes; a store with another version is refused on open.
STORE_FORMAT_VERSION = 1
STORE_FILE = "store.json"
_STAGE = "gradients"
#: Bytes of gradients converted to the factors' dtype at once when scoring (a block of rows of one chunk).
SCORE_BLOCK_BYTES = 64 * 2**20


def _identity(model: TwiceDifferentiable, indices: Sequence[int], dtype: str, chunk_size: int,
              world_size: int) -> dict[str, Any]:
    """What makes two stores the same store."""
    return to_jsonable({
        "parameters": parameter_digest(model), "parameter_names": model.param_names, "loss": model.loss_name,
        "model_dtype": str(model.dtype), "gradient_dim": model.gradient_dim,
        "projection": projection_metadata(model), "store_dtype": dtype,
        "train_indices": index_digest(indices), "num_train": len(indices), "chunk_size": chunk_size,
        "world_size": world_size,
    })


def _encode(block: Tensor, dtype: str) -> Tensor:
    """`block` in the store's dtype, on the CPU (bfloat16 as its raw 16 bits: `.npy` has no bfloat16)."""
    encoded = block.detach().to(device="cpu", dtype=getattr(torch, dtype))
    if not bool(torch.isfinite(encoded).all()):
        largest = float(block.abs().max())
        raise ValueError(
            f"Training gradients of magnitude up to {largest:.3g} do not fit store_dtype={dtype!r} (largest "
            f"{torch.finfo(encoded.dtype).max:.5g}); store them in 'bfloat16' or 'float32'."
        )
    return encoded.view(torch.int16) if encoded.dtype == torch.bfloat16 else encoded


def _decode(array: Tensor, dtype: str) -> Tensor:
    return array.view(torch.bfloat16) if dtype == "bfloat16" else array


class GradientStore:
    """Per-example training gradients [N, d] on disk, memory-mapped; build with `build`, read with `open`.

    Attributes:
        folder: where the store lives.
        train_indices: the dataset index of each stored example [N], sorted: the column order of `scores`.
        dtype: the element type of the stored gradients ("float32", "float16", "bfloat16" or "float64").
        identity: the model fingerprint, parameters, loss, gradient space and data the store was built from.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = folder
        self.identity: dict[str, Any] = manifest["identity"]
        self.dtype: str = manifest["dtype"]
        self._shards: list[dict[str, Any]] = manifest["shards"]
        every = torch.tensor([i for shard in self._shards for i in shard["indices"]], dtype=torch.long)
        self.train_indices = every.sort().values
        self.num_train, self.dim = int(manifest["shape"][0]), int(manifest["shape"][1])

    # -- building -----------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: TwiceDifferentiable,
        training_data: IndexedData | Any,
        path: str | os.PathLike[str],
        *,
        dtype: StoreDtype = "float32",
        chunk_size: int = 1024,
        batch_size: int = 64,
        train_indices: Sequence[int] | None = None,
        distribution: Distribution | None = None,
        progress: bool = False,
    ) -> GradientStore:
        """Write the per-example gradients of `training_data` (an `IndexedData`, or a map-style Dataset or a
        DataLoader over one) at `train_indices` (None: all) to folder `path`, and open the store.

        Each process writes its shard in chunks of `chunk_size` examples, read `batch_size` at a time; a build
        interrupted at any point resumes from its finished chunks when called again with the same arguments, and a
        complete store of the same model and data is opened as it is. A folder holding another store is refused
        (`ResultMismatchError`, naming what differs). Collective under several processes.
        """
        if not isinstance(model, TwiceDifferentiable):
            raise TypeError(f"model must be a TwiceDifferentiable, got {type(model).__name__}; wrap the module as "
                            "TwiceDifferentiable(module, loss_fn).")
        data = training_data if isinstance(training_data, IndexedData) else IndexedData(training_data,
                                                                                        name="training_data")
        dtype = one_of("dtype", dtype, STORE_DTYPES)  # type: ignore[assignment]
        chunk_size, batch_size = positive_int("chunk_size", chunk_size), positive_int("batch_size", batch_size)
        indices = data.check_indices(train_indices, "train_indices")
        distribution = distribution if distribution is not None else Distribution()
        folder = Path(path)
        identity = _identity(model, indices, dtype, chunk_size, distribution.world_size)
        if (folder / STORE_FILE).is_file():
            store = cls.open(folder)
            check_same_run(store.identity, identity, folder)
            return store
        chunks = ChunkFolder(folder, distribution, identity, {"format_version": STORE_FORMAT_VERSION})
        shard = distribution.shard(indices)
        pieces = [shard[start : start + chunk_size] for start in range(0, len(shard), chunk_size)]
        with distribution.stage("gradient store"), model.evaluating():
            todo = [number for number in range(len(pieces)) if not chunks.done(_STAGE, number)]
            for number in progress_bar(todo, progress, "Influence: gradient store"):
                blocks = gradient_blocks(model, data.loader(pieces[number], batch_size), name="training_data")
                block = torch.cat(list(blocks))
                chunks.save_chunk(_STAGE, number, _encode(block, dtype), {"rows": len(pieces[number])})
        shards = distribution.gather_objects({"folder": chunks.rank_dir.name, "indices": shard, "chunks": len(pieces)})
        with distribution.stage("gradient store manifest"):
            if distribution.is_global_zero:
                atomic_write_json(folder / STORE_FILE, {
                    "format_version": STORE_FORMAT_VERSION, "identity": identity, "dtype": dtype,
                    "shape": [len(indices), model.gradient_dim], "shards": shards,
                })
        distribution.barrier()
        return cls.open(folder)

    # -- reading ------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> GradientStore:
        """The complete store in folder `path`; an unfinished or missing one is refused, saying what to do."""
        folder = Path(path)
        if not (folder / STORE_FILE).is_file():
            unfinished = (folder / "manifest.json").is_file()
            hint = (" It holds an unfinished build: run GradientStore.build (or the run with store_gradients=True) "
                    "again with the same arguments to resume it." if unfinished else
                    " Build one with GradientStore.build(model, training_data, path), or run the callback or "
                    "compute_influence with store_gradients=True.")
            raise FileNotFoundError(f"No complete gradient store in {str(folder)!r} (no {STORE_FILE}).{hint}")
        manifest = read_json(folder / STORE_FILE)
        if manifest.get("format_version") != STORE_FORMAT_VERSION:
            raise ValueError(f"The gradient store in {str(folder)!r} has format version "
                             f"{manifest.get('format_version')!r}; this version reads {STORE_FORMAT_VERSION}. "
                             "Build it again.")
        return cls(folder, manifest)

    def check_model(self, model: TwiceDifferentiable) -> None:
        """Refuse a model other than the one the store was built from: other weights, parameters, loss or
        projection (which together fix the gradients' length)."""
        saved = self.identity
        check_model({"parameter_names": saved["parameter_names"], "loss": saved["loss"],
                     "fingerprint": {"parameters": saved["parameters"]}, "projection": saved.get("projection")},
                    model, "the gradient store")

    def blocks(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(columns [b], gradients [b, d]) for blocks of stored examples in storage order: each example's position
        in `train_indices`, and its memory-mapped gradient in the store's dtype (`SCORE_BLOCK_BYTES` at most)."""
        rows = max(1, SCORE_BLOCK_BYTES // (8 * max(self.dim, 1)))
        for shard in self._shards:
            indices = torch.tensor(shard["indices"], dtype=torch.long)
            start = 0
            for number in range(shard["chunks"]):
                array = _decode(load_array(self.folder / shard["folder"] / f"{_STAGE}-{number:06d}.npy"), self.dtype)
                columns = torch.searchsorted(self.train_indices, indices[start : start + array.shape[0]])
                for offset in range(0, array.shape[0], rows):
                    yield columns[offset : offset + rows], array[offset : offset + rows]
                start += array.shape[0]

    def scores(self, factors: Tensor) -> Tensor:
        """⟨sₘ, gᵢ⟩ for every row sₘ of `factors` [M, d] and every stored example, [M, N] in the order of
        `train_indices`, computed in the factors' dtype block by block."""
        if factors.ndim != 2 or factors.shape[1] != self.dim:
            raise ValueError(f"factors must have shape [M, {self.dim}] (the store's gradient length), got "
                             f"{tuple(factors.shape)}.")
        result = factors.new_zeros(factors.shape[0], self.num_train)
        for columns, block in self.blocks():
            result[:, columns.to(factors.device)] = factors @ block.to(device=factors.device, dtype=factors.dtype).T
        return result

    def __repr__(self) -> str:
        return f"GradientStore({str(self.folder)!r}, N={self.num_train}, d={self.dim}, dtype={self.dtype})"

