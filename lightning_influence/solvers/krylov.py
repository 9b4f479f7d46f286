"""Krylov loops: preconditioned conjugate gradient on a block of right-hand sides (behind `cg` and `refine`), and
block Lanczos with full reorthogonalisation (behind `arnoldi` and the extreme-eigenvalue estimates).

Both CG loops stop at the first search direction of non-positive curvature (dᵀAd ≤ 0, or a block Gram matrix
PAPᵀ with an eigenvalue ≤ 0): A is then not positive definite, CG's minimisation has no minimum, and further
steps only grind. They return, row by row, the iterate with the smallest residual seen (never worse than where
they started) and report the Rayleigh quotient of the offending direction, an upper bound on A's smallest
eigenvalue; the caller words the warning, since it knows λ.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_influence.errors import NonFiniteError

#: What to do when a Krylov loop meets a singular or indefinite H + λI (most often λ = 0).
SINGULAR_HINT = (
    "H + λI is singular or not positive definite (as with hessian_regularization=0 on most networks): use "
    "hessian_regularization > 0 (or 'auto'), or curvature='ggn' with λ > 0."
)


def _linear_algebra_failures_named(loop: Callable[..., Any]) -> Callable[..., Any]:
    """`loop`, with a failure of its small dense linear algebra (an SVD of non-finite directions, a singular
    r × r system) raised as the documented NonFiniteError instead of torch's raw LinAlgError."""

    @functools.wraps(loop)
    def named(*args: Any, **kwargs: Any) -> Any:
        try:
            return loop(*args, **kwargs)
        except torch.linalg.LinAlgError as error:
            raise NonFiniteError(f"block conjugate gradient ({error})", hint=SINGULAR_HINT) from error

    return named

class _Best:
    """Per row, the iterate with the smallest residual norm seen so far."""

    def __init__(self, solution: Tensor, residual_norm: Tensor) -> None:
        self.solution, self.norm = solution.clone(), residual_norm.clone()

    def offer(self, rows: Tensor, solution: Tensor, residual_norm: Tensor) -> None:
        """Keep `solution` [len(rows), p] for the `rows` whose residual norm improved."""
        better = residual_norm < self.norm[rows]
        if bool(better.any()):
            chosen = rows[better]
            self.solution[chosen] = solution[better]
            self.norm[chosen] = residual_norm[better]


def conjugate_gradient(
    apply: Callable[[Tensor], Tensor],
    rhs: Tensor,
    precondition: Callable[[Tensor], Tensor],
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    maxiter: int,
) -> tuple[Tensor, dict[str, Any]]:
    """Preconditioned CG for A X = B, one recurrence per row of `rhs` [M, p], sharing each product with A.

    `apply(V)` is A V for a block of rows and `precondition(R)` applies a fixed symmetric positive definite
    P⁻¹ ≈ A⁻¹. A row stops (and is frozen) once ‖b − A x‖ ≤ max(rtol · ‖b‖, atol), so with both zero every row
    runs `maxiter` steps (unless its residual vanishes); later iterations multiply only the rows still running.
    Every row stops at the first direction of non-positive curvature in any row (see the module docstring).
    """
    rhs_norm = rhs.norm(dim=1)
    threshold = torch.clamp(rtol * rhs_norm, min=atol)
    solution, residual = torch.zeros_like(rhs), rhs.clone()
    best = _Best(solution, rhs_norm)
    preconditioned = precondition(residual)
    direction = preconditioned.clone()
    residual_dot = (residual * preconditioned).sum(1)
    active = residual.norm(dim=1) > threshold
    iterations, negative = 0, None
    while bool(active.any()) and iterations < maxiter:
        rows = active.nonzero().squeeze(1)
        d = direction[rows]
        product = apply(d)
        curvature = (d * product).sum(1)
        # A zero direction (the preconditioner maps the residual to 0) cannot make progress: stop that row.
        stalled = ~d.any(dim=1)
        bad = (curvature <= 0) & ~stalled
        if bool(bad.any()):
            negative = float((curvature[bad] / (d[bad] * d[bad]).sum(1)).min())
            break
        iterations += 1
        step = residual_dot[rows] / torch.where(stalled, torch.ones_like(curvature), curvature)
        step = torch.where(stalled, torch.zeros_like(step), step)
        solution[rows] += step.unsqueeze(1) * d
        residual[rows] -= step.unsqueeze(1) * product
        norms = residual[rows].norm(dim=1)
        best.offer(rows, solution[rows], norms)
        still = (norms > threshold[rows]) & ~stalled
        new_preconditioned = precondition(residual[rows])
        new_dot = (residual[rows] * new_preconditioned).sum(1)
        direction[rows] = new_preconditioned + (new_dot / residual_dot[rows]).unsqueeze(1) * d
        residual_dot[rows] = new_dot
        active[rows] = still
    return best.solution, _report(iterations, best.norm, rhs_norm, threshold, negative)


