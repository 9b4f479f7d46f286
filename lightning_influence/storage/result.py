"""`InfluenceResult`: influence scores tied to dataset indices, saved and loaded as one folder.

A saved result is a folder of `.npy` arrays (memory-mapped on load) and `metadata.json`, and, when the run kept a
gradient store, the fitted solver's state in `solver/` (`Solver.state_dict`). The folder is written beside its
final place and swapped in whole, so a crash never leaves a half-written result that loads, and never destroys
the previous complete one.
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

from lightning_influence.curvature.operator import CurvatureOperator
from lightning_influence.engine.functional import compute_influences_up
from lightning_influence.engine.low_rank import rank_structure, truncated_factors
from lightning_influence.engine.scoring import stacked_gradients
from lightning_influence.model.data import IndexedData
from lightning_influence.model.twice_differentiable import TwiceDifferentiable, check_finite
from lightning_influence.solvers import Solver
from lightning_influence.storage.chunks import check_model, parameter_digest  # parameter_digest: re-exported
from lightning_influence.storage.files import (
    atomic_save_array,
    atomic_write_json,
    load_array,
    load_tree,
    read_json,
    replace_folder,
    save_tree,
    staging_folder,
)
from lightning_influence.storage.gradient_store import GradientStore

#: Bumped whenever the folder layout changes; a folder of a version not in READABLE_VERSIONS is refused on load.
#: Version 3 added the solver's state (`solver/`) and the gradient store's place (metadata "gradient_store").
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
SOLVER_FOLDER = "solver"
METADATA_FILE = "metadata.json"
_ARRAYS = ("scores", "query_indices", "train_indices", "factors", "self_influence", "perturbation")


class TopK(NamedTuple):
    """The `k` chosen training examples: their dataset `indices` and their `scores`, best first (for several
    queries at once, [M, k] each: one row per query)."""

    indices: Tensor
    scores: Tensor


class QueryScores(NamedTuple):
    """Influence on new queries (`InfluenceResult.score_queries`): `scores` [M', N] (columns as the result's
    `train_indices`), their `factors` (H + λI)⁻¹ ∇θ ℓ(z_query) [M', d], and per query the `top_k` most `helpful`
    and most `harmful` training examples ([M', k] each)."""

    scores: Tensor
    factors: Tensor
    helpful: TopK
    harmful: TopK


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
        solver_state: the fitted solver's `state_dict` when the run kept a gradient store (`score_queries`
            solves with it), else None.
        folder: where the result was saved or loaded from (None before it is saved).

    Indices are positions in the datasets the run was given (see `IndexedData`), not in a dataset they wrap.
    """

    scores: Tensor
    query_indices: Tensor
    train_indices: Tensor
    factors: Tensor
    self_influence: Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    perturbation: Tensor | None = None
    solver_state: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    folder: Path | None = field(default=None, repr=False, compare=False)

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
        """Influence [M, N_new] of new training batches on the saved queries, reusing the saved factors (cut to the
        saved ``query_rank`` where the run had one, as its scores were).

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
        return compute_influences_up(model, data, self.factors, progress=progress,
                                     query_rank=self.metadata.get("query_rank"))

    def score_queries(
        self,
        model: TwiceDifferentiable,
        query_data: Iterable[Any],
        *,
        top_k: int = 5,
        training_data: Iterable[Any] | IndexedData | None = None,
        store: str | os.PathLike[str] | GradientStore | None = None,
        progress: bool = False,
    ) -> QueryScores:
        """Influence [M', N] of the training examples on new queries, without a pass over the training data.

        The gradients of the queries in `query_data` (batches, as for `score`) are solved with the saved solver,
        s = (H + λI)⁻¹ ∇θ ℓ(z_query), and scored against the training gradients of the gradient store kept with
        the result (a run with ``store_gradients=True``; or `store`: a folder or a `GradientStore`), ⟨s, gᵢ⟩.
        `model` must be the model of the run (same weights, parameters, loss and gradient space; checked). Methods
        that solve from their fitted tensors (direct, ekfac, nystroem, arnoldi with ``refine=0``) need nothing
        more; cg, lissa and ``refine > 0`` make curvature passes while solving, over `training_data`: batches of
        the examples the curvature was fitted on, or an `IndexedData` of the training set (read at the result's
        `train_indices`). With the run's ``query_rank``, the new factors are cut to it as the run's were.
        """
        if not isinstance(model, TwiceDifferentiable):
            raise TypeError(
                f"model must be a TwiceDifferentiable, got {type(model).__name__}; wrap the module as "
                "TwiceDifferentiable(module, loss_fn, params=result.metadata['parameter_names'])."
            )
        self._check_model(model)
        k = self._check_k(top_k)
        gradients = self._gradient_store(store)
        gradients.check_model(model)
        if not torch.equal(gradients.train_indices, self.train_indices.to(torch.long)):
            raise ValueError(
                f"The gradient store in {str(gradients.folder)!r} holds other training examples (N="
                f"{gradients.num_train}) than this result's columns (N={self.num_train}); pass the store built "
                "for this result's training data."
            )
        solver = self._saved_solver(model, training_data)
        with model.evaluating():
            queries = stacked_gradients(model, query_data, name="query_data", progress=progress)
            factors = solver.solve(queries).x
            rank = self.metadata.get("query_rank")
            if rank is not None:  # as the run scored: each layer block cut to rank r
                factors = truncated_factors(rank_structure(model), factors, rank)
        scores = gradients.scores(factors)
        return QueryScores(scores, factors, self._top(scores, k, largest=True), self._top(scores, k, largest=False))

    def _gradient_store(self, store: str | os.PathLike[str] | GradientStore | None) -> GradientStore:
        """`store`, or the gradient store saved with this result."""
        if isinstance(store, GradientStore):
            return store
        if store is None:
            place = self.metadata.get("gradient_store")
            if place is None or self.folder is None:
                raise FileNotFoundError(
                    "This result has no gradient store. Run again with store_gradients=True (the finished run is "
                    "reused and the store added), or build one with GradientStore.build(model, training_data, path) "
                    "and pass store=path."
                )
            store = self.folder / place["path"]
        return GradientStore.open(store)

    def _saved_solver(self, model: TwiceDifferentiable, training_data: Iterable[Any] | IndexedData | None) -> Solver:
        """The run's fitted solver, restored from `solver_state`, with an operator over `training_data` (if any)."""
        state = self.solver_state
        if state is None:
            raise ValueError(
                "This result has no saved solver state (it was computed without store_gradients=True), so new "
                "queries cannot be solved. Run again with store_gradients=True: the finished run is reused and only "
                "the curvature fit is repeated."
            )
        batches = training_data
        if isinstance(training_data, IndexedData):
            batches = training_data.loader(self.train_indices.tolist(), int(self.metadata.get("batch_size", 64)))
        operator = CurvatureOperator(model, batches if batches is not None else [], curvature=state["curvature"],
                                     block_diagonal=state["block_diagonal"])
        solver = Solver.from_state_dict(state, operator)
        if solver.collective_solve and training_data is None:
            refine = state["options"].get("refine")
            method = f"{state['method']} with refine={refine}" if refine else state["method"]
            raise ValueError(
                f"The saved solver ({method}) solves with curvature products over the training data, which the "
                "gradient store does not hold: pass training_data= (batches of the examples the curvature was "
                "fitted on, or an IndexedData of the training set). Methods that solve from their fitted tensors "
                "alone need none: direct, ekfac, nystroem, or arnoldi, with refine=0."
            )
        return solver

    def _check_model(self, model: TwiceDifferentiable) -> None:
        """Refuse a model whose parameter selection, weights, loss or projection differ from the saved ones."""
        check_model(self.metadata, model, "this result")

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
            if self.solver_state is not None:
                save_tree(staging / SOLVER_FOLDER, self.solver_state)
            metadata = {**self.metadata, "format_version": FORMAT_VERSION, "arrays": stored, "complete": True}
            atomic_write_json(staging / METADATA_FILE, metadata)
            replace_folder(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        self.folder = target
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
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"The result in {str(folder)!r} has format version {version!r}, this lightning_influence reads "
                f"versions {list(READABLE_VERSIONS)}; recompute it or load it with the version that wrote it "
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
        solver = folder / SOLVER_FOLDER
        state = load_tree(solver) if solver.is_dir() else None
        return cls(metadata=metadata, solver_state=state, folder=folder, **arrays)  # type: ignore[arg-type]
