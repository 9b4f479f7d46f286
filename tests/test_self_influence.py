"""Self-influence ⟨(H + λI)⁻¹gᵢ, gᵢ⟩ with every method: iterative solvers take blocks of many examples per pass
and stop where the quadratic form (whose error is the square of the solution's) is accurate."""

import pytest
import torch
import torch.nn.functional as F

from helpers import ExactReference, classification_data, fitted, loader, mlp_model
from lightning_influence import TwiceDifferentiable, compute_self_influences, fit_solver
from lightning_influence.engine.defaults import self_influence_rows
from lightning_influence.engine.scoring import regrouped, stacked_gradients

LAMBDA = 0.05


@pytest.fixture(scope="module")
def problem():
    x, y = classification_data(80)
    module = fitted(mlp_model(), x, y)
    reference = ExactReference(module, x, y, LAMBDA)
    gradients = reference.grads(x, y)
    exact = (torch.linalg.solve(reference.matrix, gradients.T).T * gradients).sum(1)
    return TwiceDifferentiable(module, F.cross_entropy), loader(x, y, batch_size=16), exact


def test_regrouped_blocks_keep_every_row_in_order():
    blocks = [torch.arange(n * 2.0).view(n, 2) + 100 * i for i, n in enumerate((3, 5, 2))]
    for rows, sizes in ((4, [4, 4, 2]), (None, [3, 5, 2]), (20, [10]), (1, [1] * 10)):
        grouped = list(regrouped(iter(blocks), rows))
        assert [b.shape[0] for b in grouped] == sizes
        assert torch.equal(torch.cat(grouped), torch.cat(blocks))


@pytest.mark.parametrize("method, options, tolerance", [
    ("direct", {}, 1e-10),
    ("cg", {"rtol": 1e-8}, 1e-6),  # the quadratic forms at rtol 1e-4
    ("lissa", {}, 2e-2),  # Chebyshev steps for a bound of 0.1, corrected estimate
    ("nystroem", {"rank": 10}, 1e-2),  # one refinement step of the default two
    ("ekfac", {}, 1e-2),
    ("arnoldi", {"rank": 10}, 1e-2),
])
def test_every_method_gives_self_influence_close_to_exact(problem, method, options, tolerance):
    model, train, exact = problem
    solver = fit_solver(model, train, method, hessian_regularization=LAMBDA, **options)
    values = compute_self_influences(model, train, solver)
    assert float(((values - exact).abs() / exact.abs()).max()) < tolerance


def test_iterative_self_influence_solves_one_block_for_many_examples(problem):
    model, train, exact = problem
    solver = fit_solver(model, train, "cg", hessian_regularization=LAMBDA, rtol=1e-8)
    assert self_influence_rows(model, solver, None) >= 80 and self_influence_rows(model, solver, 10**5) == 16
    assert self_influence_rows(model, fit_solver(model, train, "direct", hessian_regularization=LAMBDA), None) is None
    operator = solver.operator
    before = operator.passes
    compute_self_influences(model, train, solver)  # all 80 examples in one block
    one_block = operator.passes - before
    with model.evaluating():
        gradients = stacked_gradients(model, train, name="training")
        before = operator.passes
        by_batch = torch.cat([solver.quadratic_forms(block)[0] for block in gradients.split(16)])
    torch.testing.assert_close(by_batch, exact, rtol=1e-6, atol=0)
    assert one_block < (operator.passes - before) / 2  # five blocks of 16 take more than twice the passes


def test_refined_quadratic_forms_take_half_the_steps_of_a_solve(problem):
    model, train, _ = problem
    solver = fit_solver(model, train, "nystroem", hessian_regularization=LAMBDA, rank=10, refine=4)
    rhs = torch.randn(5, model.num_params, dtype=torch.float64)
    before = solver.operator.passes
    with model.evaluating():
        solver.quadratic_forms(rhs)
    assert solver.operator.passes - before == 2
