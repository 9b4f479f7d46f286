"""Inversion methods: each module registers one `Solver` subclass for one `InversionMethod`."""

from . import arnoldi, cg, direct, ekfac, lissa, nystroem  # noqa: F401  (importing registers the solvers)
from .base import InverseHvpResult, Solver, make_solver

__all__ = ["InverseHvpResult", "Solver", "make_solver"]
