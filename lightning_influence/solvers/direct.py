"""Direct inversion: form H explicitly, factorise H + λI once (Cholesky), solve every right-hand side."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from .base import Solver, work_dtype


class DirectSolver(Solver, method="direct"):
    """Exact (H + λI)⁻¹ via the explicit p × p Hessian; for models with at most a few thousand parameters.

    Cholesky when H + λI is positive definite. Otherwise the symmetric eigendecomposition is used, with
    eigenvalues of magnitude below `eigen_rtol` · max |eigenvalue| left out (a pseudo-inverse), and a warning
    names the smallest eigenvalue and a regularisation that would make the matrix positive definite.
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
        matrix = (hessian + hessian.T) / 2 + self.regularization * torch.eye(
            operator.num_params, dtype=dtype, device=operator.device
        )
        factor, status = torch.linalg.cholesky_ex(matrix)
        if int(status) == 0:
            self._cholesky, self._eigen = factor, None
            return {"factorization": "cholesky"}
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
        self._cholesky, self._eigen = None, (eigenvalues, eigenvectors)
        smallest = float(eigenvalues[0])
        suggestion = self.regularization - smallest + 1e-3 * float(eigenvalues.abs().max())
        warnings.warn(
            f"H + λI is not positive definite (smallest eigenvalue {smallest:.3e} with λ = "
            f"{self.regularization:g}); solving with an eigendecomposition pseudo-inverse instead. Influence of an "
            f"indefinite Hessian is unreliable: a hessian_regularization of about {suggestion:.3g} makes it "
            "positive definite.",
            RuntimeWarning,
            stacklevel=3,
        )
        return {
            "factorization": "eigh",
            "min_eigenvalue": smallest,
            "max_eigenvalue": float(eigenvalues[-1]),
            "suggested_regularization": suggestion,
        }

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
