"""One interface for every inversion method: fit once on the curvature, then solve for many right-hand sides."""

from __future__ import annotations

import functools
import inspect
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Concatenate, NamedTuple, ParamSpec, TypeVar, cast

import torch
from torch import Tensor

from lightning_influence.curvature.operator import CurvatureOperator
from lightning_influence.enums import InversionMethod
from lightning_influence.errors import IndefiniteCurvatureError, NotFittedError, warn_user
from lightning_influence.model.twice_differentiable import check_finite
from .krylov import block_conjugate_gradient, block_lanczos

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
    #: The attributes `fit` sets and solving reads (tensors, numbers, dtypes, lists or tuples of them): what
    #: `state_dict` saves and `from_state_dict` restores, so that a solver fitted once solves again elsewhere (from
    #: a saved result) without the passes of its fit.
    fitted_state: ClassVar[tuple[str, ...]] = ()

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
        self.on_negative_curvature = "warn"
        self._indefinite: dict[str, Any] | None = None  # set when a fit or solve finds H + λI indefinite
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

    def fit(
        self, operator: CurvatureOperator, regularization: float | str = 0.0, on_negative_curvature: str = "warn"
    ) -> Solver:
        """Prepare to solve with (H + λI) for the operator's H and λ = `regularization` ≥ 0.

        `regularization="auto"` takes λ from `auto_regularization` and records the choice in the info.
        `on_negative_curvature` says what happens where H + λI is found not positive definite: ``"warn"`` (once per
        fit; iterative solves stop at the first such direction and keep their best iterate) or ``"raise"``
        (`IndefiniteCurvatureError`). Both are taken as given: they are validated once, where they enter
        (`InfluenceArguments`).
        """
        self._operator = None
        self._indefinite = None
        self.on_negative_curvature = on_negative_curvature
        start = time.perf_counter()
        damping_info: dict[str, Any] = {"regularization_source": "given"}
        if regularization == "auto":
            regularization, damping_info = auto_regularization(operator)
        self.regularization = float(regularization)
        self.fit_info = {**damping_info, **(self._fit(operator) or {})}
        self.fit_info["fit_seconds"] = time.perf_counter() - start
        self.fit_info["hessian_passes"] = operator.passes
        self._operator = operator
        return self

    def found_indefinite(self, smallest: float, source: str, *, exact: bool, largest: float = 0.0) -> dict[str, Any]:
        """Report that H + λI is not positive definite: H has the eigenvalue `smallest` (an upper bound on the
        smallest one unless `exact`), found by `source`. Warns once per fit, or raises `IndefiniteCurvatureError`
        under ``on_negative_curvature="raise"``; returns the facts for the info, with the λ that fixes it:
        λ > −smallest, plus a margin of a tenth of that (or 1e-3 of the `largest` eigenvalue, if more)."""
        needed = max(-smallest, 0.0)
        suggested = needed + max(0.1 * needed, 1e-3 * abs(largest))
        lower = "" if exact else " or lower"
        message = (
            f"H + λI is not positive definite (smallest eigenvalue {smallest:.3e}{lower} with λ = "
            f"{self.regularization:g}, found by {source}): influence of an indefinite Hessian is unreliable. A "
            f"hessian_regularization of about {suggested:.3g}{'' if exact else ' or more'} makes it positive "
            "definite; or use curvature='ggn' (the Gauss-Newton matrix, positive semi-definite)."
        )
        if self.on_negative_curvature == "raise":
            raise IndefiniteCurvatureError(message)
        if self._indefinite is None:
            warn_user(message, RuntimeWarning)
            self._indefinite = {"smallest_eigenvalue_estimate": smallest}
        return {"indefinite": True, "smallest_eigenvalue_estimate": smallest, "suggested_regularization": suggested}

    def _krylov_limit(self, maxiter: int) -> int:
        """Iterations a Krylov solve may take: `maxiter`, or no more than the solve that found this system
        indefinite took (at least one), so that no later solve grinds on a system known to be indefinite."""
        if self._indefinite is None or "iterations" not in self._indefinite:
            return maxiter
        return min(maxiter, max(1, self._indefinite["iterations"]))

    def _check_krylov(self, info: dict[str, Any], loop: str) -> dict[str, Any]:
        """The facts (and the warning or error) for a Krylov solve that met non-positive curvature; {} otherwise.
        Its Rayleigh quotient ρ of H + λI bounds H's smallest eigenvalue from above by ρ − λ."""
        if not info["negative_curvature"]:
            return {}
        source = (f"{loop}, which stopped at iteration {info['iterations']} on a direction of non-positive "
                  f"curvature and kept its best iterate (Rayleigh quotient)")
        facts = self.found_indefinite(info["curvature_rayleigh_quotient"] - self.regularization, source,
                                      exact=False)
        self._indefinite.setdefault("iterations", info["iterations"])  # type: ignore[union-attr]  # set above
        return facts

    @fit_required
    def state_dict(self) -> dict[str, Any]:
        """What solving needs without fitting again: the method, its options, λ, the curvature options of the
        operator it was fitted on, the fit's facts and the `fitted_state` attributes."""
        return {
            "method": self.method.value, "options": self.options, "regularization": self.regularization,
            "on_negative_curvature": self.on_negative_curvature, "indefinite": self._indefinite,
            "curvature": self.operator.curvature, "block_diagonal": self.operator.block_diagonal,
            "fit_info": self.fit_info, "fitted": {name: getattr(self, name) for name in self.fitted_state},
        }

    @staticmethod
    def from_state_dict(state: dict[str, Any], operator: CurvatureOperator) -> Solver:
        """The solver a `state_dict` describes, fitted, solving with `operator`: an operator of the same model and
        parameters, with the curvature options `state` names (over the training data when the method's solves
        make passes, `collective_solve`; over none otherwise). No pass over the data is made here."""
        solver = make_solver(state["method"], **state["options"])
        solver.regularization = float(state["regularization"])
        solver.on_negative_curvature = state["on_negative_curvature"]
        solver._indefinite = state["indefinite"]
        solver.fit_info = dict(state["fit_info"])
        for name in solver.fitted_state:
            setattr(solver, name, _to_device(state["fitted"][name], operator.device))
        solver._restore(operator)
        solver._operator = operator
        return solver

    def _restore(self, operator: CurvatureOperator) -> None:
        """Rebuild, from `operator`, fitted state that `fitted_state` leaves out (structures of the model)."""

    @fit_required
    def solve(self, rhs: Tensor) -> InverseHvpResult:
        """x = (H + λI)⁻¹ b for each row b of `rhs` ([M, p] or [p]), all rows in one batched computation."""
        single = rhs.ndim == 1
        block = self._block(rhs.unsqueeze(0) if single else rhs)
        solution, _, info = self._reported(self._solve_with_forms, block, forms=False)
        return InverseHvpResult(solution.squeeze(0) if single else solution, info)

    def _reported(self, compute: Callable[..., tuple[Tensor, Tensor | None, dict[str, Any]]], block: Tensor,
                  **options: Any) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
        """`compute(block, **options)` checked finite, with the method, options, λ, fit facts, time and passes
        added to what it reports."""
        start, passes = time.perf_counter(), self.operator.passes
        solution, values, info = compute(block, **options)
        check_finite(solution, f"the {self.method.value} solution")
        info = {
            "method": self.method.value,
            "options": self.options,
            "regularization": self.regularization,
            **self.fit_info,
            **info,
            "solve_seconds": time.perf_counter() - start,
            "solve_hessian_passes": self.operator.passes - passes,
        }
        return solution, values, info

    def _solve_with_forms(self, block: Tensor, forms: bool) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
        """`_solve`, and with `forms` the quadratic forms ⟨x, b⟩ of its rows."""
        solution, info = self._solve(block)
        return solution, (solution * block).sum(1) if forms else None, info

    @fit_required
    def quadratic_forms(self, rhs: Tensor) -> tuple[Tensor, InverseHvpResult]:
        """⟨(H + λI)⁻¹bᵢ, bᵢ⟩ for each row bᵢ of `rhs` [n, p], [n] (self-influence, for training gradients), and
        the solve they came from (its x and info, for the trust checks).

        Iterative methods need less for these than for the solutions: for any x = x* − e with residual
        r = b − (H + λI)x, ⟨x, b + r⟩ = ⟨x*, b⟩ − ‖e‖²_(H+λI), an error of the square of the solution's (and CG's
        ⟨x, b⟩ is that already: its residual is orthogonal to x). Solvers that exploit it override `_quadratic`.
        """
        solution, values, info = self._reported(self._quadratic, self._block(rhs))
        return values, InverseHvpResult(solution, info)

    def _quadratic(self, block: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """The solutions of `block`, their quadratic forms and the solve's facts."""
        solution, values, info = self._solve_with_forms(block, forms=True)
        return solution, values, info  # type: ignore[return-value]  # forms=True gives values

    def _block(self, rhs: Tensor) -> Tensor:
        """`rhs` [M, p] on the operator's device and dtype; a ValueError for any other shape."""
        operator = self.operator
        if rhs.ndim != 2 or rhs.shape[1] != operator.gradient_dim:
            raise ValueError(
                f"Right-hand sides must have shape [M, {operator.gradient_dim}] (one row per query), "
                f"got {tuple(rhs.shape)}."
            )
        return rhs.to(device=operator.device, dtype=operator.dtype)

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

    `refine=k` then runs k steps of block conjugate gradient on the exact system (H + λI) x = b, preconditioned by
    M⁻¹, whose first block of search directions holds the approximation x₀ = M⁻¹b itself: each step is one pass
    over the training data for all right-hand sides together, the residual of x₀ comes with the first, and every
    right-hand side searches the directions of all of them. The approximation handles the directions it models;
    the steps recover part of what it misses (for a low-rank inverse, the many low-curvature directions that
    dominate influence). The answer is, row by row, the iterate with the smallest residual, never worse than x₀;
    at a direction of non-positive curvature the steps stop (see `found_indefinite`). `refine=0` returns M⁻¹b
    and solves without touching the data.
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
        return self._refined(rhs, self.refine)

    def _quadratic(self, block: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """⟨(H + λI)⁻¹bᵢ, bᵢ⟩ after ⌈refine / 2⌉ steps: block CG's ⟨x, b⟩ is off by ‖e‖²_(H+λI), the square of
        its solution's error (see `Solver.quadratic_forms`), so half the passes give the accuracy of a solve."""
        solution, info = self._refined(block, math.ceil(self.refine / 2))
        return solution, (solution * block).sum(1), info

    def _refined(self, rhs: Tensor, steps: int) -> tuple[Tensor, dict[str, Any]]:
        """M⁻¹B refined by `steps` steps of block CG (none: M⁻¹B as it is), and the facts."""
        if not steps:
            return self._approximate(rhs), {}
        solution, info = block_conjugate_gradient(self.apply_damped, rhs, self._approximate,
                                                  start_preconditioned=True, maxiter=self._krylov_limit(steps))
        return solution, {
            "refine_iterations": info["iterations"],
            "max_relative_residual": info["max_relative_residual"],
            "mean_relative_residual": info["mean_relative_residual"],
            **self._check_krylov(info, "refine"),
        }

    @abstractmethod
    def _approximate(self, rhs: Tensor) -> Tensor:
        """M⁻¹ B for a block [M, p] of right-hand sides, from what `fit` stored."""


#: λ = AUTO_DAMPING_FRACTION × (mean eigenvalue of H) when hessian_regularization="auto".
AUTO_DAMPING_FRACTION = 0.1


def auto_regularization(operator: CurvatureOperator, num_probes: int = 32) -> tuple[float, dict[str, Any]]:
    """λ for hessian_regularization="auto": AUTO_DAMPING_FRACTION × trace(H)/p, a tenth of the curvature's mean
    eigenvalue (the heuristic of Grosse et al., 2023), with trace(H) exact for p ≤ `num_probes` and otherwise
    Hutchinson's estimate from `num_probes` sign vectors (one pass); and the facts for the info."""
    mean_eigenvalue = float(operator.diagonal(num_probes).mean())
    return AUTO_DAMPING_FRACTION * abs(mean_eigenvalue), {
        "regularization_source": f"auto: {AUTO_DAMPING_FRACTION:g} × trace/p of the {operator.curvature}",
        "mean_eigenvalue_estimate": mean_eigenvalue,
    }


def lanczos_basis(operator: CurvatureOperator, dimension: int, block_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """`block_lanczos` on H: an orthonormal block Krylov basis Q [k, p] and T = Q H Qᵀ in the work dtype, with
    min(`block_size`, k) vectors per pass over the data."""
    dtype = work_dtype(operator.device)
    return block_lanczos(
        lambda block: operator.matmat(block.to(operator.dtype)).to(dtype), operator.gradient_dim, dimension,
        min(block_size, dimension), torch.Generator(device="cpu").manual_seed(seed), dtype=dtype,
        device=operator.device,
    )


def extreme_eigenvalues(operator: CurvatureOperator, steps: int = 6, block_size: int = 8, seed: int = 0
                        ) -> tuple[float, float]:
    """(smallest, largest) Ritz values of H from `steps` block Lanczos steps of `block_size` vectors each (one pass
    per step). The largest is accurate to a few digits for a spectrum with a few dominant eigenvalues; the
    smallest bounds H's smallest eigenvalue from above and finds negative eigenvalues that stand out of the bulk."""
    _, projected = lanczos_basis(operator, min(operator.gradient_dim, steps * block_size), block_size, seed)
    values = torch.linalg.eigvalsh(projected)
    return float(values[0]), float(values[-1])


def spectrum_report(solver: Solver, eigenvalues: Tensor, dtype: torch.dtype, *, complete: bool) -> dict:
    """Facts about the eigenvalues of H that `solver` saw, with warnings where influence becomes unreliable.

    Reports H + λI that is not positive definite (`Solver.found_indefinite`), warns when it is ill-conditioned
    for `dtype` (only when the spectrum is `complete`; a low-rank method sees the top of it alone), and when λ
    exceeds the largest eigenvalue, so that damping swamps the curvature and scores reduce to gradient
    similarity. Each warning names the smallest eigenvalue and a hessian_regularization that would fix it.
    """
    regularization = solver.regularization
    smallest, largest = float(eigenvalues.min()), float(eigenvalues.abs().max())
    info: dict[str, Any] = {"min_eigenvalue": smallest, "max_eigenvalue": float(eigenvalues.max())}
    damped_min = smallest + regularization
    if damped_min <= 0:
        source = "the full eigendecomposition" if complete else "the Ritz values of the kept subspace"
        info.update(solver.found_indefinite(smallest, source, exact=complete, largest=largest))
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


def _to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (through lists and tuples) moved to `device`."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(item, device) for item in value)
    return value


def work_dtype(device: torch.device) -> torch.dtype:
    """float64 for small dense factorisations, except where the device lacks it (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64
