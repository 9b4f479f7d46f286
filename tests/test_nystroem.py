"""Nyström sketch and the low-rank complements against dense float64 constructions."""

import pytest
import torch
import torch.nn.functional as F

from helpers import ExactReference, classification_data, fitted, linear_model, loader, mlp_model
from lightning_influence import TwiceDifferentiable, compute_influence_factors, fit_solver
from lightning_influence.solvers.nystroem import nystroem_factors

LAMBDA = 0.05


@pytest.fixture(scope="module")
def problem():
    x, y = classification_data(60)
    x_test, y_test = classification_data(5, seed=1)
    module = fitted(linear_model(), x, y)  # convex: H is positive semi-definite
    reference = ExactReference(module, x, y, LAMBDA)
    return {
        "model": TwiceDifferentiable(module, F.cross_entropy),
        "train": loader(x, y),
        "test": loader(x_test, y_test),
        "reference": reference,
        "rhs": reference.grads(x_test, y_test),
        "exact": reference.factors(x_test, y_test),
    }


def relative_error(actual, expected):
    return float((actual - expected).norm() / expected.norm())


def test_nystroem_is_exact_at_full_rank(problem):
    p = problem["model"].num_params
    result = compute_influence_factors(
        problem["model"], problem["train"], problem["test"], "nystroem", hessian_perturbation=LAMBDA, rank=p
    )
    assert result.info["rank"] == p
    assert relative_error(result.x, problem["exact"]) < 1e-8


@pytest.mark.parametrize("complement", ["damping", "trace"])
def test_nystroem_equals_the_woodbury_inverse_of_its_sketch(problem, complement):
    """x = U diag(1/(Λ+λ)) Uᵀ b + (I − UUᵀ) b / (μ + λ) with (Λ, U) the sketch, checked against a dense solve."""
    solver = fit_solver(problem["model"], problem["train"], "nystroem", hessian_regularization=LAMBDA, rank=6,
                        complement=complement, refine=0)
    vectors, values, mu = solver.preconditioner()
    p = vectors.shape[0]
    matrix = vectors @ torch.diag(values) @ vectors.T + mu * (torch.eye(p, dtype=torch.float64) - vectors @ vectors.T)
    expected = torch.linalg.solve(matrix + LAMBDA * torch.eye(p, dtype=torch.float64), problem["rhs"].T).T
    assert torch.allclose(solver.solve(problem["rhs"]).x, expected, rtol=1e-8, atol=1e-10)
    assert (mu == 0) == (complement == "damping")


def test_nystroem_error_falls_with_rank_and_power_iterations(problem):
    p = problem["model"].num_params
    def error(**options):
        solver = fit_solver(problem["model"], problem["train"], "nystroem", hessian_regularization=LAMBDA, refine=0,
                            **options)
        return relative_error(solver.solve(problem["rhs"]).x, problem["exact"])
    assert error(rank=2, power_iterations=0) > error(rank=p // 2, power_iterations=0) > error(rank=p)
    top = torch.linalg.eigvalsh(problem["reference"].hessian).flip(0)[:4]
    captured = {}
    for q in (0, 3):
        solver = fit_solver(problem["model"], problem["train"], "nystroem", hessian_regularization=LAMBDA, rank=4,
                            power_iterations=q)
        captured[q] = float((solver.preconditioner()[1].sort(descending=True).values - top).norm() / top.norm())
    assert captured[3] < captured[0] / 2


def test_nystroem_core_handles_an_indefinite_matrix_exactly_at_full_rank():
    generator = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    matrix = basis @ torch.diag(torch.tensor([3.0, 1.0, 0.5, -0.2, -1.0, 2.0], dtype=torch.float64)) @ basis.T
    omega, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    values, vectors = nystroem_factors(omega, matrix @ omega)
    assert torch.allclose(vectors @ torch.diag(values) @ vectors.T, matrix, atol=1e-8)


@pytest.mark.parametrize("complement", ["damping", "trace"])
def test_arnoldi_complement_is_the_woodbury_form_of_its_ritz_pairs(complement):
    x, y = classification_data(60)
    module = fitted(mlp_model(), x, y)
    model = TwiceDifferentiable(module, F.cross_entropy)
    solver = fit_solver(model, loader(x, y), "arnoldi", hessian_regularization=LAMBDA, rank=5, complement=complement,
                        refine=0)
    vectors, values, mu = solver._eigenvectors, solver._eigenvalues, solver.fit_info["complement_eigenvalue"]
    assert (mu == 0) == (complement == "damping") and mu >= 0
    p = model.num_params
    identity = torch.eye(p, dtype=torch.float64)
    matrix = vectors @ torch.diag(values) @ vectors.T + mu * (identity - vectors @ vectors.T)
    rhs = torch.randn(3, p, dtype=torch.float64)
    expected = torch.linalg.solve(matrix + LAMBDA * identity, rhs.T).T
    assert torch.allclose(solver.solve(rhs).x, expected, rtol=1e-8, atol=1e-10)
    full = fit_solver(model, loader(x, y), "arnoldi", hessian_regularization=LAMBDA, rank=p, complement=complement)
    exact = ExactReference(module, x, y, LAMBDA)
    assert relative_error(full.solve(rhs).x, torch.linalg.solve(exact.matrix, rhs.T).T) < 1e-8


def test_options_are_validated():
    with pytest.raises(ValueError, match="complement must be one of"):
        fit_solver(TwiceDifferentiable(linear_model(), F.cross_entropy), loader(*classification_data(10)), "nystroem",
                   complement="zero")
    with pytest.raises(ValueError, match="power_iterations must be an integer"):
        fit_solver(TwiceDifferentiable(linear_model(), F.cross_entropy), loader(*classification_data(10)), "nystroem",
                   power_iterations=-1)
