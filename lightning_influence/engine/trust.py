"""Whether the numbers of an influence run can be trusted: each solve's convergence, and bounds its values keep.

For a symmetric positive definite A = H + λI (or G + λI) whose smallest eigenvalue is at least μ > 0, every
solution x = A⁻¹g of a right-hand side g obeys

    (1) ⟨x, g⟩ = gᵀA⁻¹g ≥ 0,       so self-influence and a factor's score on its own query are never negative;
    (2) ‖x‖ ≤ ‖g‖ / μ,             so self-influence ≤ ‖g‖²/μ and |I_up(m, i)| ≤ ‖s_m‖‖gᵢ‖ ≤ ‖g_m‖‖gᵢ‖/μ.

Both also hold for an unfinished conjugate-gradient iterate (a Galerkin solution x = V(VᵀAV)⁻¹Vᵀg over its
Krylov space, and λ_min(VᵀAV) ≥ μ), for a truncated Neumann series (LiSSA), and for any approximate inverse
whose eigenvalues lie in (0, 1/μ]; so a solution that breaks them came from an indefinite system or a diverged
solve. (1) is checked on every solve, with a tolerance of `NEGATIVE_TOLERANCE`·‖x‖‖g‖ for rounding. (2) needs
μ, known cheaply in two cases: with `curvature="ggn"` G is positive semi-definite, so μ ≥ λ; and a solution
computed from a spectrum the solver found (``direct``, and ``arnoldi``/``nystroem``/``ekfac`` without
``refine``) has μ ≥ λ + min(0, smallest eigenvalue found). Elsewhere (``cg``, ``lissa`` or ``refine`` on the
Hessian) (2) is not checked. The scores need no check of their own: they are products of checked factors with
finite gradients, so (2) on the factors bounds them. A solver's own ``converged`` flag, and an ``indefinite``
flag or a smallest eigenvalue ≤ −λ in its info, are taken as reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

#: ⟨x, g⟩ below −NEGATIVE_TOLERANCE · ‖x‖‖g‖ counts as negative (rounding aside).
NEGATIVE_TOLERANCE = 1e-3
#: ‖x‖ above BOUND_SLACK · ‖g‖ / μ counts as beyond the bound (room for rounding and Chebyshev overshoot).
BOUND_SLACK = 1.1
#: Methods that solve the exact system by iteration, without a spectrum of it.
ITERATIVE_METHODS = ("cg", "lissa")
#: Convergence facts copied from a solver's info (those it reports), and how records of several solves merge.
_MAXIMA = ("iterations", "refine_iterations", "max_relative_residual", "max_relative_change", "max_abs")
_SUMS = ("solves", "rows", "unconverged", "negative", "beyond_bound")
_DEFINITE = "increase hessian_regularization, or use curvature='ggn' (positive semi-definite) with λ > 0."


def eigenvalue_floor(info: dict[str, Any], curvature: str) -> float | None:
    """μ > 0 below every eigenvalue of the system the solver solved, where it is known cheaply (module docstring);
    None otherwise."""
    regularization = float(info.get("regularization", 0.0))
    smallest = info.get("min_eigenvalue")
    spectral = info.get("method") not in ITERATIVE_METHODS and not info.get("options", {}).get("refine")
    if curvature != "ggn" and not (spectral and isinstance(smallest, (int, float))):
        return None
    floor = regularization + min(0.0, float(smallest)) if isinstance(smallest, (int, float)) else regularization
    return floor if floor > 0 else None


def solve_record(rhs: Tensor, solution: Tensor, info: dict[str, Any], curvature: str) -> dict[str, Any]:
    """What one solve x = (H + λI)⁻¹ g of the rows of `rhs` reports and how many rows break bounds (1) and (2)."""
    record: dict[str, Any] = {"solves": 1, "rows": int(rhs.shape[0])}
    record.update({k: info[k] for k in (*_MAXIMA, "converged", "unconverged", "min_eigenvalue") if k in info})
    smallest = info.get("min_eigenvalue")
    regularization = float(info.get("regularization", 0.0))
    record["indefinite"] = bool(info.get("indefinite")) or (
        isinstance(smallest, (int, float)) and smallest + regularization <= 0)
    solution_norm, rhs_norm = solution.norm(dim=1), rhs.norm(dim=1)
    products = (solution * rhs).sum(1)
    record["negative"] = int((products < -NEGATIVE_TOLERANCE * solution_norm * rhs_norm).sum())
    floor = eigenvalue_floor(info, curvature)
    record["eigenvalue_floor"] = floor
    record["beyond_bound"] = 0 if floor is None else int((solution_norm > BOUND_SLACK * rhs_norm / floor).sum())
    return record


def merge_records(records: Sequence[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """One record for several solves (a chunk, a stage): maxima and sums, converged only if every solve that
    reports it did, the smallest eigenvalue and floor seen, indefinite if any was; `extra` added as it is."""
    merged: dict[str, Any] = {key: 0 for key in _SUMS}
    for record in records:
        for key in _SUMS:
            merged[key] += record.get(key, 0)
        for key in _MAXIMA:
            if record.get(key) is not None:
                merged[key] = max(merged.get(key, record[key]), record[key])
        for key in ("min_eigenvalue", "eigenvalue_floor"):
            if record.get(key) is not None:
                merged[key] = min(merged.get(key, record[key]), record[key])
        if record.get("converged") is not None:
            merged["converged"] = merged.get("converged", True) and bool(record["converged"])
        merged["indefinite"] = merged.get("indefinite", False) or bool(record.get("indefinite"))
    return {**merged, **extra}


def stage_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A chunked stage's record: merged over its chunks, with the chunks' own records where the stage solved."""
    merged = merge_records(records, chunks=len(records))
    if merged["solves"]:
        merged["chunk_records"] = list(records)
    return merged


