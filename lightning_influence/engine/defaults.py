"""The choices behind "auto" (the callback's defaults), made when the curvature is fitted, each with its reason;
and the size of self-influence blocks.

Deep networks are trained to a point that is rarely a minimum: their Hessian H has negative eigenvalues, so
H + λI may be indefinite and (H + λI)⁻¹g is then no influence at all (Koh & Liang, 2017, assume a minimum).
The generalised Gauss–Newton matrix G is positive semi-definite, and (G + λI)⁻¹g is the response of the
proximal Bregman objective that training actually optimises (Bae et al., 2022); large-scale influence uses it
with a damping relative to its spectrum (Grosse et al., 2023). Hence:

- ``curvature="auto"``: the Hessian where a block Lanczos estimate of its smallest eigenvalue (an upper bound,
  `extreme_eigenvalues`: 6 passes of 8 vectors) leaves H + λI at least λ/2 from singular, else the GGN;
- ``hessian_regularization="auto"``: λ = 0.1 × trace(C)/p for the chosen curvature C (`auto_regularization`);
- ``method="auto"``: ``direct`` when its explicit matrices fit the memory budget (`DIRECT_BYTES_PER_ENTRY`·p²
  bytes within ``max_memory``, or `DIRECT_MEMORY` without one: p ≤ 3,344), else ``ekfac`` (its defaults, with
  refinement) when every selected parameter sits in a layer it supports, else ``cg`` with a Nyström
  preconditioner and rtol 1e-4.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning_influence.checks import Curvature
from lightning_influence.curvature.operator import CurvatureOperator
from lightning_influence.engine.arguments import InfluenceArguments
from lightning_influence.enums import InversionMethod
from lightning_influence.model.layers import COVERED, LayerStructure
from lightning_influence.model.twice_differentiable import TwiceDifferentiable
from lightning_influence.solvers import Solver
from lightning_influence.solvers.base import auto_regularization, extreme_eigenvalues

#: Bytes per entry of p × p that `direct` holds: the float64 matrix, its factor and a working copy.
DIRECT_BYTES_PER_ENTRY = 24
#: The budget for `direct`'s matrices when neither the run nor the model sets max_memory (p ≤ 3,344).
DIRECT_MEMORY = 256 * 2**20
#: cg's options where neither direct nor ekfac suits: a Nyström preconditioner, and rtol 1e-4 (self-influence
#: then solves to 1e-2, see `ConjugateGradientSolver.quadratic_forms`: on the CNN of benchmarks/mislabeled_cnn.py
#: 3.5 times faster than at cg's default 1e-6, with as many flipped labels found).
CG_OPTIONS: dict[str, Any] = {"preconditioner": "nystroem", "rtol": 1e-4}


@dataclass
class Choices:
    """The operator and options a run fits with, and why each was chosen (for the metadata)."""

    method: InversionMethod
    method_kwargs: dict[str, Any]
    operator: CurvatureOperator
    regularization: float | str  # a number, or "auto" for the solver to take on `operator`
    reasons: dict[str, Any] = field(default_factory=dict)
    regularization_reason: str | None = None  # None: the solver's own account (given, or its "auto")

    def record(self, solver: Solver) -> dict[str, Any]:
        """What was chosen and why, once `solver` is fitted (λ as it took it)."""
        return {"method": self.method.value, "method_kwargs": solver.options, "curvature": self.operator.curvature,
                "hessian_regularization": solver.regularization, **self.reasons,
                "regularization_reason": self.regularization_reason or solver.fit_info.get("regularization_source")}


def resolve(model: TwiceDifferentiable, arguments: InfluenceArguments,
            operator_for: Callable[[Curvature], CurvatureOperator]) -> Choices:
    """The method, options, operator and λ for `arguments`, "auto" resolved; the loss is checked on the first
    operator built (`CurvatureOperator.check`). Collective where it estimates eigenvalues (reduced passes)."""
    method, options, method_reason = choose_method(model, arguments)
    regularization = arguments.hessian_regularization
    if arguments.curvature != "auto":
        operator = operator_for(arguments.curvature)
        operator.check()
        return Choices(method, options, operator, regularization,
                       {"method_reason": method_reason, "curvature_reason": "given"})
    hessian = operator_for("hessian")
    hessian.check()
    reasons: dict[str, Any] = {"method_reason": method_reason}
    regularization_reason = None
    if regularization == "auto":
        regularization, facts = auto_regularization(hessian)
        regularization_reason = facts["regularization_source"]
    smallest, largest = extreme_eigenvalues(hessian)
    reasons.update(hessian_smallest_eigenvalue_estimate=smallest, hessian_largest_eigenvalue_estimate=largest)
    if smallest >= -float(regularization) / 2:
        reasons["curvature_reason"] = (
            f"auto: H + λI is positive definite by a block Lanczos estimate (smallest eigenvalue of H ≈ "
            f"{smallest:.3g}, λ = {float(regularization):.3g})")
        return Choices(method, options, hessian, regularization, reasons, regularization_reason)
    reasons["curvature_reason"] = (
        f"auto: H has an eigenvalue of about {smallest:.3g} or lower, below −λ/2 (λ = {float(regularization):.3g}), "
        "so the positive semi-definite Gauss–Newton matrix is used")
    if arguments.hessian_regularization == "auto":  # λ again, relative to the GGN's own spectrum
        regularization = "auto"
    return Choices(method, options, operator_for("ggn"), regularization, reasons)


def choose_method(model: TwiceDifferentiable, arguments: InfluenceArguments
                  ) -> tuple[InversionMethod, dict[str, Any], str]:
    """The inversion method and its options for `arguments` (resolving "auto"), and why."""
    if arguments.method != "auto":
        return InversionMethod.parse(arguments.method), dict(arguments.method_kwargs), "given"
    p = model.gradient_dim
    budget = arguments.max_memory or model.max_memory or DIRECT_MEMORY
    needed = DIRECT_BYTES_PER_ENTRY * p * p
    name = "p" if model.projection is None else "projected k"
    sizes = (f"{name} = {p:,}: direct's matrices take {needed / 2**20:,.1f} MiB of a {budget / 2**20:,.1f} MiB "
             "budget")
    if needed <= budget:
        return InversionMethod.direct, {}, f"auto: {sizes}"
    if LayerStructure.supports(model):
        return InversionMethod.ekfac, {}, f"auto: {sizes}; every selected layer is one ekfac covers ({COVERED})"
    return (InversionMethod.cg, dict(CG_OPTIONS),
            f"auto: {sizes}; some selected parameters are outside the layers ekfac supports")


#: Bytes for one self-influence block solve by an iterative method (its gradients and working copies) when neither
#: the run nor the model sets max_memory.
SELF_INFLUENCE_MEMORY = 256 * 2**20
#: [rows, p] blocks an iterative solve holds at once (gradients, solution, best iterate, residual, directions,
#: their products, the preconditioned residual, ...).
SOLVE_COPIES = 10
#: At most this many examples per block: on benchmark problem (a) a Hessian pass costs least per vector (0.42 ms)
#: with 512 vectors (0.74 ms with 64, 0.57 ms with 1,400).
SELF_INFLUENCE_ROWS = 512


def self_influence_rows(model: TwiceDifferentiable, solver: Solver, max_memory: int | None) -> int | None:
    """Training examples per self-influence solve: None (batch by batch) for a solver that solves without passes
    over the data; for one that makes passes, SELF_INFLUENCE_ROWS, or fewer where SOLVE_COPIES rows of
    `gradient_dim` values each would not fit in the budget (`max_memory`, else the model's, else
    SELF_INFLUENCE_MEMORY). A pass costs less per vector for more vectors, and block CG's iterations fall as the
    block grows."""
    if not solver.collective_solve:
        return None
    budget = max_memory or model.max_memory or SELF_INFLUENCE_MEMORY
    return max(1, min(SELF_INFLUENCE_ROWS, budget // (SOLVE_COPIES * model.gradient_dim * model.dtype.itemsize)))
