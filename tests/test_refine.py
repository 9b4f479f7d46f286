"""`refine=k`: conjugate-gradient steps on the exact system, preconditioned by an approximate inverse."""

import pytest
import torch
import torch.nn.functional as F

from helpers import ExactReference, classification_data, fitted, loader, mlp_model
from lightning_influence import TwiceDifferentiable, fit_solver, make_solver

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


@pytest.mark.parametrize("value", [-1, 1.5, True, "3"])
def test_bad_refine_values_are_refused(value):
    with pytest.raises(ValueError, match="refine must be an integer ≥ 0"):
        make_solver("arnoldi", refine=value)


def test_arnoldi_refuses_to_refine_with_a_singular_preconditioner():
    with pytest.raises(ValueError, match="pass refine=0 with complement='none'"):
        make_solver("arnoldi", rank=3, complement="none")
    assert make_solver("arnoldi", rank=3, complement="none", refine=0).refine == 0


def test_exact_and_iterative_methods_do_not_take_refine():
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['refine'\] for inversion method 'cg'"):
        make_solver("cg", refine=2)
