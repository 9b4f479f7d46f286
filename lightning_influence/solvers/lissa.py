"""LiSSA (Agarwal et al., 2017): a stochastic Neumann series for (H + λI)⁻¹ b on sampled batches."""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor

from .base import Solver, non_negative_float, positive_int


class LissaSolver(Solver, method="lissa"):
    """Iterates hₜ = b + (1 − dampen) hₜ₋₁ − (H_batch + λI) hₜ₋₁ / scale and returns x = h / scale.

    Each step uses one batch of the training data (cycled in loader order; pass a shuffled loader for random
    sampling), and all right-hand sides step together. The fixed point solves (H + λI + dampen·scale·I) x = b,
    so `dampen` adds regularisation. The series converges when `scale` exceeds the largest eigenvalue of
    H + λI; `scale=None` takes `scale_margin` times a power-iteration estimate of it. Every `check_every`
    steps the largest relative change of any solution row is compared with `rtol`.
    """

    def __init__(
        self,
        maxiter: int = 1000,
        scale: float | None = None,
        dampen: float = 0.0,
        rtol: float = 1e-4,
        check_every: int = 10,
        scale_margin: float = 1.5,
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
        self._scale = 0.0

    def _fit(self) -> dict[str, Any]:
        if self.scale is not None:
            self._scale = float(self.scale)
            return {"scale": self._scale}
        largest = abs(self._fitted().largest_eigenvalue()) + self.regularization
        self._scale = self.scale_margin * largest if largest > 0 else 1.0
        return {"scale": self._scale, "estimated_max_eigenvalue": largest}

    def _solve(self, rhs: Tensor) -> tuple[Tensor, dict[str, Any]]:
        operator = self._fitted()
        batches = _cycle(operator)
        estimate = rhs.clone()
        previous = estimate / self._scale
        relative_change = float("inf")
        iterations = 0
        for iterations in range(1, self.maxiter + 1):
            inputs, targets = next(batches)
            product = operator.batch_matmat(inputs, targets, estimate) + self.regularization * estimate
            estimate = rhs + (1 - self.dampen) * estimate - product / self._scale
            if iterations % self.check_every == 0 or iterations == self.maxiter:
                current = estimate / self._scale
                change = (current - previous).norm(dim=1) / current.norm(dim=1).clamp_min(1e-30)
                relative_change = float(change.max())
                previous = current
                if relative_change < self.rtol:
                    break
        converged = relative_change < self.rtol
        if not converged:
            warnings.warn(
                f"lissa did not reach rtol={self.rtol:g} in {self.maxiter} iterations (largest relative change "
                f"{relative_change:.2e} over the last {self.check_every}); raise maxiter or dampen, or check scale.",
                RuntimeWarning,
                stacklevel=4,
            )
        return estimate / self._scale, {
            "iterations": iterations,
            "converged": converged,
            "max_relative_change": relative_change,
        }


def _cycle(operator: Any):
    """Endless (inputs, targets) batches from the operator's training data, restarting each epoch.

    A process whose shard holds no batches yields (None, None): it still takes part in every reduced product.
    """
    while True:
        empty = True
        for _, inputs, targets in operator.batches("lissa batches"):
            empty = False
            yield inputs, targets
        if empty:
            yield None, None
