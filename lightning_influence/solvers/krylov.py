"""Preconditioned conjugate gradient on a block of right-hand sides: the loop behind `cg` and `refine`."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def conjugate_gradient(
    apply: Callable[[Tensor], Tensor],
    rhs: Tensor,
    precondition: Callable[[Tensor], Tensor],
    *,
    initial: Tensor | None = None,
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
    if initial is None:
        solution, residual = torch.zeros_like(rhs), rhs.clone()
    else:
        solution = initial.clone()
        residual = rhs - apply(solution)
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
        if bool((curvature <= 0).any()):
            warnings.warn(
                "cg met a direction of non-positive curvature: H + λI is not positive definite, so cg may "
                "not converge. Increase hessian_regularization.",
                RuntimeWarning,
                stacklevel=5,
            )
        # A zero direction (the preconditioner maps the residual to 0) cannot make progress: stop that row.
        stalled = curvature == 0
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
    relative = residual.norm(dim=1) / rhs_norm.clamp_min(torch.finfo(rhs.dtype).tiny)
    unconverged = int((residual.norm(dim=1) > threshold).sum())
    return solution, {
        "iterations": iterations,
        "converged": unconverged == 0,
        "unconverged": unconverged,
        "max_relative_residual": float(relative.max()),
        "mean_relative_residual": float(relative.mean()),
    }
