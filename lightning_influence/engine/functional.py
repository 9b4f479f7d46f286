"""The classic functional influence API (Koh & Liang 2017), on the engine's solvers and streamed scoring.

Conventions (every function): L(θ) = (1/N) Σᵢ ℓ(zᵢ, θ); H = ∇²L; s_test = (H + λI)⁻¹ ∇θ ℓ(z_test);
I_up(z_test, zᵢ) = ⟨s_test, ∇θ ℓ(zᵢ)⟩ (positive: zᵢ helped the query, and removing it is predicted to raise
the query's loss by I_up / N); I_pert(z_test, zᵢ) = ∇ₓ I_up.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from lightning_influence.checks import CurvatureChoice, positive_int
from lightning_influence.curvature.reducer import LocalReducer, Reducer
from lightning_influence.engine.arguments import InfluenceArguments
from lightning_influence.engine.distribution import Distribution
from lightning_influence.engine.defaults import self_influence_rows
from lightning_influence.engine.engine import InfluenceEngine
from lightning_influence.engine.low_rank import (
    check_layer_form,
    low_rank_factors,
    low_rank_scores,
    rank_structure,
    truncated_factors,
)
from lightning_influence.engine.scoring import perturbation_scores, self_influences, up_scores
from lightning_influence.enums import InfluenceType, InversionMethod
from lightning_influence.errors import InfluenceComputationError
from lightning_influence.model.data import subsample_loader
from lightning_influence.model.twice_differentiable import TwiceDifferentiable
from lightning_influence.solvers import InverseHvpResult, Solver

__all__ = [
    "compute_influence_factors",
    "compute_influences",
    "compute_influences_pert",
    "compute_influences_up",
    "compute_self_influences",
    "fit_solver",
]


def _engine(
    model: TwiceDifferentiable,
    training_data: Iterable[Any],
    inversion_method: str | InversionMethod,
    *,
    hessian_regularization: float | str,
    progress: bool,
    reducer: Reducer | None,
    method_kwargs: dict[str, Any],
    **run_options: Any,
) -> InfluenceEngine:
    """A one-process engine (its sums reduced by `reducer` when given) with the options checked; `run_options` are
    the other fields of `InfluenceArguments` (curvature, block_diagonal, on_negative_curvature, curvature_samples,
    curvature_seed). With `curvature_samples`, the curvature is fitted on that many examples of `training_data`."""
    arguments = InfluenceArguments(method=inversion_method, method_kwargs=method_kwargs,
                                   hessian_regularization=hessian_regularization, **run_options)
    curvature_data = subsample_loader(training_data, arguments.curvature_samples, arguments.curvature_seed)
    distribution = Distribution(reducer=reducer if reducer is not None else LocalReducer())
    return InfluenceEngine(model, curvature_data, arguments, distribution=distribution, progress=progress)


def fit_solver(
    model: TwiceDifferentiable,
    training_data: Iterable[Any],
    inversion_method: str | InversionMethod,
    *,
    hessian_regularization: float | str = 0.0,
    curvature: CurvatureChoice = "hessian",
    block_diagonal: bool = False,
    on_negative_curvature: str = "warn",
    curvature_samples: int | None = None,
    curvature_seed: int = 0,
    progress: bool = False,
    reducer: Reducer | None = None,
    **kwargs: Any,
) -> Solver:
    """A solver for (H + λI) over `training_data`, fitted once and ready to `solve` many right-hand sides.

    `curvature="ggn"` uses the Gauss–Newton matrix for H, `block_diagonal=True` only its per-layer blocks (see
    `CurvatureOperator`); ``"auto"`` values are resolved as for the callback (`engine.defaults`).
    `on_negative_curvature="raise"` makes an indefinite H + λI an error instead of a warning.
    `curvature_samples=k` fits on k examples of `training_data` (a DataLoader over a map-style dataset) drawn by
    `curvature_seed`. `kwargs` are the method's options (e.g. `rank` for arnoldi, `rtol` for cg); all are
    checked before any computation starts.
    """
    return _engine(model, training_data, inversion_method, hessian_regularization=hessian_regularization,
                   progress=progress, reducer=reducer, method_kwargs=kwargs, curvature=curvature,
                   block_diagonal=block_diagonal, on_negative_curvature=on_negative_curvature,
                   curvature_samples=curvature_samples, curvature_seed=curvature_seed).fit()


def compute_influence_factors(
    model: TwiceDifferentiable,
    training_data: Iterable[Any],
    test_data: Iterable[Any],
    inversion_method: str | InversionMethod,
    *,
    hessian_perturbation: float | str = 0.0,
    progress: bool = False,
    reducer: Reducer | None = None,
    curvature: CurvatureChoice = "hessian",
    block_diagonal: bool = False,
    on_negative_curvature: str = "warn",
    curvature_samples: int | None = None,
    curvature_seed: int = 0,
    **kwargs: Any,
) -> InverseHvpResult:
    """Influence factors s_test = (H + λI)⁻¹ ∇θ ℓ(z_test) for every test example: `x` [M, p] and `info`.

    λ is `hessian_perturbation`; H is the mean-loss Hessian over `training_data` (or its Gauss–Newton part, or
    per-layer blocks, or its fit on `curvature_samples` examples, as in `fit_solver`); `kwargs` are the method's
    options.
    """
    engine = _engine(model, training_data, inversion_method, hessian_regularization=hessian_perturbation,
                     progress=progress, reducer=reducer, method_kwargs=kwargs, curvature=curvature,
                     block_diagonal=block_diagonal, on_negative_curvature=on_negative_curvature,
                     curvature_samples=curvature_samples, curvature_seed=curvature_seed)
    engine.fit()
    return engine.factors(engine.gradients(test_data, name="test_data"))


def _factor_tensor(model: TwiceDifferentiable, influence_factors: InverseHvpResult | Tensor) -> Tensor:
    if not isinstance(model, TwiceDifferentiable):
        raise TypeError(
            f"model must be a TwiceDifferentiable, got {type(model).__name__}; wrap a module as "
            "TwiceDifferentiable(module, loss_fn)."
        )
    factors = influence_factors.x if isinstance(influence_factors, InverseHvpResult) else influence_factors
    if not isinstance(factors, Tensor) or factors.ndim != 2 or factors.shape[1] != model.gradient_dim:
        shape = tuple(factors.shape) if isinstance(factors, Tensor) else type(factors).__name__
        raise ValueError(
            f"influence_factors must have shape [M, {model.gradient_dim}] (from compute_influence_factors with "
            f"the same model and params), got {shape}."
        )
    return factors.to(device=model.device, dtype=model.dtype)


def compute_influences_up(
    model: TwiceDifferentiable,
    input_data: Iterable[Any],
    influence_factors: InverseHvpResult | Tensor,
    *,
    progress: bool = False,
    query_rank: int | None = None,
) -> Tensor:
    """Up-weighting influence ⟨s_test, ∇θ ℓ(zᵢ)⟩ of every example of `input_data` on every query: [M, N].

    With `query_rank=r`, each layer's block of every factor is cut to its best rank-r approximation and the
    scores are formed from that cut without per-example gradients (`lightning_influence.engine.low_rank`)."""
    factors = _factor_tensor(model, influence_factors)
    if positive_int("query_rank", query_rank, allow_none=True) is None:
        return up_scores(model, input_data, factors, progress=progress)
    structure = rank_structure(model)
    return low_rank_scores(model, structure, input_data, low_rank_factors(structure, factors, query_rank),
                           progress=progress)


def compute_influences_pert(
    model: TwiceDifferentiable,
    input_data: Iterable[Any],
    influence_factors: InverseHvpResult | Tensor,
    *,
    progress: bool = False,
    query_rank: int | None = None,
) -> Tensor:
    """Perturbation influence ∇ₓ ⟨s_test, ∇θ ℓ(zᵢ)⟩ for every example of `input_data`: [M, N, *x_shape]; with
    `query_rank=r`, of the rank-r scores (the factors' layer blocks cut as in `compute_influences_up`)."""
    factors = _factor_tensor(model, influence_factors)
    if positive_int("query_rank", query_rank, allow_none=True) is not None:
        factors = truncated_factors(rank_structure(model), factors, query_rank)
    return perturbation_scores(model, input_data, factors, progress=progress)


def compute_self_influences(
    model: TwiceDifferentiable, training_data: Iterable[Any], solver: Solver, *, progress: bool = False
) -> Tensor:
    """Self-influence ⟨(H + λI)⁻¹ ∇θ ℓ(zᵢ), ∇θ ℓ(zᵢ)⟩ of every training example, [N], with a fitted solver."""
    if not isinstance(model, TwiceDifferentiable):
        raise TypeError(f"model must be a TwiceDifferentiable, got {type(model).__name__}.")
    rows = self_influence_rows(model, solver, None)
    return self_influences(model, training_data, lambda block: solver.quadratic_forms(block)[0], rows=rows,
                           progress=progress)


def compute_influences(
    model: TwiceDifferentiable,
    training_data: Iterable[Any],
    *,
    test_data: Iterable[Any] | None = None,
    input_data: Iterable[Any] | None = None,
    inversion_method: str | InversionMethod = "direct",
    influence_type: str | InfluenceType = "up",
    hessian_regularization: float = 0.0,
    progress: bool = False,
    reducer: Reducer | None = None,
    query_rank: int | None = None,
    **kwargs: Any,
) -> Tensor:
    """Influence of each example of `input_data` (default: `training_data`) on each example of `test_data`
    (default: `training_data`): [M, N] for `up`, [M, N, *x_shape] for `perturbation`; with `query_rank=r`, from
    the factors cut to rank r layer by layer (see `compute_influences_up`), checked on the first example of
    `input_data` before the curvature is fitted.

    If scoring fails after the factors exist, the raised `InfluenceComputationError` carries them in
    `.partial["factors"]` so the inversion need not be repeated.
    """
    influence_type = InfluenceType.parse(influence_type)
    scored = input_data if input_data is not None else training_data
    if positive_int("query_rank", query_rank, allow_none=True) is not None:
        check_layer_form(model, rank_structure(model), scored)
    factors = compute_influence_factors(
        model,
        training_data,
        test_data if test_data is not None else training_data,
        inversion_method,
        hessian_perturbation=hessian_regularization,
        progress=progress,
        reducer=reducer,
        **kwargs,
    )
    scorer = compute_influences_up if influence_type is InfluenceType.up else compute_influences_pert
    try:
        return scorer(model, scored, factors, progress=progress, query_rank=query_rank)
    except Exception as error:
        raise InfluenceComputationError(
            f"Scoring failed after the influence factors were computed: {error}. The factors are kept in "
            "this error's .partial['factors']; pass them to compute_influences_up/_pert to retry.",
            {"factors": factors},
        ) from error
