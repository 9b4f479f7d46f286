"""Influence functions (Koh & Liang, 2017) for PyTorch models, on torch.func, with a Lightning callback."""

from lightning_influence.lightning.callback import InfluenceCallback
from lightning_influence.curvature.operator import CurvatureOperator
from lightning_influence.engine.distribution import DistributedStageError, Distribution
from lightning_influence.enums import InfluenceType, InversionMethod
from lightning_influence.errors import InfluenceComputationError, NonFiniteError
from lightning_influence.engine.functional import (
    compute_influence_factors,
    compute_influences,
    compute_influences_pert,
    compute_influences_up,
    compute_self_influences,
    fit_solver,
)
from lightning_influence.storage.result import InfluenceResult
from lightning_influence.curvature.reducer import DistributedReducer, LocalReducer, Reducer
from lightning_influence.solvers import InverseHvpResult, Solver, make_solver
from lightning_influence.model.twice_differentiable import TwiceDifferentiable

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
