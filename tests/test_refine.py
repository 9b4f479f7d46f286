"""`refine=k`: conjugate-gradient steps on the exact system, preconditioned by an approximate inverse."""

import pytest
import torch
import torch.nn.functional as F

from helpers import ExactReference, classification_data, fitted, loader, mlp_model
from lightning_influence import TwiceDifferentiable, fit_solver, make_solver
from lightning_influence.solvers.krylov import conjugate_gradient

REGULARIZATION = 0.01
APPROXIMATE = [("arnoldi", {"rank": 5, "complement": "trace"}), ("nystroem", {"rank": 5}), ("ekfac", {})]


@pytest.fixture(scope="module")
def problem():
    x, y = classification_data(64)
    module = fitted(mlp_model(), x, y)
    reference = ExactReference(module, x, y, REGULARIZATION)
    x_test, y_test = classification_data(6, seed=1)
    rhs = reference.grads(x_test, y_test)
    return TwiceDifferentiable(module, F.cross_entropy), loader(x, y), rhs, torch.linalg.solve(reference.matrix, rhs.T).T


def error(actual, expected):
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("method, options", APPROXIMATE)
def test_refining_converges_to_the_exact_solution(problem, method, options):
    model, train, rhs, exact = problem
    errors = []
    for steps in (0, 10, 60):
        solver = fit_solver(model, train, method, hessian_regularization=REGULARIZATION, refine=steps, **options)
        assert solver.collective_solve == (steps > 0)  # only refining makes passes while solving
        with model.evaluating():
            result = solver.solve(rhs)
        errors.append(error(result.x, exact))
        if steps:
            assert result.info["refine_iterations"] <= steps and result.info["solve_hessian_passes"] >= 1
    assert errors[0] > 1e-2, "the approximation alone should be visibly inexact on this problem"
    assert errors[1] < errors[0] / 3
    assert errors[2] < 1e-6


def test_preconditioned_cg_from_a_start_matches_a_solve():
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(30, 30, generator=generator, dtype=torch.float64)
    matrix = basis @ basis.T / 30 + 0.1 * torch.eye(30, dtype=torch.float64)
    rhs = torch.randn(4, 30, generator=generator, dtype=torch.float64)
    inverse_diagonal = 1 / torch.diagonal(matrix)
    solution, info = conjugate_gradient(lambda v: v @ matrix, rhs, lambda r: r * inverse_diagonal,
                                        initial=rhs * inverse_diagonal, rtol=1e-12, maxiter=200)
    torch.testing.assert_close(solution, torch.linalg.solve(matrix, rhs.T).T, rtol=1e-9, atol=1e-10)
    assert info["converged"] and info["unconverged"] == 0 and info["iterations"] <= 30 + 5
    # With no tolerance every row runs exactly the steps asked for.
    _, fixed = conjugate_gradient(lambda v: v @ matrix, rhs, lambda r: r, maxiter=4)
    assert fixed["iterations"] == 4


@pytest.mark.parametrize("value", [-1, 1.5, True, "3"])
def test_bad_refine_values_are_refused(value):
    with pytest.raises(ValueError, match="refine must be an integer ≥ 0"):
        make_solver("arnoldi", refine=value)


def test_arnoldi_refuses_to_refine_with_a_singular_preconditioner():
    with pytest.raises(ValueError, match="use complement='trace' or 'damping' with refine"):
        make_solver("arnoldi", rank=3, refine=2)


def test_a_preconditioner_that_maps_a_residual_to_zero_stops_that_row_without_nan():
    matrix = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    rhs = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    keep_first_two = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    solution, info = conjugate_gradient(lambda v: v @ matrix, rhs, lambda r: r * keep_first_two, maxiter=5)
    assert bool(torch.isfinite(solution).all())
    torch.testing.assert_close(solution[0], torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    assert info["unconverged"] == 1 and not info["converged"]


def test_exact_and_iterative_methods_do_not_take_refine():
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['refine'\] for inversion method 'cg'"):
        make_solver("cg", refine=2)
