"""Influence functions (Koh & Liang, 2017) for PyTorch models, on torch.func, with a Lightning callback.

The engine runs without Lightning installed; `InfluenceCallback` and `validate` (the parts that need
pytorch_lightning) are imported on first use.
"""

from __future__ import annotations

from typing import Any

from lightning_influence.curvature.operator import CurvatureOperator
from lightning_influence.curvature.reducer import DistributedReducer, LocalReducer, Reducer
from lightning_influence.engine.arguments import InfluenceArguments
from lightning_influence.engine.distribution import DistributedStageError, Distribution
from lightning_influence.engine.dry_run import dry_run
from lightning_influence.engine.engine import InfluenceEngine
from lightning_influence.engine.functional import (
    compute_influence_factors,
    compute_influences,
    compute_influences_pert,
    compute_influences_up,
    compute_self_influences,
    fit_solver,
)
from lightning_influence.enums import InfluenceType, InversionMethod
from lightning_influence.errors import (
    ConvergenceError,
    InfluenceComputationError,
    NonFiniteError,
    NotFittedError,
    ResultMismatchError,
)
from lightning_influence.model.data import IndexedData
from lightning_influence.model.twice_differentiable import TwiceDifferentiable
from lightning_influence.solvers import InverseHvpResult, Solver, make_solver
from lightning_influence.storage.gradient_store import GradientStore
from lightning_influence.storage.result import InfluenceResult, QueryScores
from lightning_influence.storage.runs import compute_influence

__version__ = "0.1.0"

__all__ = [
    "ConvergenceError",
    "CurvatureOperator",
    "DistributedReducer",
    "DistributedStageError",
    "Distribution",
    "GradientStore",
    "IndexedData",
    "InfluenceArguments",
    "InfluenceCallback",
    "InfluenceComputationError",
    "InfluenceEngine",
    "InfluenceResult",
    "InfluenceType",
    "InverseHvpResult",
    "InversionMethod",
    "LocalReducer",
    "NonFiniteError",
    "NotFittedError",
    "QueryScores",
    "Reducer",
    "ResultMismatchError",
    "Solver",
    "TwiceDifferentiable",
    "compute_influence",
    "compute_influence_factors",
    "compute_influences",
    "compute_influences_pert",
    "compute_influences_up",
    "compute_self_influences",
    "dry_run",
    "fit_solver",
    "make_solver",
    "validate",
]


def __getattr__(name: str) -> Any:
    """`InfluenceCallback` and `validate` on first use, so that importing the engine does not import Lightning."""
    if name == "InfluenceCallback":
        from lightning_influence.lightning.callback import InfluenceCallback

        return InfluenceCallback
    if name == "validate":
        from lightning_influence.lightning.validation import validate

        return validate
    raise AttributeError(f"module 'lightning_influence' has no attribute {name!r}")