def record_warnings(stage: str, record: dict[str, Any], troubled: str = "") -> list[str]:
    """One sentence per way `record` (of `stage`) is not trustworthy; empty when it is. `troubled` says which
    parts (e.g. "in 2 of 9 chunks")."""
    where = f" {troubled}" if troubled else ""
    found = []
    if record.get("converged") is False:
        residual = record.get("max_relative_residual", record.get("max_relative_change"))
        detail = f", largest relative residual {residual:.2e}" if isinstance(residual, (int, float)) else ""
        found.append(f"The {stage} did not converge{where} ({record.get('iterations')} iterations{detail}): raise "
                     "the method's maxiter (or refine), or increase hessian_regularization.")
    if record.get("indefinite"):
        smallest = record.get("min_eigenvalue")
        detail = f" (smallest eigenvalue {smallest:.3e})" if isinstance(smallest, (int, float)) else ""
        found.append(f"The {stage} solved an H + λI that is not positive definite{detail}{where}, where influence "
                     f"is unreliable: {_DEFINITE}")
    if record.get("negative"):
        found.append(f"{record['negative']} of {record['rows']} {stage} values ⟨(H + λI)⁻¹g, g⟩ are negative{where}, "
                     f"which a positive definite H + λI cannot give: {_DEFINITE}")
    if record.get("beyond_bound"):
        found.append(f"{record['beyond_bound']} of {record['rows']} {stage} solutions exceed ‖g‖/μ{where} (μ = "
                     f"{record['eigenvalue_floor']:.3g}, the least eigenvalue H + λI can have), so the solve "
                     "diverged: increase hessian_regularization, or raise the method's maxiter.")
    return found


def chunked_warnings(stage: str, records: Sequence[dict[str, Any]]) -> list[str]:
    """The warnings of a chunked stage: those of its chunks merged, naming how many chunks are troubled."""
    troubled = [r for r in records if record_warnings(stage, r)]
    if not troubled:
        return []
    return record_warnings(stage, merge_records(troubled), f"in {len(troubled)} of {len(records)} chunks")
