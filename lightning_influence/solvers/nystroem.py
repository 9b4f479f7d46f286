"""Randomised Nyström approximation of the curvature (Tropp et al., 2017; Frangella et al., 2023).

With a Gaussian test matrix Ω [p, r] (orthonormalised) and Y = H Ω — one pass over the data for all r
vectors — the Nyström approximation is Ĥ = Y (Ωᵀ Y)⁺ Yᵀ = U diag(Λ) Uᵀ (computed stably with a small shift ν).
`power_iterations=q` replaces Ω by an orthonormal basis of H^q Ω first (q more passes), which sharpens the
captured subspace. The regularised inverse is taken by the Woodbury identity:

    (Ĥ + λI)⁻¹ = U diag(1/(Λ + λ)) Uᵀ + (I − U Uᵀ) / (μ + λ),

where μ is the curvature assigned to the directions the sketch did not capture: 0 (`complement="damping"`,
the plain regularised inverse) or the mean eigenvalue left over, (trace(H) − ΣΛ) / (p − r)
(`complement="trace"`, trace(H) by Hutchinson's estimator, one more batched pass).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from lightning_influence.checks import positive_int
from lightning_influence.curvature.operator import CurvatureOperator
from lightning_influence.errors import warn_user
from .base import ApproximateSolver, fit_required, work_dtype

COMPLEMENTS = ("trace", "damping")
#: H counts as clearly indefinite for the sketch when an eigenvalue lies below this fraction of −(its largest).
INDEFINITE_FRACTION = 1e-2


def complement_curvature(operator: CurvatureOperator, eigenvalues: Tensor, num_probes: int, seed: int) -> float:
    """(trace(H) − Σ kept eigenvalues) / (p − r), clipped at 0: the mean curvature outside a kept subspace."""
    p, rank = operator.gradient_dim, eigenvalues.numel()
    if rank >= p:
        return 0.0
    trace = float(operator.diagonal(num_probes, seed=seed).double().sum())
    return max(0.0, (trace - float(eigenvalues.clamp_min(0).sum())) / (p - rank))


class NystroemSolver(ApproximateSolver, method="nystroem"):
    """(Ĥ + λI)⁻¹ with Ĥ a rank-`rank` randomised Nyström approximation of H; exact when rank = p. `refine=k`
    adds k conjugate-gradient steps on the exact system, preconditioned by this inverse."""

    fitted_state = ("_eigenvalues", "_eigenvectors", "_complement")

    def __init__(
        self,
        rank: int = 50,
        power_iterations: int = 1,
        complement: str = "trace",
        num_probes: int = 64,
        seed: int = 0,
        refine: int = 2,
    ) -> None:
        super().__init__(refine)
        self.rank = positive_int("rank", rank)
        if isinstance(power_iterations, bool) or not isinstance(power_iterations, int) or power_iterations < 0:
            raise ValueError(f"power_iterations must be an integer ≥ 0, got {power_iterations!r}.")
        self.power_iterations = power_iterations
        if complement not in COMPLEMENTS:
            raise ValueError(f"complement must be one of {list(COMPLEMENTS)}, got {complement!r}.")
        self.complement = complement
        self.num_probes = positive_int("num_probes", num_probes)
        self.seed = seed
        self._eigenvalues: Tensor | None = None
        self._eigenvectors: Tensor | None = None
        self._complement = 0.0

    def _fit(self, operator: CurvatureOperator) -> dict[str, Any]:
        dtype = work_dtype(operator.device)
        p = operator.gradient_dim
        rank = min(self.rank, p)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        omegas = [torch.linalg.qr(torch.randn(p, rank, generator=generator, dtype=dtype).to(operator.device)).Q]
        products = [operator.matmat(omegas[0].T.to(operator.dtype)).to(dtype).T]  # Y = H Ω, [p, r]
        for _ in range(self.power_iterations):
            omegas.append(torch.linalg.qr(products[-1]).Q)
            products.append(operator.matmat(omegas[-1].T.to(operator.dtype)).to(dtype).T)
        eigenvalues, eigenvectors = nystroem_factors(omegas[-1], products[-1])
        self._eigenvalues, self._eigenvectors = eigenvalues, eigenvectors
        self._complement = 0.0
        if self.complement == "trace":
            self._complement = complement_curvature(operator, eigenvalues, self.num_probes, self.seed)
        smallest, largest = ritz_extremes(torch.cat(omegas, dim=1), torch.cat(products, dim=1))
        facts = self._check_sketch(smallest, largest)
        return {
            "rank": rank,
            "top_eigenvalue": float(eigenvalues.max()),
            "min_kept_eigenvalue": float(eigenvalues.min()),
            "complement_eigenvalue": self._complement,
            "min_eigenvalue_estimate": smallest,
            **facts,
        }

    def _check_sketch(self, smallest: float, largest: float) -> dict[str, Any]:
        """Facts (and a warning) where H is indefinite, which the sketch assumes it is not: H + λI indefinite goes
        to `found_indefinite`; H with an eigenvalue below −INDEFINITE_FRACTION × its largest is warned about."""
        source = "nystroem's Rayleigh-Ritz check on its sketch (which assumes a positive semi-definite H)"
        if smallest + self.regularization <= 0:
            return self.found_indefinite(smallest, source, exact=False, largest=largest)
        if smallest >= -INDEFINITE_FRACTION * largest:
            return {}
        warn_user(
            f"H has an eigenvalue of about {smallest:.3e} or lower ({-smallest / largest:.1%} of its largest, found "
            f"by {source}): H + λI is positive definite with λ = {self.regularization:g}, but the sketch "
            "misrepresents the negative part of H. Use curvature='ggn' (the Gauss-Newton matrix, positive "
            "semi-definite), or refine.",
            RuntimeWarning,
        )
        return {"indefinite_curvature": True}

    @fit_required
    def _approximate(self, rhs: Tensor) -> Tensor:
        vectors, eigenvalues, outside_curvature = self.preconditioner()
        block = rhs.to(vectors.dtype)
        coefficients = block @ vectors  # [M, r]
        inside = (coefficients / (eigenvalues + self.regularization)) @ vectors.T
        if vectors.shape[1] >= vectors.shape[0]:
            return inside.to(rhs.dtype)
        complement = outside_curvature + self.regularization
        if complement <= 0:
            raise ValueError("nystroem with rank < p needs hessian_regularization > 0 (or complement='trace').")
        outside = (block - coefficients @ vectors.T) / complement
        return (inside + outside).to(rhs.dtype)

    @fit_required
    def preconditioner(self) -> tuple[Tensor, Tensor, float]:
        """(U, Λ, μ): the fitted low-rank factors and complement curvature, for preconditioning."""
        return cast(Tensor, self._eigenvectors), cast(Tensor, self._eigenvalues), self._complement  # set by `_fit`


def ritz_extremes(tested: Tensor, products: Tensor) -> tuple[float, float]:
    """The smallest and largest Ritz values of H on the span of the columns of `tested` [p, k], given `products` =
    H · tested: bounds on H's extreme eigenvalues, free from the sketch's own passes. With power iterations the
    columns span the block Krylov space {Ω, HΩ, …}, where negative eigenvalues that stand out of the bulk show."""
    gram = tested.T @ tested
    values, vectors = torch.linalg.eigh((gram + gram.T) / 2)
    keep = values > torch.finfo(values.dtype).eps * values.max() * gram.shape[0]
    whiten = vectors[:, keep] / values[keep].sqrt()  # an orthonormal basis of the span is tested @ whiten
    core = tested.T @ products
    ritz = torch.linalg.eigvalsh(whiten.T @ ((core + core.T) / 2) @ whiten)
    return float(ritz[0]), float(ritz[-1])


def nystroem_factors(omega: Tensor, product: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs (Λ [r], U [p, r]) of the Nyström approximation Y (Ωᵀ Y)⁺ Yᵀ, with Ω orthonormal.

    The stable recipe shifts by ν = eps · ‖Y‖: Y_ν = Y + νΩ, C = chol(Ωᵀ Y_ν), B = Y_ν C⁻ᵀ, B = U Σ Vᵀ,
    Λ = max(Σ² − ν, 0). Where H is indefinite and Ωᵀ Y_ν is not positive definite, the core W is
    eigendecomposed instead and Y W⁺ Yᵀ is kept with its negative eigenvalues (exact at rank = p).
    """
    eps = torch.finfo(product.dtype).eps
    shift = eps * float(torch.linalg.matrix_norm(product, ord=2)) * product.shape[0] ** 0.5
    shifted = product + shift * omega
    core = omega.T @ shifted
    core = (core + core.T) / 2
    factor, status = torch.linalg.cholesky_ex(core)
    if int(status) == 0:
        b = torch.linalg.solve_triangular(factor, shifted.T, upper=False).T  # Y_ν C⁻ᵀ
        u, sigma, _ = torch.linalg.svd(b, full_matrices=False)
        return (sigma**2 - shift).clamp_min(0), u
    values, vectors = torch.linalg.eigh(core)
    keep = values.abs() > eps * values.abs().max() * core.shape[0]
    # Y W⁺ Yᵀ = Z diag(sign w) Zᵀ with Z = Y V |w|^(-1/2); Z = QR gives the eigenpairs from a small r × r matrix.
    z = shifted @ (vectors[:, keep] / values[keep].abs().sqrt())
    q, r = torch.linalg.qr(z)
    small = r @ (values[keep].sign().unsqueeze(1) * r.T)
    small_values, small_vectors = torch.linalg.eigh((small + small.T) / 2)
    return small_values - shift, q @ small_vectors
