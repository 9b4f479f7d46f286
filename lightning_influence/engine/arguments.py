"""`InfluenceArguments`: every choice that decides the numbers of an influence run, checked once.

One frozen object holds the inversion method and its options, λ, the curvature options, the memory budget,
the chunking, and what to do with a stage that did not converge. It is validated when it is built (so a
Lightning callback fails at construction, not after training), handed unchanged down the engine, and its
`to_dict()` is written into the result's metadata and compared when a run is resumed or a result reused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Literal

from lightning_influence.checks import (
    STORE_DTYPES,
    CurvatureChoice,
    StoreDtype,
    check_curvature,
    check_regularization,
    flag,
    non_negative_int,
    one_of,
    parse_memory,
    positive_int,
)
from lightning_influence.enums import InfluenceType, InversionMethod
from lightning_influence.solvers import make_solver

#: What `on_negative_curvature` accepts (see `Solver.fit`).
NEGATIVE_CURVATURE_ACTIONS = ("warn", "raise")


#: What a run does with a stage that did not converge (`InfluenceArguments.on_unconverged`).
OnUnconverged = Literal["raise", "warn", "ignore"]
ON_UNCONVERGED: tuple[str, ...] = ("raise", "warn", "ignore")


@dataclass(frozen=True)
class InfluenceArguments:
    """The options of one influence computation.

    Attributes:
        method: the inversion method (``direct``, ``cg``, ``lissa``, ``arnoldi``, ``ekfac``, ``nystroem``), or
            ``"auto"``: chosen when the curvature is fitted (see `lightning_influence.engine.defaults`).
        method_kwargs: the method's options, e.g. ``{"rank": 50}``; stored with every default filled in. Empty
            with ``method="auto"``, which chooses the options too.
        hessian_regularization: λ ≥ 0 in (H + λI), or ``"auto"`` (a tenth of the mean eigenvalue of the
            curvature, `auto_regularization`).
        curvature: ``"hessian"``, ``"ggn"`` (Gauss–Newton, positive semi-definite), or ``"auto"`` (the Hessian
            where H + λI is found positive definite, else the Gauss–Newton matrix).
        block_diagonal: keep only the per-layer blocks of the curvature.
        influence_type: ``"up"`` ([M, N] scores) or ``"perturbation"`` (also ∇ₓ of them).
        self_influence: also compute ⟨(H + λI)⁻¹ ∇ℓ(zᵢ), ∇ℓ(zᵢ)⟩ for every training example.
        batch_size: examples per batch in every pass over the data.
        chunk_batches: batches per stored chunk of scores (the unit of resuming).
        max_memory: bytes (or a string such as ``"2GB"``) for the per-example values held at once; None: the
            model's own budget (see `TwiceDifferentiable`).
        on_unconverged: what a run does when a stage did not converge or gave values beyond what its inputs allow
            (see `lightning_influence.engine.trust`): ``"raise"`` a `ConvergenceError` before saving anything,
            ``"warn"`` and save the result marked untrustworthy, or ``"ignore"`` (still marked). It decides what
            is saved, not the numbers, so it is not part of a run's identity.
        on_negative_curvature: ``"warn"`` or ``"raise"`` (`IndefiniteCurvatureError`) where H + λI is found not
            positive definite; either way no iterative solve goes on once it has met such a direction.
        curvature_samples: fit the curvature on this many training examples, drawn at random (seeded by
            `curvature_seed`), and score all of them; None (or at least N): on every training example.
        curvature_seed: the seed of that draw.
        query_rank: score with each layer's block of every influence factor cut to its best rank-r approximation
            (`lightning_influence.engine.low_rank`), never forming the block or a per-example gradient; needs every
            selected parameter in a layer that `LayerStructure` covers. None: the full factors.
        store_gradients: also write the per-example training gradients to a gradient store (``save_dir/gradients``)
            and keep the fitted solver's state with the result, so that `InfluenceResult.score_queries` scores new
            queries without a pass over the training data. Like `self_influence`, a finished run can add it.
        store_dtype: the element type of the stored gradients: ``"float32"``, ``"float16"``, ``"bfloat16"`` (half
            the size, about 3 or 2 significant digits) or ``"float64"``.
    """

    method: InversionMethod | str = "cg"
    method_kwargs: Mapping[str, Any] = field(default_factory=dict)
    hessian_regularization: float | str = 0.0
    curvature: CurvatureChoice = "hessian"
    block_diagonal: bool = False
    influence_type: InfluenceType | str = "up"
    self_influence: bool = False
    batch_size: int = 64
    chunk_batches: int = 8
    max_memory: int | str | None = None
    on_unconverged: OnUnconverged = "warn"
    on_negative_curvature: str = "warn"
    curvature_samples: int | None = None
    curvature_seed: int = 0
    query_rank: int | None = None
    store_gradients: bool = False
    store_dtype: StoreDtype = "float32"

    def __post_init__(self) -> None:
        method = "auto" if self.method == "auto" else InversionMethod.parse(self.method)
        if not isinstance(self.method_kwargs, Mapping):
            raise TypeError(f"method_kwargs must be a dict of the method's options, got {self.method_kwargs!r}.")
        if method == "auto" and self.method_kwargs:
            raise ValueError(
                f"method='auto' chooses the method and its options; method_kwargs={dict(self.method_kwargs)!r} need "
                "an explicit method (direct, cg, lissa, arnoldi, ekfac or nystroem)."
            )
        options = {} if method == "auto" else make_solver(method, **self.method_kwargs).options  # defaults filled
        checked = {
            "method": method,
            "method_kwargs": MappingProxyType(options),
            "hessian_regularization": check_regularization(self.hessian_regularization),
            "curvature": check_curvature(self.curvature),
            "block_diagonal": flag("block_diagonal", self.block_diagonal),
            "influence_type": InfluenceType.parse(self.influence_type),
            "self_influence": flag("self_influence", self.self_influence),
            "batch_size": positive_int("batch_size", self.batch_size),
            "chunk_batches": positive_int("chunk_batches", self.chunk_batches),
            "max_memory": parse_memory(self.max_memory),
            "on_unconverged": one_of("on_unconverged", self.on_unconverged, ON_UNCONVERGED),
            "on_negative_curvature": one_of("on_negative_curvature", self.on_negative_curvature,
                                            NEGATIVE_CURVATURE_ACTIONS),
            "curvature_samples": positive_int("curvature_samples", self.curvature_samples, allow_none=True),
            "curvature_seed": non_negative_int("curvature_seed", self.curvature_seed),
            "query_rank": positive_int("query_rank", self.query_rank, allow_none=True),
            "store_gradients": flag("store_gradients", self.store_gradients),
            "store_dtype": one_of("store_dtype", self.store_dtype, STORE_DTYPES),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def __reduce__(self) -> tuple[type[InfluenceArguments], tuple[Any, ...]]:
        """Pickled as its plain values (a read-only mapping does not pickle), rebuilt through the checks."""
        return type(self), tuple(self.to_dict().values())

    @property
    def chunk_size(self) -> int:
        """Training examples per stored chunk before any memory budget shrinks it."""
        return self.batch_size * self.chunk_batches

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values of every field, for the metadata and for comparing runs."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["method"], values["influence_type"] = str(self.method), self.influence_type.value
        values["method_kwargs"] = dict(self.method_kwargs)
        return values