@_linear_algebra_failures_named
def block_conjugate_gradient(
    apply: Callable[[Tensor], Tensor],
    rhs: Tensor,
    precondition: Callable[[Tensor], Tensor],
    *,
    start_preconditioned: bool = False,
    rtol: float = 0.0,
    atol: float = 0.0,
    maxiter: int,
) -> tuple[Tensor, dict[str, Any]]:
    """Breakdown-free block CG (Ji & Li, 2017) for A X = B with all rows of `rhs` [M, p] sharing one Krylov space.

    Each step multiplies A with a block P of orthonormal search directions, and every right-hand side takes its
    best update from the whole block:
        α = (PᵀAP)⁻¹ Pᵀ R,  X ← X + P α,  R ← R − AP α,  Z = P⁻¹R,  P ← orth(Z − P (PᵀAP)⁻¹ (AP)ᵀ Z),
    (column notation). After k steps a row has searched a space of up to k·M directions instead of k, so far
    fewer passes are needed when many right-hand sides share the curvature. orth() keeps the row space of the
    new directions by an SVD and drops directions that have become dependent (the "breakdown" of plain block CG).
    Rows stop once ‖b − A x‖ ≤ max(rtol · ‖b‖, atol); later steps carry only the rows still running.

    The recurrence starts at X = 0. With `start_preconditioned`, the starting approximation is X₀ = P⁻¹B instead:
    it lies in the first block of directions, so its residual comes with the first product (no extra pass), the
    answer is never worse than X₀ by residual, and k steps search X₀'s whole k-step Krylov space (`maxiter` ≥ 1).
    """
    small = torch.float32 if rhs.device.type == "mps" else torch.float64  # for the r × r systems
    rhs_norm = rhs.norm(dim=1)
    threshold = torch.clamp(rtol * rhs_norm, min=atol)
    solution, best = torch.zeros_like(rhs), _Best(torch.zeros_like(rhs), rhs_norm)
    active = (rhs_norm > threshold).nonzero().squeeze(1)
    if start_preconditioned:
        best.norm[active] = float("inf")  # X = 0 is not offered for these rows: the answer is X₀ or better
    residual = rhs[active]
    first = precondition(residual)
    directions = _orthonormal_rows(first)
    iterations, negative = 0, None
    while active.numel() and iterations < maxiter and directions.shape[0]:
        product = apply(directions)
        if start_preconditioned and iterations == 0:  # X₀ = C P, so A X₀ = C (AP)
            coefficients = first @ directions.T
            best.offer(active, first, (residual - coefficients @ product).norm(dim=1))
            first = None
        gram = (directions.to(small) @ product.to(small).T + product.to(small) @ directions.to(small).T) / 2
        smallest = float(torch.linalg.eigvalsh(gram)[0])
        if smallest <= 0:
            negative = smallest
            break
        iterations += 1
        steps = torch.linalg.solve(gram, directions.to(small) @ residual.to(small).T).to(rhs.dtype)  # [r, s]
        solution[active] += steps.T @ directions
        residual -= steps.T @ product
        norms = residual.norm(dim=1)
        best.offer(active, solution[active], norms)
        running = norms > threshold[active]
        active, residual = active[running], residual[running]
        if not active.numel():
            break
        preconditioned = precondition(residual)
        conjugation = torch.linalg.solve(gram, product.to(small) @ preconditioned.to(small).T).to(rhs.dtype)
        directions = _orthonormal_rows(preconditioned - conjugation.T @ directions)
    if start_preconditioned and first is not None:  # no directions, so X₀ = P⁻¹B = 0 with residual B
        best.offer(active, first, rhs_norm[active])
    return best.solution, _report(iterations, best.norm, rhs_norm, threshold, negative)


