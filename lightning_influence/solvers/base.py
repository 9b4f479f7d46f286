"""One interface for every inversion method: fit once on the curvature, then solve for many right-hand sides."""

from __future__ import annotations

import functools
import inspect
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Concatenate, NamedTuple, ParamSpec, TypeVar, cast

import torch
from torch import Tensor

from lightning_influence.curvature.operator import CurvatureOperator
from lightning_influence.enums import InversionMethod
from lightning_influence.errors import NotFittedError, warn_user
from lightning_influence.model.twice_differentiable import check_finite
from .krylov import block_conjugate_gradient

SolverT = TypeVar("SolverT", bound="Solver")
Params = ParamSpec("Params")
Result = TypeVar("Result")


def fit_required(
    method: Callable[Concatenate[SolverT, Params], Result],
) -> Callable[Concatenate[SolverT, Params], Result]:
    """Make `method` (or a property's getter) of a solver raise NotFittedError, naming the call to make first, until
    `fit` has completed; the one check of fitted state for every solver."""

    @functools.wraps(method)
    def checked(self: SolverT, /, *args: Params.args, **kwargs: Params.kwargs) -> Result:
        if not self.is_fitted:
            raise NotFittedError(f"{type(self).__name__}.{method.__name__} needs fit(operator, regularization) first")
        return method(self, *args, **kwargs)

    return checked


class InverseHvpResult(NamedTuple):
    """Solutions x = (H + λI)⁻¹ b as rows of `x` [M, p], and what the solver reports about them in `info`."""

    x: Tensor
    info: dict[str, Any]


