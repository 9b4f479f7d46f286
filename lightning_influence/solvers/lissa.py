"""LiSSA (Agarwal et al., 2017): a stochastic Neumann series for (H + λI)⁻¹ b on sampled batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_influence.checks import non_negative_float, positive_int
from lightning_influence.curvature.operator import CurvatureOperator
from lightning_influence.errors import warn_user
from .base import Solver

ACCELERATIONS = (None, "auto", "chebyshev")


class LissaSolver(Solver, method="lissa"):
    """Iterates hₜ = b + (1 − dampen) hₜ₋₁ − (H_batch + λI) hₜ₋₁ / scale and returns x = h / scale.

    Each step uses one batch of the training data (cycled in loader order; pass a shuffled loader for random
    sampling), and all right-hand sides step together. The fixed point solves (H + λI + dampen·scale·I) x = b,
    so `dampen` adds regularisation. The series converges when `scale` exceeds the largest eigenvalue of
    H + λI; `scale=None` takes `scale_margin` times a power-iteration estimate of it. Every `check_every`
    steps the largest relative change of any solution row is compared with `rtol`.

    `acceleration="chebyshev"` runs the same iteration with full-batch steps (one pass over the training data
    each) and Chebyshev semi-iterative weights for the spectrum interval [λ + dampen·scale, scale]
    (x ← x + dₜ, dₜ a three-term recurrence of the residuals b − A x): the error after t steps falls like
    ((√κ − 1)/(√κ + 1))ᵗ instead of (1 − 1/κ)ᵗ, κ = scale / (λ + dampen·scale). Momentum amplifies batch
    noise, hence the exact steps. `"auto"` (default) accelerates when the steps are exact anyway (the training
    loader yields one batch) and runs the plain series on the loader's batches otherwise; None never
    accelerates. Acceleration needs λ + dampen·scale > 0; without it the plain series runs.
    """

    def __init__(
        self,
        maxiter: int = 1000,
        scale: float | None = None,
        dampen: float = 0.0,
        rtol: float = 1e-4,
        check_every: int = 10,
        scale_margin: float = 1.5,
        acceleration: str | None = "auto",
    ) -> None:
        super().__init__()
        self.maxiter = positive_int("maxiter", maxiter)
        if scale is not None and not non_negative_float("scale", scale) > 0:
            raise ValueError(f"scale must be a positive number or None, got {scale!r}.")
        self.scale = scale
        self.dampen = non_negative_float("dampen", dampen)
        if self.dampen >= 1:
            raise ValueError(f"dampen must be in [0, 1), got {dampen!r}.")
        self.rtol = non_negative_float("rtol", rtol)
        self.check_every = positive_int("check_every", check_every)
        if not non_negative_float("scale_margin", scale_margin) > 1:
            raise ValueError(f"scale_margin must be > 1, got {scale_margin!r}.")
        self.scale_margin = scale_margin
        if acceleration not in ACCELERATIONS:
            raise ValueError(f"acceleration must be one of {list(ACCELERATIONS)}, got {acceleration!r}.")
        self.acceleration = acceleration
        self._scale = 0.0

    def _fit(self, operator: CurvatureOperator) -> dict[str, Any]:
        if self.scale is not None:
            self._scale = float(self.scale)
            return {"scale": self._scale}
        largest = abs(operator.largest_eigenvalue()) + self.regularization
        self._scale = self.scale_margin * largest if largest > 0 else 1.0
        return {"scale": self._scale, "estimated_max_eigenvalue": largest}

    def _solve(self, rhs: Tensor) -> tuple[Tensor, dict[str, Any]]:
        lower = self.regularization + self.dampen * self._scale
        operator = self.operator
        single_batch = operator.single_batch()
        accelerate = self.acceleration == "chebyshev" or (self.acceleration == "auto" and single_batch)
        if accelerate and 0 < lower < self._scale:
            return self._solve_chebyshev(rhs, lower)
        batches = operator.cycle_batches()
        estimate = rhs.clone()

        def advance() -> Tensor:
            nonlocal estimate
            inputs, targets = next(batches)
            product = operator.batch_matmat(inputs, targets, estimate) + self.regularization * estimate
            estimate = rhs + (1 - self.dampen) * estimate - product / self._scale
            return estimate / self._scale

        return self._iterate(advance, rhs / self._scale, {})

    def _solve_chebyshev(self, rhs: Tensor, lower: float) -> tuple[Tensor, dict[str, Any]]:
        """Chebyshev iteration for A x = b on the spectrum interval [lower, scale] (Saad, Alg. 12.1)."""
        operator = self.operator
        shift = self.regularization + self.dampen * self._scale
        centre, half_width = (self._scale + lower) / 2, (self._scale - lower) / 2
        sigma = centre / half_width
        rho = 1 / sigma
        solution = torch.zeros_like(rhs)
        residual = rhs.clone()
        step = residual / centre

        def advance() -> Tensor:
            nonlocal solution, residual, step, rho
            product = operator.matmat(step) + shift * step
            solution = solution + step
            residual = residual - product
            rho_next = 1 / (2 * sigma - rho)
            step = rho_next * rho * step + (2 * rho_next / half_width) * residual
            rho = rho_next
            return solution

        return self._iterate(advance, solution, {"acceleration": "chebyshev"})

    def _iterate(
        self, advance: Callable[[], Tensor], start: Tensor, facts: dict[str, Any]
    ) -> tuple[Tensor, dict[str, Any]]:
        """Take steps (`advance` returns the current solution) until the largest relative change of any row
        over `check_every` steps is below `rtol`, or `maxiter` steps; warn when the tolerance was not reached."""
        previous, current = start, start
        relative_change = float("inf")
        iterations = 0
        for iterations in range(1, self.maxiter + 1):
            current = advance()
            if iterations % self.check_every == 0 or iterations == self.maxiter:
                change = (current - previous).norm(dim=1) / current.norm(dim=1).clamp_min(1e-30)
                relative_change = float(change.max())
                previous = current
                if relative_change < self.rtol:
                    break
        converged = relative_change < self.rtol
        if not converged:
            warn_user(
                f"lissa did not reach rtol={self.rtol:g} in {self.maxiter} iterations (largest relative change "
                f"{relative_change:.2e} over the last {self.check_every}); raise maxiter or dampen, or check scale.",
                RuntimeWarning,
            )
        return current, {"iterations": iterations, "converged": converged, "max_relative_change": relative_change,
                         **facts}

