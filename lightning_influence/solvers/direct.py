"""Direct inversion: form H explicitly, factorise H + λI once (Cholesky), solve every right-hand side."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from .base import Solver, spectrum_report, work_dtype


class DirectSolver(Solver, method="direct"):
    """Exact (H + λI)⁻¹ via the explicit p × p Hessian; for models with at most a few thousand parameters.

    Cholesky when H + λI is positive definite. Otherwise the symmetric eigendecomposition is used, with
    eigenvalues of magnitude below `eigen_rtol` · max |eigenvalue| left out (a pseudo-inverse). The spectrum of
    H is always computed for the report: warnings name the smallest eigenvalue and a regularisation that
    fixes an indefinite or ill-conditioned matrix, or a λ that swamps the curvature.
    """

    collective_solve = False

    def __init__(self, eigen_rtol: float = 1e-10) -> None:
        super().__init__()
        if not 0 <= eigen_rtol < 1:
            raise ValueError(f"eigen_rtol must be in [0, 1), got {eigen_rtol!r}.")
        self.eigen_rtol = eigen_rtol
        self._cholesky: Tensor | None = None
        self._eigen: tuple[Tensor, Tensor] | None = None

    def _fit(self) -> dict[str, Any]:
        operator = self._fitted()
        dtype = work_dtype(operator.device)
        hessian = operator.dense().to(dtype)
        hessian = (hessian + hessian.T) / 2
        report = spectrum_report(torch.linalg.eigvalsh(hessian), self.regularization, operator.dtype, complete=True)
        matrix = hessian + self.regularization * torch.eye(operator.num_params, dtype=dtype, device=operator.device)
        factor, status = torch.linalg.cholesky_ex(matrix)
        if int(status) == 0:
            self._cholesky, self._eigen = factor, None
            return {"factorization": "cholesky", **report}
        self._cholesky, self._eigen = None, torch.linalg.eigh(matrix)
        warnings.warn(
            "direct: Cholesky failed, so H + λI is solved with an eigendecomposition pseudo-inverse "
            f"(eigenvalues below {self.eigen_rtol:g} × the largest in magnitude are left out).",
            RuntimeWarning,
            stacklevel=3,
        )
        return {"factorization": "eigh", **report}

    def _solve(self, rhs: Tensor) -> tuple[Tensor, dict[str, Any]]:
        columns = rhs.T.to(work_dtype(rhs.device))
        if self._cholesky is not None:
            solution = torch.cholesky_solve(columns, self._cholesky)
        else:
            assert self._eigen is not None
            eigenvalues, eigenvectors = self._eigen
            keep = eigenvalues.abs() > self.eigen_rtol * eigenvalues.abs().max()
            inverse = torch.where(keep, 1.0 / torch.where(keep, eigenvalues, torch.ones_like(eigenvalues)), 0.0)
            solution = eigenvectors @ (inverse.unsqueeze(1) * (eigenvectors.T @ columns))
        return solution.T.to(rhs.dtype), {}
