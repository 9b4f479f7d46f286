"""LiSSA (Agarwal et al., 2017): a Neumann series for (H + λI)⁻¹ b, with Chebyshev semi-iterative weights by
default, or stochastic on sampled batches."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_influence.checks import non_negative_float, positive_int
from lightning_influence.curvature.operator import CurvatureOperator
from lightning_influence.errors import warn_user
from .base import Solver, extreme_eigenvalues

ACCELERATIONS = (None, "auto", "chebyshev")
#: scale = margin × the block Lanczos estimate of the largest eigenvalue of H + λI: tight for exact full-batch
#: (Chebyshev) steps, wide for the stochastic series, whose batch Hessians may exceed the full one.
CHEBYSHEV_MARGIN, SERIES_MARGIN = 1.05, 1.5
#: Chebyshev weights are for [CHEBYSHEV_LOWER_FRACTION · μ, scale], μ = λ + dampen · scale: below μ lies the
#: spectrum of H + λI of a network away from a minimum (H's eigenvalues a little below 0), which dominates the
#: solution when λ is small. On benchmark problem (a), Pearson 0.992 after 125 steps (0.983 with [μ, scale]).
CHEBYSHEV_LOWER_FRACTION = 0.25
#: rtol when none is given: the Chebyshev error bound, or the stochastic series' relative change.
CHEBYSHEV_RTOL, SERIES_RTOL = 1e-2, 1e-4


class LissaSolver(Solver, method="lissa"):
    """The Neumann series hₜ = b + (1 − dampen) hₜ₋₁ − (H + λI) hₜ₋₁ / scale, x = h / scale, whose fixed point solves
    (H + λI + dampen·scale·I) x = b (so `dampen` adds regularisation); it converges when `scale` exceeds the
    largest eigenvalue of H + λI. `scale=None` takes `scale_margin` (None: 1.05 with Chebyshev steps, 1.5 for the
    series) times a block Lanczos estimate of it (6 passes of 8 vectors), whose smallest Ritz value also tells
    where H + λI is indefinite (`Solver.found_indefinite`). All right-hand sides step together.

    `acceleration="chebyshev"` (default) takes full-batch steps (one pass over the training data each) with
    Chebyshev semi-iterative weights for the interval [μ/4, scale], μ = λ + dampen·scale (x ← x + dₜ, dₜ a
    three-term recurrence of the residuals b − A x; Saad, Alg. 12.1): the error on that interval after k steps is
    at most 1/T_k(σ), σ = (scale + μ/4) / (scale − μ/4), falling like ((√κ − 1)/(√κ + 1))ᵏ instead of the series'
    (1 − 1/κ)ᵏ. It takes the fewest steps whose bound is ≤ `rtol` (None: 1e-2), at most `maxiter`.
    `acceleration=None` runs the original stochastic series, one batch per step (cycled in loader order; pass a
    shuffled loader for random sampling), until the largest relative change of any row over `check_every` steps is
    below `rtol` (None: 1e-4) or `maxiter` steps; `"auto"` accelerates only when the training loader yields one
    batch. Acceleration needs μ > 0 (λ > 0 or dampen > 0); without it the series runs.
    """

    fitted_state = ("_scale", "_accelerate")

    def __init__(
        self,
        maxiter: int = 1000,
        scale: float | None = None,
        dampen: float = 0.0,
        rtol: float | None = None,
        check_every: int = 10,
        scale_margin: float | None = None,
        acceleration: str | None = "chebyshev",
    ) -> None:
        super().__init__()
        self.maxiter = positive_int("maxiter", maxiter)
        if scale is not None and not non_negative_float("scale", scale) > 0:
            raise ValueError(f"scale must be a positive number or None, got {scale!r}.")
        self.scale = scale
        self.dampen = non_negative_float("dampen", dampen)
        if self.dampen >= 1:
            raise ValueError(f"dampen must be in [0, 1), got {dampen!r}.")
        self.rtol = None if rtol is None else non_negative_float("rtol", rtol)
        self.check_every = positive_int("check_every", check_every)
        if scale_margin is not None and not non_negative_float("scale_margin", scale_margin) > 1:
            raise ValueError(f"scale_margin must be > 1 or None, got {scale_margin!r}.")
        self.scale_margin = scale_margin
        if acceleration not in ACCELERATIONS:
            raise ValueError(f"acceleration must be one of {list(ACCELERATIONS)}, got {acceleration!r}.")
        self.acceleration = acceleration
        self._scale = 0.0
        self._accelerate = False

    def _fit(self, operator: CurvatureOperator) -> dict[str, Any]:
        wanted = self.acceleration == "chebyshev" or (self.acceleration == "auto" and operator.single_batch())
        accelerate = wanted and (self.regularization > 0 or self.dampen > 0)
        facts: dict[str, Any] = {}
        if self.scale is not None:
            self._scale = float(self.scale)
        else:
            smallest, largest = extreme_eigenvalues(operator)
            if smallest + self.regularization <= 0:  # the series diverges along such a direction
                facts.update(self.found_indefinite(smallest, "lissa's block Lanczos estimate", exact=False,
                                                   largest=largest))
            largest = abs(largest) + self.regularization
            margin = self.scale_margin or (CHEBYSHEV_MARGIN if accelerate else SERIES_MARGIN)
            self._scale = margin * largest if largest > 0 else 1.0
            facts["estimated_max_eigenvalue"] = largest
        lower = CHEBYSHEV_LOWER_FRACTION * (self.regularization + self.dampen * self._scale)
        self._accelerate = accelerate and lower < self._scale
        return {"scale": self._scale, "acceleration": "chebyshev" if self._accelerate else None, **facts}

    @property
    def _tolerance(self) -> float:
        default = CHEBYSHEV_RTOL if self._accelerate else SERIES_RTOL
        return default if self.rtol is None else self.rtol

    def _solve(self, rhs: Tensor) -> tuple[Tensor, dict[str, Any]]:
        if self._accelerate:
            solution, _, info = self._chebyshev(rhs, self._tolerance)
            return solution, info
        operator = self.operator
        batches = operator.cycle_batches()
        estimate = rhs.clone()

        def advance() -> Tensor:
            nonlocal estimate
            inputs, targets = next(batches)
            product = operator.batch_matmat(inputs, targets, estimate) + self.regularization * estimate
            estimate = rhs + (1 - self.dampen) * estimate - product / self._scale
            return estimate / self._scale

        return self._iterate(advance, rhs / self._scale)

    def _quadratic(self, block: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """⟨(H + λI)⁻¹bᵢ, bᵢ⟩; with Chebyshev steps, as ⟨x, b + r⟩ (error ‖e‖²_A, see `Solver.quadratic_forms`)
        after the steps for a bound of √rtol: about half the passes of a solve."""
        if not self._accelerate:
            return super()._quadratic(block)
        solution, residual, facts = self._chebyshev(block, math.sqrt(self._tolerance))
        return solution, (solution * (block + residual)).sum(1), facts

    def _chebyshev(self, rhs: Tensor, tolerance: float) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """Chebyshev iteration for A x = b on the interval [μ/4, scale] (Saad, Alg. 12.1), for the fewest steps k
        with 1/T_k(σ) ≤ `tolerance`, at most maxiter; the solution, its residual b − A x and the facts."""
        shift = self.regularization + self.dampen * self._scale
        lower = CHEBYSHEV_LOWER_FRACTION * shift
        centre, half_width = (self._scale + lower) / 2, (self._scale - lower) / 2
        sigma = centre / half_width
        needed = math.ceil(math.acosh(1 / max(tolerance, 1e-300)) / math.acosh(sigma)) if tolerance < 1 else 1
        steps = min(needed, self.maxiter)
        if needed > self.maxiter:
            warn_user(
                f"lissa did not reach rtol={tolerance:g}: its Chebyshev steps need {needed} for that error bound on "
                f"[{lower:.3g}, {self._scale:.3g}], and maxiter={self.maxiter}; raise maxiter, rtol or "
                "hessian_regularization.",
                RuntimeWarning,
            )
        rho = 1 / sigma
        solution, residual = torch.zeros_like(rhs), rhs.clone()
        step = residual / centre
        for _ in range(steps):
            product = self.operator.matmat(step) + shift * step
            solution, residual = solution + step, residual - product
            rho_next = 1 / (2 * sigma - rho)
            step = rho_next * rho * step + (2 * rho_next / half_width) * residual
            rho = rho_next
        relative = residual.norm(dim=1) / rhs.norm(dim=1).clamp_min(torch.finfo(rhs.dtype).tiny)
        decay = math.exp(-steps * math.acosh(sigma))
        return solution, residual, {"iterations": steps, "converged": steps == needed,
                                    "error_bound": 2 * decay / (1 + decay**2),  # 1/T_k(σ) = 1/cosh(k acosh σ)
                                    "max_relative_residual": float(relative.max())}

    def _iterate(self, advance: Callable[[], Tensor], start: Tensor) -> tuple[Tensor, dict[str, Any]]:
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
                if relative_change < self._tolerance:
                    break
        converged = relative_change < self._tolerance
        if not converged:
            warn_user(
                f"lissa did not reach rtol={self._tolerance:g} in {self.maxiter} iterations (largest relative change "
                f"{relative_change:.2e} over the last {self.check_every}); raise maxiter or dampen, or check scale.",
                RuntimeWarning,
            )
        return current, {"iterations": iterations, "converged": converged, "max_relative_change": relative_change}

