"""`InfluenceResult`: influence scores tied to dataset indices, saved and loaded as one folder.

A saved result is a folder of `.npy` arrays (memory-mapped on load) and `metadata.json`. The folder is written
beside its final place and swapped in whole, so a crash never leaves a half-written result that loads, and
never destroys the previous complete one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_influence.storage.files import (
    atomic_save_array,
    atomic_write_json,
    load_array,
    read_json,
    replace_folder,
    staging_folder,
    tensor_digest,
)
from lightning_influence.engine.functional import compute_influences_up
from lightning_influence.model.twice_differentiable import TwiceDifferentiable, check_finite

#: Bumped whenever the folder layout changes; a folder with another version is refused on load.
FORMAT_VERSION = 2
METADATA_FILE = "metadata.json"
_ARRAYS = ("scores", "query_indices", "train_indices", "factors", "self_influence", "perturbation")


class TopK(NamedTuple):
    """The `k` chosen training examples: their dataset `indices` and their `scores`, best first."""

    indices: Tensor
    scores: Tensor


def parameter_digest(model: TwiceDifferentiable) -> str:
    """A hash of the weights the influence depends on: every parameter and buffer of the module, bit-exact."""
    module = model.module
    named = [(f"param:{n}", p) for n, p in module.named_parameters()]
    named += [(f"buffer:{n}", b) for n, b in module.named_buffers()]
    return tensor_digest([("selected:" + ",".join(model.param_names), torch.zeros(0))] + named)


def projection_metadata(model: TwiceDifferentiable) -> dict[str, Any] | None:
    """What reproduces the model's gradient projection (`Projection.describe`), None without one."""
    return None if model.projection is None else model.projection.describe()


def _projection_label(projection: dict[str, Any] | None) -> str:
    """A projection's metadata in a few words, for messages."""
    if projection is None:
        return "none"
    return f"{projection['kind']}, projection_dim={projection['dim_per_layer']}, seed={projection['seed']}"


