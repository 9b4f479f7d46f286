"""Property-based checks: every solver on random symmetric positive definite systems against torch.linalg.solve.

A system (A, B) is realised through the real engine path: a bias-free linear model with the loss
ℓ(x, t) = ½ (xᵀθ − t)² has the mean-loss Hessian (1/N) Σ x xᵀ, so data rows X = √N · U diag(√σ) Uᵀ give
H = U diag(σ) Uᵀ = A exactly. Spectra are drawn plain and adversarial (wide geometric spread, tight clusters,
repeated values, rank deficiency made definite by λ).
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import TwiceDifferentiable, fit_solver

SPECTRA = ("uniform", "geometric", "clustered", "repeated", "low_rank")


def half_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((outputs.squeeze(-1) - targets) ** 2).mean()


@st.composite
def systems(draw, max_size: int = 20, max_condition: float = 1e6, kinds: tuple[str, ...] = SPECTRA):
    size = draw(st.integers(2, max_size))
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**31 - 1))
    num_rhs = draw(st.integers(1, 5))
    generator = torch.Generator().manual_seed(seed)
    regularization = 0.0
    if kind == "uniform":
        spectrum = torch.rand(size, generator=generator, dtype=torch.float64) * 9 + 1
    elif kind == "geometric":
        exponent = draw(st.floats(1.0, math.log10(max_condition)))
        spectrum = torch.logspace(0, -exponent, size, dtype=torch.float64)
    elif kind == "clustered":
        spectrum = torch.where(torch.arange(size) % 2 == 0, 1.0, 1e-3).to(torch.float64)
        spectrum = spectrum * (1 + 1e-6 * torch.rand(size, generator=generator, dtype=torch.float64))
    elif kind == "repeated":
        spectrum = torch.full((size,), 2.0, dtype=torch.float64)
    else:  # low_rank: rank r < size, positive definite only through λ
        rank = draw(st.integers(1, size - 1))
        spectrum = torch.zeros(size, dtype=torch.float64)
        spectrum[:rank] = torch.rand(rank, generator=generator, dtype=torch.float64) + 0.5
        regularization = draw(st.floats(1e-3, 1.0))
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    matrix = basis @ torch.diag(spectrum) @ basis.T
    rows = math.sqrt(size) * basis @ torch.diag(spectrum.sqrt()) @ basis.T
    rhs = torch.randn(num_rhs, size, generator=generator, dtype=torch.float64)
    return {"matrix": matrix, "rows": rows, "rhs": rhs, "regularization": regularization, "kind": kind}


def solve_with(system: dict, method: str, batch_size: int | None = None, **options) -> tuple[torch.Tensor, dict]:
    size = system["matrix"].shape[0]
    module = nn.Linear(size, 1, bias=False).double()
    model = TwiceDifferentiable(module, half_squared_error)
    data = DataLoader(TensorDataset(system["rows"], torch.zeros(size, dtype=torch.float64)),
                      batch_size=batch_size or size)
    solver = fit_solver(model, data, method, hessian_regularization=system["regularization"], **options)
    result = solver.solve(system["rhs"])
    return result.x, result.info


def exact(system: dict) -> torch.Tensor:
    size = system["matrix"].shape[0]
    damped = system["matrix"] + system["regularization"] * torch.eye(size, dtype=torch.float64)
    return torch.linalg.solve(damped, system["rhs"].T).T


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(systems())
def test_direct_solves_any_spd_system(system):
    solution, _ = solve_with(system, "direct", batch_size=3)
    assert relative_error(solution, exact(system)) < 1e-7


@PROPERTY_SETTINGS
@given(systems(max_condition=1e4), st.sampled_from([None, "jacobi"]))
def test_cg_reaches_its_tolerance_on_any_spd_system(system, preconditioner):
    size = system["matrix"].shape[0]
    rtol = 1e-9
    solution, info = solve_with(system, "cg", rtol=rtol, maxiter=50 * size, preconditioner=preconditioner)
    assert info["converged"]
    damped = system["matrix"] + system["regularization"] * torch.eye(size, dtype=torch.float64)
    residual = (system["rhs"] - solution @ damped).norm(dim=1) / system["rhs"].norm(dim=1)
    assert float(residual.max()) < 100 * rtol  # the recursive residual drifts from the true one by ~eps·κ


@PROPERTY_SETTINGS
@given(systems())
def test_arnoldi_at_full_rank_solves_any_spd_system(system):
    size = system["matrix"].shape[0]
    solution, info = solve_with(system, "arnoldi", rank=size)
    assert info["rank"] == size
    assert relative_error(solution, exact(system)) < 1e-6


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(systems(max_size=10, max_condition=30, kinds=("uniform", "geometric", "repeated")))
def test_lissa_with_full_batch_steps_converges_on_well_conditioned_systems(system):
    solution, info = solve_with(system, "lissa", maxiter=3000, rtol=1e-12, check_every=20)
    assert info["converged"]
    assert relative_error(solution, exact(system)) < 1e-6, info