def _orthonormal_rows(vectors: Tensor) -> Tensor:
    """An orthonormal basis (as rows) of the row space of `vectors` [s, p], dependent directions dropped."""
    _, singular, basis = torch.linalg.svd(vectors, full_matrices=False)
    if not singular.numel():
        return basis
    keep = singular > singular[0] * torch.finfo(vectors.dtype).eps
    return basis[keep]


def _report(
    iterations: int, residual_norm: Tensor, rhs_norm: Tensor, threshold: Tensor, negative: float | None
) -> dict[str, Any]:
    """Convergence facts from the final residual norms of every row, and the non-positive curvature met (the
    Rayleigh quotient of A along that direction), if any."""
    relative = residual_norm / rhs_norm.clamp_min(torch.finfo(rhs_norm.dtype).tiny)
    unconverged = int((residual_norm > threshold).sum())
    facts: dict[str, Any] = {
        "iterations": iterations,
        "converged": unconverged == 0,
        "unconverged": unconverged,
        "max_relative_residual": float(relative.max()),
        "mean_relative_residual": float(relative.mean()),
        "negative_curvature": negative is not None,
    }
    if negative is not None:
        facts["curvature_rayleigh_quotient"] = negative
    return facts


def block_lanczos(
    apply: Callable[[Tensor], Tensor], size: int, dimension: int, block_size: int, generator: torch.Generator,
    *, dtype: torch.dtype, device: torch.device,
) -> tuple[Tensor, Tensor]:
    """An orthonormal basis Q [k, p] (rows) of the block Krylov space span{Ω, AΩ, A²Ω, …} and T = Q A Qᵀ [k, k].

    Ω is a random block of b = `block_size` rows, and each step is one call of `apply` on the newest block (one
    pass over the data for b vectors), so k = `dimension` basis vectors cost about k / b passes. The product is
    orthogonalised against the whole basis twice ("twice is enough": full reorthogonalisation keeps Q orthonormal
    in floating point), which also gives T's entries; the remainder's row space is the next block. Directions
    that vanish (an invariant subspace was found) are replaced by random ones orthogonal to the basis. The
    eigenvalues of T are Ritz values of A; at k = p they are A's eigenvalues.
    """
    basis = torch.zeros(dimension, size, dtype=dtype, device=device)
    projected = torch.zeros(dimension, dimension, dtype=dtype, device=device)
    block = _extend(basis[:0], basis[:0], min(block_size, dimension), 0.0, generator)
    start = 0
    while True:
        stop = start + block.shape[0]
        basis[start:stop] = block
        product = apply(block)
        coefficients = basis[:stop] @ product.T  # [stop, b]
        product = product - coefficients.T @ basis[:stop]
        correction = basis[:stop] @ product.T
        product = product - correction.T @ basis[:stop]
        coefficients += correction
        projected[:stop, start:stop] = coefficients
        projected[start:stop, :stop] = coefficients.T
        if stop == dimension:
            return basis, (projected + projected.T) / 2
        scale = float(projected[:stop, :stop].abs().max())
        block = _extend(product, basis[:stop], min(block_size, dimension - stop), scale, generator)
        start = stop


def _extend(remainder: Tensor, basis: Tensor, width: int, scale: float, generator: torch.Generator) -> Tensor:
    """`width` orthonormal rows orthogonal to `basis` [k, p]: the row space of `remainder` (already orthogonal to
    it) where its singular values exceed 1e-10 · `scale`, topped up with random directions."""
    rows = remainder[:0]
    if remainder.shape[0]:
        _, singular, directions = torch.linalg.svd(remainder, full_matrices=False)
        rows = directions[singular > 1e-10 * max(scale, torch.finfo(remainder.dtype).tiny)][:width]
    missing = width - rows.shape[0]
    if missing <= 0:
        return rows
    size = basis.shape[1]
    fresh = torch.randn(missing, size, generator=generator, dtype=basis.dtype).to(basis.device)
    known = torch.cat([basis, rows])
    for _ in range(2):
        fresh = fresh - (fresh @ known.T) @ known
    return torch.cat([rows, torch.linalg.qr(fresh.T).Q.T])
