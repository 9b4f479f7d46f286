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
    H is always computed for the report: warnings name the smallest eigenvalue and a regularisation that
    fixes an indefinite or ill-conditioned matrix, or a λ that swamps the curvature.
    """

    collective_solve = False  # type: ignore[assignment]  # solves from the stored factorisation

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
        matrices = [hessian[block, block] for _, block in operator.blocks]
        eigenvalues = torch.cat([torch.linalg.eigvalsh(matrix) for matrix in matrices])
        report = spectrum_report(self, eigenvalues, operator.dtype, complete=True)
        self._factors = []
        for matrix in matrices:
            damped = matrix + self.regularization * torch.eye(len(matrix), dtype=dtype, device=operator.device)
            factor, status = torch.linalg.cholesky_ex(damped)
            self._factors.append(factor if int(status) == 0 else torch.linalg.eigh(damped))
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
