"""Influence functions (Koh & Liang, 2017) for PyTorch models, on torch.func, with a Lightning callback."""

from .callback import InfluenceCallback
from .curvature import CurvatureOperator
from .distributed import DistributedStageError, Distribution
from .enums import InfluenceType, InversionMethod
from .errors import InfluenceComputationError, NonFiniteError
from .functional import (
    compute_influence_factors,
    compute_influences,
    compute_influences_pert,
    compute_influences_up,
    compute_self_influences,
    fit_solver,
)
from .result import InfluenceResult
from .reducer import DistributedReducer, LocalReducer, Reducer
from .solvers import InverseHvpResult, Solver, make_solver
from .twice_differentiable import TwiceDifferentiable

__version__ = "0.1.0"

__all__ = [
    "CurvatureOperator",
    "DistributedReducer",
    "DistributedStageError",
    "Distribution",
    "InfluenceCallback",
    "InfluenceComputationError",
    "InfluenceResult",
    "InfluenceType",
    "InverseHvpResult",
    "InversionMethod",
    "LocalReducer",
    "NonFiniteError",
    "Reducer",
    "Solver",
    "TwiceDifferentiable",
    "compute_influence_factors",
    "compute_influences",
    "compute_influences_pert",
    "compute_influences_up",
    "compute_self_influences",
    "fit_solver",
    "make_solver",
]
