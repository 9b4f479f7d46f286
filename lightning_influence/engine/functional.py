"""The classic functional influence API (Koh & Liang 2017), on the engine's solvers and streamed scoring.

Conventions (every function): L(θ) = (1/N) Σᵢ ℓ(zᵢ, θ); H = ∇²L; s_test = (H + λI)⁻¹ ∇θ ℓ(z_test);
I_up(z_test, zᵢ) = ⟨s_test, ∇θ ℓ(zᵢ)⟩ (positive: zᵢ helped the query, and removing it is predicted to raise
the query's loss by I_up / N); I_pert(z_test, zᵢ) = ∇ₓ I_up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_influence.curvature.operator import Curvature, CurvatureOperator, check_curvature
from lightning_influence.enums import InfluenceType, InversionMethod
from lightning_influence.errors import InfluenceComputationError
from lightning_influence.curvature.reducer import Reducer
from lightning_influence.engine.scoring import perturbation_score_blocks, self_influence_blocks, stacked_gradients, up_score_blocks
from lightning_influence.solvers import InverseHvpResult, Solver, make_solver
from lightning_influence.checks import check_regularization
from lightning_influence.model.twice_differentiable import TwiceDifferentiable

__all__ = [
    "compute_influence_factors",
    "compute_influences",
    "compute_influences_pert",
    "compute_influences_up",
    "compute_self_influences",
    "fit_solver",
]


def _check_model(model: Any) -> TwiceDifferentiable:
    if not isinstance(model, TwiceDifferentiable):
        raise TypeError(
            f"model must be a TwiceDifferentiable, got {type(model).__name__}; wrap a module as "
            "TwiceDifferentiable(module, loss_fn)."
        )
    return model


def fit_solver(
    model: TwiceDifferentiable,
    training_data: Iterable[Any],
    inversion_method: str | InversionMethod,
    *,
    hessian_regularization: float = 0.0,
    curvature: Curvature = "hessian",
    block_diagonal: bool = False,
    progress: bool = False,
    reducer: Reducer | None = None,
    **kwargs: Any,
) -> Solver:
    """A solver for (H + λI) over `training_data`, fitted once and ready to `solve` many right-hand sides.

    `curvature="ggn"` uses the Gauss–Newton matrix for H, `block_diagonal=True` only its per-layer blocks (see
    `CurvatureOperator`). `kwargs` are the method's options (e.g. `rank` for arnoldi, `rtol` for cg); all are
    checked before any computation starts.
    """
    model = _check_model(model)
    regularization = check_regularization(hessian_regularization)
    check_curvature(curvature, block_diagonal)
    solver = make_solver(inversion_method, **kwargs)
    operator = CurvatureOperator(model, training_data, reducer=reducer, progress=progress, curvature=curvature,
                                 block_diagonal=block_diagonal)
    with model.evaluating():
        operator.check()
        return solver.fit(operator, regularization)


def compute_influence_factors(
    model: TwiceDifferentiable,
    training_data: Iterable[Any],
    test_data: Iterable[Any],
    inversion_method: str | InversionMethod,
    *,
    hessian_perturbation: float = 0.0,
    progress: bool = False,
    reducer: Reducer | None = None,
    **kwargs: Any,
) -> InverseHvpResult:
    """Influence factors s_test = (H + λI)⁻¹ ∇θ ℓ(z_test) for every test example: `x` [M, p] and `info`.

    λ is `hessian_perturbation`; H is the mean-loss Hessian over `training_data` (`kwargs` may hold
    `curvature` and `block_diagonal` for `fit_solver`, besides the method's options).
    """
    solver = fit_solver(
        model,
        training_data,
        inversion_method,
        hessian_regularization=hessian_perturbation,
        progress=progress,
        reducer=reducer,
        **kwargs,
    )
    with model.evaluating():
        rhs = stacked_gradients(model, test_data, name="test_data", progress=progress)
        return solver.solve(rhs)


def _factor_tensor(model: TwiceDifferentiable, influence_factors: InverseHvpResult | Tensor) -> Tensor:
    factors = influence_factors.x if isinstance(influence_factors, InverseHvpResult) else influence_factors
    if not isinstance(factors, Tensor) or factors.ndim != 2 or factors.shape[1] != model.num_params:
        shape = tuple(factors.shape) if isinstance(factors, Tensor) else type(factors).__name__
        raise ValueError(
            f"influence_factors must have shape [M, {model.num_params}] (from compute_influence_factors with "
            f"the same model and params), got {shape}."
        )
    return factors.to(device=model.device, dtype=model.dtype)


def compute_influences_up(
    model: TwiceDifferentiable,
    input_data: Iterable[Any],
    influence_factors: InverseHvpResult | Tensor,
    *,
    progress: bool = False,
) -> Tensor:
    """Up-weighting influence ⟨s_test, ∇θ ℓ(zᵢ)⟩ of every example of `input_data` on every query: [M, N]."""
    return _joined_blocks(up_score_blocks, model, input_data, influence_factors, progress)


def compute_influences_pert(
    model: TwiceDifferentiable,
    input_data: Iterable[Any],
    influence_factors: InverseHvpResult | Tensor,
    *,
    progress: bool = False,
) -> Tensor:
    """Perturbation influence ∇ₓ ⟨s_test, ∇θ ℓ(zᵢ)⟩ for every example of `input_data`: [M, N, *x_shape]."""
    return _joined_blocks(perturbation_score_blocks, model, input_data, influence_factors, progress)


def _joined_blocks(
    blocks: Callable[..., Iterable[Tensor]],
    model: TwiceDifferentiable,
    input_data: Iterable[Any],
    influence_factors: InverseHvpResult | Tensor,
    progress: bool,
) -> Tensor:
    """Stream a scoring generator over `input_data` in eval mode and join its per-batch blocks along dim 1."""
    model = _check_model(model)
    factors = _factor_tensor(model, influence_factors)
    with model.evaluating():
        return torch.cat(list(blocks(model, input_data, factors, progress=progress)), dim=1)


def compute_self_influences(
    model: TwiceDifferentiable, training_data: Iterable[Any], solver: Solver, *, progress: bool = False
) -> Tensor:
    """Self-influence ⟨(H + λI)⁻¹ ∇θ ℓ(zᵢ), ∇θ ℓ(zᵢ)⟩ of every training example, [N], with a fitted solver."""
    model = _check_model(model)
    with model.evaluating():
        return torch.cat(list(self_influence_blocks(model, training_data, solver, progress=progress)))


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
    **kwargs: Any,
) -> Tensor:
    """Influence of each example of `input_data` (default: `training_data`) on each example of `test_data`
    (default: `training_data`): [M, N] for `up`, [M, N, *x_shape] for `perturbation`.

    If scoring fails after the factors exist, the raised `InfluenceComputationError` carries them in
    `.partial["factors"]` so the inversion need not be repeated.
    """
    influence_type = InfluenceType.parse(influence_type)
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
        return scorer(model, input_data if input_data is not None else training_data, factors, progress=progress)
    except Exception as error:
        raise InfluenceComputationError(
            f"Scoring failed after the influence factors were computed: {error}. The factors are kept in "
            "this error's .partial['factors']; pass them to compute_influences_up/_pert to retry.",
            {"factors": factors},
        ) from error