@dataclass
class InfluenceResult:
    """Influence of N training examples on M queries.

    Attributes:
        scores: I_up [M, N]; positive means the training example helped the query (see DESIGN conventions).
        query_indices: dataset index of each query (row), [M].
        train_indices: dataset index of each training example (column), [N].
        factors: influence factors s_test = (H + λI)⁻¹ ∇θ ℓ(z_test), [M, p]; `score` reuses them.
        self_influence: ⟨(H + λI)⁻¹ ∇θ ℓ(zᵢ), ∇θ ℓ(zᵢ)⟩ per training example, [N], or None.
        metadata: method, options, λ, N, M, parameter names, the loss, each stage's convergence (``stages``),
            whether the result can be trusted (``trustworthy``, ``warnings``), timings, versions.
        perturbation: I_pert [M, N, *input_shape] when influence_type was 'perturbation', else None.

    Indices are positions in the datasets the run was given (see `IndexedData`), not in a dataset they wrap.
    """

    scores: Tensor
    query_indices: Tensor
    train_indices: Tensor
    factors: Tensor
    self_influence: Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    perturbation: Tensor | None = None

    def __post_init__(self) -> None:
        m, n = self.num_queries, self.num_train
        if self.scores.ndim != 2:
            raise ValueError(f"scores must be [M, N], got shape {tuple(self.scores.shape)}.")
        checks = [
            ("query_indices", self.query_indices, (m,)),
            ("train_indices", self.train_indices, (n,)),
            ("factors", self.factors, (m, self.factors.shape[-1] if self.factors.ndim else -1)),
        ]
        if self.self_influence is not None:
            checks.append(("self_influence", self.self_influence, (n,)))
        if self.perturbation is not None:
            checks.append(("perturbation", self.perturbation, (m, n, *self.perturbation.shape[2:])))
        for name, tensor, shape in checks:
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} to match scores [M={m}, N={n}], got "
                                 f"{tuple(tensor.shape)}.")

    @property
    def trustworthy(self) -> bool:
        """False when a stage did not converge or gave values beyond what its inputs allow (see `warnings`)."""
        return bool(self.metadata.get("trustworthy", True))

    @property
    def warnings(self) -> list[str]:
        """Why the result is not trustworthy, one sentence per problem; empty when it is."""
        return list(self.metadata.get("warnings", []))

    @property
    def num_queries(self) -> int:
        return int(self.scores.shape[0])

    @property
    def num_train(self) -> int:
        return int(self.scores.shape[1])

    # -- questions ----------------------------------------------------------------------------------------
    def _query_row(self, query: int) -> Tensor:
        if isinstance(query, bool) or not isinstance(query, int) or not -self.num_queries <= query < self.num_queries:
            raise IndexError(
                f"query must be a query position in [0, {self.num_queries}) (row of scores; its dataset index is "
                f"query_indices[query]), got {query!r}."
            )
        return self.scores[query]

    def _check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_train:
            raise ValueError(f"k must be an integer in [1, N={self.num_train}], got {k!r}.")
        return k

    def _top(self, values: Tensor, k: int, largest: bool) -> TopK:
        top = torch.as_tensor(values).topk(self._check_k(k), largest=largest)
        return TopK(self.train_indices[top.indices].clone(), top.values.clone())

    def top_helpful(self, query: int, k: int = 5) -> TopK:
        """The k training examples with the largest positive influence on query position `query`."""
        return self._top(self._query_row(query), k, largest=True)

    def top_harmful(self, query: int, k: int = 5) -> TopK:
        """The k training examples with the most negative influence on query position `query`."""
        return self._top(self._query_row(query), k, largest=False)

    def top_self_influence(self, k: int = 10) -> TopK:
        """The k training examples with the highest self-influence (outliers, likely mislabelled)."""
        if self.self_influence is None:
            raise ValueError("This result has no self-influence; compute it with self_influence=True.")
        return self._top(self.self_influence, k, largest=True)

    def score(self, model: TwiceDifferentiable, data: Iterable[Any], *, progress: bool = False) -> Tensor:
        """Influence [M, N_new] of new training batches on the saved queries, reusing the saved factors.

        `model` must be the model the result was computed with (same weights, parameter selection, loss and
        projection); this is checked against the saved metadata, since factors of other weights, another loss or
        another projection give wrong numbers.
        """
        if not isinstance(model, TwiceDifferentiable):
            raise TypeError(
                f"model must be a TwiceDifferentiable, got {type(model).__name__}; wrap the module as "
                "TwiceDifferentiable(module, loss_fn, params=result.metadata['parameter_names'])."
            )
        self._check_model(model)
        return compute_influences_up(model, data, self.factors, progress=progress)

    def _check_model(self, model: TwiceDifferentiable) -> None:
        """Refuse a model whose parameter selection, weights, loss or projection differ from the saved ones."""
        names = self.metadata.get("parameter_names")
        if names is not None and list(names) != model.param_names:
            raise ValueError(
                f"The model's parameter selection {model.param_names} differs from the saved one {names}; wrap "
                "the module with params=result.metadata['parameter_names']."
            )
        saved = self.metadata.get("fingerprint", {}).get("parameters")
        if saved is not None and saved != parameter_digest(model):
            raise ValueError(
                "The model's weights differ from the weights this result was computed with (parameter hash "
                "mismatch); saved factors only score data for the same weights. Load the same checkpoint."
            )
        loss = self.metadata.get("loss")
        if loss is not None and loss != model.loss_name:
            raise ValueError(
                f"The model's loss {model.loss_name!r} differs from the loss this result was computed with ({loss!r}); "
                "saved factors only score data for the same loss. Wrap the module with that loss_fn."
            )
        saved_projection, projection = self.metadata.get("projection"), projection_metadata(model)
        if saved_projection != projection:
            raise ValueError(
                f"The model's gradient projection ({_projection_label(projection)}) differs from the one this result "
                f"was computed with ({_projection_label(saved_projection)}); saved factors only score gradients "
                "projected the same way. Wrap the module with the saved projection_dim, projection_seed and "
                "projection (result.metadata['projection'])."
            )

    # -- storage ------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the result to folder `path` (created or replaced as a whole); returns the path. Non-finite
        values are refused (NonFiniteError naming the array), so no saved result holds NaN or Inf."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_folder(target)
        try:
            stored = []
            for name in _ARRAYS:
                value = getattr(self, name)
                if value is not None:
                    check_finite(torch.as_tensor(value), f"the result's {name}")
                    atomic_save_array(staging / f"{name}.npy", value)
                    stored.append(name)
            metadata = {**self.metadata, "format_version": FORMAT_VERSION, "arrays": stored, "complete": True}
            atomic_write_json(staging / METADATA_FILE, metadata)
            replace_folder(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, mmap: bool = True) -> InfluenceResult:
        """Read a folder written by `save`; large arrays are memory-mapped unless `mmap=False`.

        `path` may also be the `save_dir` given to the callback or `compute_influence`, which holds the result in
        its `result/` folder.
        """
        folder = Path(path)
        if not (folder / METADATA_FILE).is_file() and (folder / "result" / METADATA_FILE).is_file():
            folder = folder / "result"
        meta_path = folder / METADATA_FILE
        if not meta_path.is_file():
            partial = (folder / "partial").is_dir() or (folder.parent / "partial").is_dir()
            hint = (
                " It holds an unfinished run: rerun the computation with the same arguments to resume it."
                if partial
                else ""
            )
            raise FileNotFoundError(f"No complete influence result in {str(folder)!r} (no {METADATA_FILE}).{hint}")
        metadata = read_json(meta_path)
        if not isinstance(metadata, dict) or metadata.get("complete") is not True:
            raise ValueError(f"The result in {str(folder)!r} is not marked complete; it cannot be loaded.")
        version = metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"The result in {str(folder)!r} has format version {version!r}, this lightning_influence reads "
                f"version {FORMAT_VERSION}; recompute it or load it with the version that wrote it "
                f"({metadata.get('versions', {}).get('lightning_influence', 'unknown')})."
            )
        arrays: dict[str, Tensor | None] = {name: None for name in _ARRAYS}
        for name in metadata.get("arrays", []):
            if name not in arrays:
                raise ValueError(f"Unknown array {name!r} listed in {meta_path}.")
            arrays[name] = load_array(folder / f"{name}.npy", mmap=mmap)
        for name in ("scores", "query_indices", "train_indices", "factors"):
            if arrays[name] is None:
                raise ValueError(f"The result in {str(folder)!r} lacks {name}.npy; it is damaged.")
        for name in ("complete", "arrays", "format_version"):
            metadata.pop(name, None)
        return cls(metadata=metadata, **arrays)  # type: ignore[arg-type]
