"""Direct inversion: form H explicitly, factorise H + λI once (Cholesky), solve every right-hand side."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_influence.curvature.operator import CurvatureOperator
from lightning_influence.errors import warn_user
from .base import Solver, spectrum_report, work_dtype


class DirectSolver(Solver, method="direct"):
    """Exact (H + λI)⁻¹ via the explicit p × p Hessian; for models with at most a few thousand parameters.

    Cholesky when H + λI is positive definite. Otherwise the symmetric eigendecomposition is used, with
    eigenvalues of magnitude below `eigen_rtol` · max |eigenvalue| left out (a pseudo-inverse). The spectrum of
    H is always examined for the report (all of it for blocks up to `EXACT_SPECTRUM_SIZE`, its two ends
    estimated for larger ones): warnings name the smallest eigenvalue and a regularisation that fixes an
    indefinite or ill-conditioned matrix, or a λ that swamps the curvature.
    """

    collective_solve = False  # type: ignore[assignment]  # solves from the stored factorisation
    fitted_state = ("_factors",)

    def __init__(self, eigen_rtol: float = 1e-10) -> None:
        super().__init__()
        if not 0 <= eigen_rtol < 1:
            raise ValueError(f"eigen_rtol must be in [0, 1), got {eigen_rtol!r}.")
        self.eigen_rtol = eigen_rtol
        #: Per diagonal block: its Cholesky factor, or (eigenvalues, eigenvectors) where Cholesky failed.
        self._factors: list[Tensor | tuple[Tensor, Tensor]] = []

    def _fit(self, operator: CurvatureOperator) -> dict[str, Any]:
        dtype = work_dtype(operator.device)
        hessian = operator.dense().to(dtype)
        hessian = (hessian + hessian.T) / 2
        # One factorisation per diagonal block (a single block unless the operator is block-diagonal).
        self._factors, spectra = [], []
        for _, block in operator.blocks:
            matrix = hessian[block, block]
            damped = matrix + self.regularization * torch.eye(len(matrix), dtype=dtype, device=operator.device)
            factor, status = torch.linalg.cholesky_ex(damped)
            if int(status) == 0:
                self._factors.append(factor)
                spectra.append(_spectrum(matrix))
            else:  # the eigendecomposition is needed anyway, and gives the whole spectrum
                decomposition = torch.linalg.eigh(damped)
                self._factors.append(decomposition)
                spectra.append(decomposition.eigenvalues - self.regularization)
        eigenvalues = torch.cat(spectra)
        report = spectrum_report(self, eigenvalues, operator.dtype, complete=True)
        report["spectrum"] = "exact" if len(eigenvalues) == operator.gradient_dim else "ends estimated by Lanczos"
        if all(isinstance(factor, Tensor) for factor in self._factors):
            return {"factorization": "cholesky", **report}
        warn_user(
            "direct: Cholesky failed, so H + λI is solved with an eigendecomposition pseudo-inverse "
            f"(eigenvalues below {self.eigen_rtol:g} × the largest in magnitude are left out).",
            RuntimeWarning,
        )
        return {"factorization": "eigh", **report}

    def _solve(self, rhs: Tensor) -> tuple[Tensor, dict[str, Any]]:
        columns = rhs.T.to(work_dtype(rhs.device))
        solution = torch.empty_like(columns)
        for (_, block), factor in zip(self.operator.blocks, self._factors):
            solution[block] = self._solve_block(factor, columns[block])
        return solution.T.to(rhs.dtype), {}

    def _solve_block(self, factor: Tensor | tuple[Tensor, Tensor], columns: Tensor) -> Tensor:
        if isinstance(factor, Tensor):
            return torch.cholesky_solve(columns, factor)
        eigenvalues, eigenvectors = factor
        keep = eigenvalues.abs() > self.eigen_rtol * eigenvalues.abs().max()
        inverse = torch.where(keep, 1.0 / torch.where(keep, eigenvalues, torch.ones_like(eigenvalues)), 0.0)
        return eigenvectors @ (inverse.unsqueeze(1) * (eigenvectors.T @ columns))


#: Blocks up to this size report their whole spectrum (eigvalsh); larger ones estimate its two ends.
EXACT_SPECTRUM_SIZE = 256
LANCZOS_STEPS = 80


def _spectrum(matrix: Tensor) -> Tensor:
    """Eigenvalues of a block of H for the report: all of them for a small block, else the Ritz values of
    `LANCZOS_STEPS` Lanczos steps, whose two ends (what the warnings need) converge first. Each step costs
    one O(p²) product where eigvalsh costs O(p³): at p = 2,410 eigvalsh took 10 s of a 16 s fit."""
    if len(matrix) <= EXACT_SPECTRUM_SIZE:
        return torch.linalg.eigvalsh(matrix)
    generator = torch.Generator(device="cpu").manual_seed(0)
    vector = torch.randn(len(matrix), generator=generator, dtype=matrix.dtype).to(matrix.device)
    basis = torch.zeros(LANCZOS_STEPS, len(matrix), dtype=matrix.dtype, device=matrix.device)
    basis[0] = vector / vector.norm()
    for step in range(LANCZOS_STEPS - 1):
        product = matrix @ basis[step]
        product -= basis[: step + 1].T @ (basis[: step + 1] @ product)  # full reorthogonalisation, twice
        product -= basis[: step + 1].T @ (basis[: step + 1] @ product)
        basis[step + 1] = product / product.norm().clamp_min(torch.finfo(matrix.dtype).tiny)
    return torch.linalg.eigvalsh(basis @ matrix @ basis.T)
