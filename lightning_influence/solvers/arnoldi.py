"""Low-rank inversion from the dominant eigenpairs of H, found by Lanczos with full reorthogonalisation."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from lightning_influence.checks import positive_int
from lightning_influence.curvature.operator import CurvatureOperator
from .base import ApproximateSolver, fit_required, lanczos_basis, spectrum_report
from .nystroem import complement_curvature

ARNOLDI_COMPLEMENTS = ("none", "damping", "trace")


class ArnoldiSolver(ApproximateSolver, method="arnoldi"):
    """(H + λI)⁻¹ ≈ V diag(1 / (θ + λ)) Vᵀ on the `rank` eigenpairs (θ, V) of H largest in magnitude.

    A Krylov basis of `krylov_dimension` vectors (default min(p, 2·rank + 10)) is built with one Hessian pass per
    vector, eigenpairs of the small tridiagonal matrix give the Ritz pairs. At rank = p the inverse is exact.
    `complement` says what happens to the directions outside the kept eigenvectors V: `"none"` leaves them out
    (the projection variant of Schioppa et al., 2022); `"damping"` gives them curvature 0, i.e. 1/λ (the
    Woodbury form of (V diag(θ) Vᵀ + λI)⁻¹); `"trace"` gives them the mean eigenvalue left over,
    μ = (trace(H) − Σθ) / (p − rank) with trace(H) by Hutchinson's estimator (`num_probes` vectors, one batched
    pass): x = V diag(1/(θ + λ)) Vᵀ b + (b − V Vᵀ b) / (μ + λ). `refine=k` adds k conjugate-gradient steps on the
    exact system, preconditioned by this inverse (see `ApproximateSolver`).
    """

    fitted_state = ("_eigenvalues", "_eigenvectors", "_complement")

    def __init__(
        self,
        rank: int = 10,
        krylov_dimension: int | None = None,
        seed: int = 0,
        complement: str = "trace",
        num_probes: int = 64,
        refine: int = 2,
        block_size: int = 10,
    ) -> None:
        super().__init__(refine)
        if complement not in ARNOLDI_COMPLEMENTS:
            raise ValueError(f"complement must be one of {list(ARNOLDI_COMPLEMENTS)}, got {complement!r}.")
        if refine and complement == "none":
            raise ValueError(
                "arnoldi refine (default 2) needs an invertible preconditioner, and complement='none' maps every "
                "direction outside the eigenvectors to 0: pass refine=0 with complement='none', or use "
                "complement='trace' or 'damping' with refine."
            )
        self.complement = complement
        self.num_probes = positive_int("num_probes", num_probes)
        self._complement: float | None = None
        self.rank = positive_int("rank", rank)
        self.krylov_dimension = positive_int("krylov_dimension", krylov_dimension, allow_none=True)
        if krylov_dimension is not None and krylov_dimension < rank:
            raise ValueError(f"krylov_dimension ({krylov_dimension}) must be at least rank ({rank}).")
        self.seed = seed
        self.block_size = positive_int("block_size", block_size)
        self._eigenvalues: Tensor | None = None
        self._eigenvectors: Tensor | None = None

    def _fit(self, operator: CurvatureOperator) -> dict[str, Any]:
        p = operator.gradient_dim
        rank = min(self.rank, p)
        dimension = min(p, self.krylov_dimension or 2 * rank + 10)
        basis, projected = lanczos_basis(operator, dimension, self.block_size, self.seed)
        ritz_values, ritz_vectors = torch.linalg.eigh(projected)
        order = ritz_values.abs().argsort(descending=True)[:rank]
        self._eigenvalues = ritz_values[order]
        self._eigenvectors = basis.T @ ritz_vectors[:, order]  # [p, rank]
        report = spectrum_report(self, self._eigenvalues, operator.dtype, complete=rank == p)
        self._complement = None
        if self.complement == "damping" and rank < p:
            self._complement = 0.0
        elif self.complement == "trace" and rank < p:
            self._complement = complement_curvature(operator, self._eigenvalues, self.num_probes, self.seed)
        extra = {} if self._complement is None else {"complement_eigenvalue": self._complement}
        return {"rank": rank, "krylov_dimension": dimension, **report, **extra}

    @fit_required
    def _approximate(self, rhs: Tensor) -> Tensor:
        vectors, eigenvalues = cast(Tensor, self._eigenvectors), cast(Tensor, self._eigenvalues)  # set by `_fit`
        block = rhs.to(vectors.dtype)
        projections = block @ vectors
        solution = (projections / (eigenvalues + self.regularization)) @ vectors.T
        if self._complement is not None:
            damped = self._complement + self.regularization
            if damped <= 0:
                raise ValueError(f"arnoldi complement={self.complement!r} needs hessian_regularization > 0.")
            solution = solution + (block - projections @ vectors.T) / damped
        return solution.to(rhs.dtype)