class Solver(ABC):
    """Computes (H + λI)⁻¹ B for the curvature H of a `CurvatureOperator`.

    Subclasses register themselves for an `InversionMethod` with ``class X(Solver, method="name")``, take
    their options as keyword arguments of `__init__` (validated there), and implement `_fit` and `_solve`. Every
    method that needs fitted state is marked `@fit_required`; `_fit` gets the operator as its argument, and the
    other methods reach it as `self.operator`.
    """

    registry: ClassVar[dict[InversionMethod, type[Solver]]] = {}
    method: ClassVar[InversionMethod]

    @property
    def collective_solve(self) -> bool:
        """Whether `solve` makes passes over the training data (reduced across processes), so that every process
        must solve the same block at the same time. False for methods that solve from what `fit` stored."""
        return True

    def __init_subclass__(cls, method: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if method is not None:
            cls.method = InversionMethod.parse(method)
            Solver.registry[cls.method] = cls

    def __init__(self) -> None:
        self._operator: CurvatureOperator | None = None  # set once `fit` has completed
        self.regularization = 0.0
        self.fit_info: dict[str, Any] = {}

    @property
    def is_fitted(self) -> bool:
        """Whether `fit` has completed (a failed `fit` leaves the solver unfitted)."""
        return self._operator is not None

    @property
    @fit_required
    def operator(self) -> CurvatureOperator:
        """The curvature operator of the last `fit`."""
        return cast(CurvatureOperator, self._operator)  # set by `fit`

    @property
    def options(self) -> dict[str, Any]:
        """The constructor options as given (after defaults), for metadata."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        return {name: getattr(self, name) for name in names}

    def fit(self, operator: CurvatureOperator, regularization: float | str = 0.0) -> Solver:
        """Prepare to solve with (H + λI) for the operator's H and λ = `regularization` ≥ 0.

        `regularization="auto"` takes λ = AUTO_DAMPING_FRACTION · trace(H)/p (a fraction of the mean
        eigenvalue; trace by Hutchinson's estimator for large p) and records the choice in the info. λ is taken
        as given: it is validated once, where it enters (`InfluenceArguments`).
        """
        self._operator = None
        start = time.perf_counter()
        damping_info: dict[str, Any] = {"regularization_source": "given"}
        if regularization == "auto":
            mean_eigenvalue = float(operator.diagonal().mean())
            regularization = AUTO_DAMPING_FRACTION * abs(mean_eigenvalue)
            damping_info = {
                "regularization_source": f"auto: {AUTO_DAMPING_FRACTION:g} × trace(H)/p",
                "mean_eigenvalue_estimate": mean_eigenvalue,
            }
        self.regularization = float(regularization)
        self.fit_info = {**damping_info, **(self._fit(operator) or {})}
        self.fit_info["fit_seconds"] = time.perf_counter() - start
        self.fit_info["hessian_passes"] = operator.passes
        self._operator = operator
        return self

    @fit_required
    def solve(self, rhs: Tensor) -> InverseHvpResult:
        """x = (H + λI)⁻¹ b for each row b of `rhs` ([M, p] or [p]), all rows in one batched computation."""
        operator = self.operator
        single = rhs.ndim == 1
        block = rhs.unsqueeze(0) if single else rhs
        if block.ndim != 2 or block.shape[1] != operator.num_params:
            raise ValueError(
                f"Right-hand sides must have shape [M, {operator.num_params}] (one row per query), "
                f"got {tuple(rhs.shape)}."
            )
        block = block.to(device=operator.device, dtype=operator.dtype)
        start = time.perf_counter()
        passes = operator.passes
        solution, info = self._solve(block)
        check_finite(solution, f"the {self.method.value} solution")
        info = {
            "method": self.method.value,
            "options": self.options,
            "regularization": self.regularization,
            **self.fit_info,
            **info,
            "solve_seconds": time.perf_counter() - start,
            "solve_hessian_passes": operator.passes - passes,
        }
        return InverseHvpResult(solution.squeeze(0) if single else solution, info)

    @fit_required
    def apply_damped(self, vectors: Tensor) -> Tensor:
        """(H + λI) V for a block of vectors."""
        product = self.operator.matmat(vectors)
        return product + self.regularization * vectors if self.regularization else product

    @abstractmethod
    def _fit(self, operator: CurvatureOperator) -> dict[str, Any] | None:
        """Build what solving needs from `operator` (with λ = `self.regularization`); return facts for the
        metadata."""

    @abstractmethod
    def _solve(self, rhs: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Solve for a block [M, p] of right-hand sides; return the block and convergence facts."""


class ApproximateSolver(Solver):
    """A method that stores an approximate inverse M⁻¹ ≈ (H + λI)⁻¹ at fit time (arnoldi, ekfac, nystroem).

    `refine=k` then runs k steps of block conjugate gradient on the exact system (H + λI) x = b, started at
    x₀ = M⁻¹b and preconditioned by M⁻¹. The approximation handles the directions it models; each step, one
    pass over the training data for all right-hand sides together, recovers part of what it misses (for a
    low-rank inverse, the many low-curvature directions that dominate influence), and every right-hand side
    searches the directions of all of them. The residual of x₀ costs one more pass. `refine=0` (default) returns
    M⁻¹b and solves without touching the data.
    """

    def __init__(self, refine: int = 0) -> None:
        super().__init__()
        if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
            raise ValueError(f"refine must be an integer ≥ 0 (conjugate-gradient steps), got {refine!r}.")
        self.refine = refine

    @property
    def collective_solve(self) -> bool:
        return self.refine > 0

    def _solve(self, rhs: Tensor) -> tuple[Tensor, dict[str, Any]]:
        initial = self._approximate(rhs)
        if not self.refine:
            return initial, {}
        solution, info = block_conjugate_gradient(self.apply_damped, rhs, self._approximate, initial=initial,
                                                  maxiter=self.refine)
        return solution, {
            "refine_iterations": info["iterations"],
            "max_relative_residual": info["max_relative_residual"],
            "mean_relative_residual": info["mean_relative_residual"],
        }

    @abstractmethod
    def _approximate(self, rhs: Tensor) -> Tensor:
        """M⁻¹ B for a block [M, p] of right-hand sides, from what `fit` stored."""


#: λ = AUTO_DAMPING_FRACTION × (mean eigenvalue of H) when hessian_regularization="auto".
AUTO_DAMPING_FRACTION = 0.1


def spectrum_report(eigenvalues: Tensor, regularization: float, dtype: torch.dtype, *, complete: bool) -> dict:
    """Facts about the eigenvalues of H that a solver saw, with warnings where influence becomes unreliable.

    Warns when H + λI is not positive definite, when it is ill-conditioned for `dtype` (only when the spectrum
    is `complete`; a low-rank method sees the top of it alone), and when λ exceeds the largest eigenvalue, so
    that damping swamps the curvature and scores reduce to gradient similarity. Each warning names the
    smallest eigenvalue and a hessian_regularization that would fix it.
    """
    smallest, largest = float(eigenvalues.min()), float(eigenvalues.abs().max())
    info: dict[str, Any] = {"min_eigenvalue": smallest, "max_eigenvalue": float(eigenvalues.max())}
    damped_min = smallest + regularization
    if damped_min <= 0:
        info["suggested_regularization"] = -smallest + 1e-3 * largest
        warn_user(
            f"H + λI is not positive definite (smallest eigenvalue {smallest:.3e} with λ = {regularization:g}): "
            "influence of an indefinite Hessian is unreliable. A hessian_regularization of about "
            f"{info['suggested_regularization']:.3g} makes it positive definite.",
            RuntimeWarning,
        )
    elif complete:
        condition = (largest + regularization) / damped_min
        info["condition_number"] = condition
        limit = 1e-2 / torch.finfo(dtype).eps
        if condition > limit:
            info["suggested_regularization"] = 100 * largest / limit
            warn_user(
                f"H + λI is ill-conditioned for {dtype} (condition number {condition:.2e}, smallest eigenvalue "
                f"{smallest:.3e} with λ = {regularization:g}): scores may be dominated by rounding. A "
                f"hessian_regularization of about {info['suggested_regularization']:.3g} brings the condition "
                f"number near {limit / 100:.0e}.",
                RuntimeWarning,
            )
    if largest > 0 and regularization > largest:
        warn_user(
            f"hessian_regularization λ = {regularization:g} exceeds the largest eigenvalue of H ({largest:.3e}): "
            "the damping swamps the curvature and influence reduces to gradient similarity. Use a λ well below "
            "the largest eigenvalue (e.g. 'auto').",
            RuntimeWarning,
        )
    return info


def make_solver(method: str | InversionMethod, **options: Any) -> Solver:
    """The solver registered for `method`, constructed with `options`; unknown options are named."""
    method = InversionMethod.parse(method)
    if method not in Solver.registry:
        raise NotImplementedError(f"The inversion method {method.value!r} is not available in this version.")
    cls = Solver.registry[method]
    accepted = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"Unknown option(s) {unknown} for inversion method {method.value!r}; it accepts {accepted}."
        )
    return cls(**options)


def work_dtype(device: torch.device) -> torch.dtype:
    """float64 for small dense factorisations, except where the device lacks it (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64
