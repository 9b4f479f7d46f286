"""Preconditioned conjugate gradient on a block of right-hand sides: the loop behind `cg` and `refine`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_influence.errors import NonFiniteError, warn_user

#: What to do when a Krylov loop meets a singular or indefinite H + λI (most often λ = 0).
SINGULAR_HINT = (
    "H + λI is singular or not positive definite (as with hessian_regularization=0 on most networks): use "
    "hessian_regularization > 0 (or 'auto'), or curvature='ggn' with λ > 0."
)


def _linear_algebra_failures_named(loop: Callable[..., Any]) -> Callable[..., Any]:
    """`loop`, with a failure of its small dense linear algebra (an SVD of non-finite directions, a singular
    r × r system) raised as the documented NonFiniteError instead of torch's raw LinAlgError."""

    @functools.wraps(loop)
    def named(*args: Any, **kwargs: Any) -> Any:
        try:
            return loop(*args, **kwargs)
        except torch.linalg.LinAlgError as error:
            raise NonFiniteError(f"block conjugate gradient ({error})", hint=SINGULAR_HINT) from error

    return named


def conjugate_gradient(
    apply: Callable[[Tensor], Tensor],
    rhs: Tensor,
    precondition: Callable[[Tensor], Tensor],
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    maxiter: int,
) -> tuple[Tensor, dict[str, Any]]:
    """Preconditioned CG for A X = B, one recurrence per row of `rhs` [M, p], sharing each product with A.

    `apply(V)` is A V for a block of rows and `precondition(R)` applies a fixed symmetric positive definite
    P⁻¹ ≈ A⁻¹. A row stops (and is frozen) once ‖b − A x‖ ≤ max(rtol · ‖b‖, atol), so with both zero every row
    runs `maxiter` steps (unless its residual vanishes); later iterations multiply only the rows still running.
    """
    rhs_norm = rhs.norm(dim=1)
    threshold = torch.clamp(rtol * rhs_norm, min=atol)
    solution, residual = torch.zeros_like(rhs), rhs.clone()
    preconditioned = precondition(residual)
    direction = preconditioned.clone()
    residual_dot = (residual * preconditioned).sum(1)
    active = residual.norm(dim=1) > threshold
    iterations = 0
    while bool(active.any()) and iterations < maxiter:
        iterations += 1
        rows = active.nonzero().squeeze(1)
        d = direction[rows]
        product = apply(d)
        curvature = (d * product).sum(1)
        # A zero direction (the preconditioner maps the residual to 0) cannot make progress: stop that row.
        stalled = ~d.any(dim=1)
        if bool(((curvature <= 0) & ~stalled).any()):
            _warn_non_positive_curvature("cg")
        step = residual_dot[rows] / torch.where(stalled, torch.ones_like(curvature), curvature)
        step = torch.where(stalled, torch.zeros_like(step), step)
        solution[rows] += step.unsqueeze(1) * d
        residual[rows] -= step.unsqueeze(1) * product
        still = (residual[rows].norm(dim=1) > threshold[rows]) & ~stalled
        new_preconditioned = precondition(residual[rows])
        new_dot = (residual[rows] * new_preconditioned).sum(1)
        direction[rows] = new_preconditioned + (new_dot / residual_dot[rows]).unsqueeze(1) * d
        residual_dot[rows] = new_dot
        active[rows] = still
    return solution, _report(iterations, residual.norm(dim=1), rhs_norm, threshold)


@_linear_algebra_failures_named
def block_conjugate_gradient(
    apply: Callable[[Tensor], Tensor],
    rhs: Tensor,
    precondition: Callable[[Tensor], Tensor],
    *,
    initial: Tensor | None = None,
    rtol: float = 0.0,
    atol: float = 0.0,
    maxiter: int,
) -> tuple[Tensor, dict[str, Any]]:
    """Breakdown-free block CG (Ji & Li, 2017) for A X = B with all rows of `rhs` [M, p] sharing one Krylov space.

    Each step multiplies A with a block P of orthonormal search directions, and every right-hand side takes its
    best update from the whole block:
        α = (PᵀAP)⁻¹ Pᵀ R,  X ← X + P α,  R ← R − AP α,  Z = P⁻¹R,  P ← orth(Z − P (PᵀAP)⁻¹ (AP)ᵀ Z),
    (column notation). After k steps a row has searched a space of up to k·M directions instead of k, so far
    fewer passes are needed when many right-hand sides share the curvature. orth() keeps the row space of the
    new directions by an SVD and drops directions that have become dependent (the "breakdown" of plain block CG).
    Rows stop once ‖b − A x‖ ≤ max(rtol · ‖b‖, atol); later steps carry only the rows still running. A start
    `initial` costs one product with A for its residual.
    """
    small = torch.float32 if rhs.device.type == "mps" else torch.float64  # for the r × r systems
    rhs_norm = rhs.norm(dim=1)
    threshold = torch.clamp(rtol * rhs_norm, min=atol)
    if initial is None:
        solution, residual = torch.zeros_like(rhs), rhs.clone()
    else:
        solution = initial.clone()
        residual = rhs - apply(solution)
    residual_norm = residual.norm(dim=1)  # per row, from the recurrence; frozen when the row stops
    active = (residual_norm > threshold).nonzero().squeeze(1)
    residual = residual[active]
    directions = _orthonormal_rows(precondition(residual))
    iterations = 0
    while active.numel() and iterations < maxiter and directions.shape[0]:
        iterations += 1
        product = apply(directions)
        gram = (directions.to(small) @ product.to(small).T + product.to(small) @ directions.to(small).T) / 2
        if bool((torch.linalg.eigvalsh(gram) <= 0).any()):
            _warn_non_positive_curvature("block cg")
        steps = torch.linalg.solve(gram, directions.to(small) @ residual.to(small).T).to(rhs.dtype)  # [r, s]
        solution[active] += steps.T @ directions
        residual -= steps.T @ product
        residual_norm[active] = residual.norm(dim=1)
        running = residual_norm[active] > threshold[active]
        active, residual = active[running], residual[running]
        if not active.numel():
            break
        preconditioned = precondition(residual)
        conjugation = torch.linalg.solve(gram, product.to(small) @ preconditioned.to(small).T).to(rhs.dtype)
        directions = _orthonormal_rows(preconditioned - conjugation.T @ directions)
    return solution, _report(iterations, residual_norm, rhs_norm, threshold)


def _orthonormal_rows(vectors: Tensor) -> Tensor:
    """An orthonormal basis (as rows) of the row space of `vectors` [s, p], dependent directions dropped."""
    _, singular, basis = torch.linalg.svd(vectors, full_matrices=False)
    if not singular.numel():
        return basis
    keep = singular > singular[0] * torch.finfo(vectors.dtype).eps
    return basis[keep]


def _warn_non_positive_curvature(loop: str) -> None:
    warn_user(
        f"{loop} met a direction of non-positive curvature: H + λI is not positive definite, so cg may not "
        "converge. Increase hessian_regularization.",
        RuntimeWarning,
    )


def _report(iterations: int, residual_norm: Tensor, rhs_norm: Tensor, threshold: Tensor) -> dict[str, Any]:
    """Convergence facts from the final residual norms of every row."""
    relative = residual_norm / rhs_norm.clamp_min(torch.finfo(rhs_norm.dtype).tiny)
    unconverged = int((residual_norm > threshold).sum())
    return {
        "iterations": iterations,
        "converged": unconverged == 0,
        "unconverged": unconverged,
        "max_relative_residual": float(relative.max()),
        "mean_relative_residual": float(relative.mean()),
    }
