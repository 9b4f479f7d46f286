"""Indefinite H + λI is found and stopped at, never ground through: cg and refine stop at the first direction of
non-positive curvature, keep their best iterate (never worse than where they started), and warn with the
smallest eigenvalue and the λ that fixes it, or raise under on_negative_curvature="raise"."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import ExactReference, classification_data, loader, mlp_model
from lightning_influence import TwiceDifferentiable, fit_solver
from lightning_influence.errors import IndefiniteCurvatureError
from lightning_influence.solvers.krylov import block_conjugate_gradient, conjugate_gradient

LAMBDA = 0.01


def indefinite_system(size=40, negative=(-0.5, -0.2), rows=3, seed=0):
    """A symmetric matrix with two negative eigenvalues among positive ones in [0.1, 2], and right-hand sides."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64)).Q
    values = torch.cat([torch.tensor(negative, dtype=torch.float64),
                        torch.linspace(0.1, 2.0, size - len(negative), dtype=torch.float64)])
    return basis @ torch.diag(values) @ basis.T, torch.randn(rows, size, generator=generator, dtype=torch.float64)


def residuals(matrix, rhs, solution):
    return (rhs - solution @ matrix).norm(dim=1)


@pytest.mark.parametrize("loop", [conjugate_gradient, block_conjugate_gradient])
def test_cg_loops_stop_at_the_first_non_positive_direction_with_their_best_iterate(loop):
    matrix, rhs = indefinite_system()
    products = []

    def apply(block):
        products.append(block.shape[0])
        return block @ matrix

    solution, info = loop(apply, rhs, lambda r: r, rtol=1e-10, maxiter=500)
    assert info["negative_curvature"] and not info["converged"]
    assert info["iterations"] < 40 and len(products) == info["iterations"] + 1  # stopped, not ground through
    smallest = float(torch.linalg.eigvalsh(matrix)[0])
    assert smallest <= info["curvature_rayleigh_quotient"] <= 0  # an upper bound on the smallest eigenvalue
    found = residuals(matrix, rhs, solution)
    assert bool((found <= rhs.norm(dim=1) + 1e-12).all())  # never worse than x = 0
    torch.testing.assert_close(info["max_relative_residual"], float((found / rhs.norm(dim=1)).max()))


def test_positive_definite_systems_are_solved_as_before():
    matrix, rhs = indefinite_system(negative=())
    for loop in (conjugate_gradient, block_conjugate_gradient):
        solution, info = loop(lambda v: v @ matrix, rhs, lambda r: r, rtol=1e-10, maxiter=500)
        assert info["converged"] and not info["negative_curvature"]
        torch.testing.assert_close(solution, torch.linalg.solve(matrix, rhs.T).T, rtol=1e-8, atol=1e-9)


def legacy_refine(matrix, rhs, inverse, steps):
    """What refine did before: block PCG from x₀ = M⁻¹b through every step, returning the last iterate."""
    solution = rhs @ inverse
    residual = rhs - solution @ matrix
    directions = torch.linalg.qr((residual @ inverse).T).Q.T
    for _ in range(steps):
        product = directions @ matrix
        gram = directions @ product.T
        step = torch.linalg.solve(gram, directions @ residual.T)
        solution, residual = solution + step.T @ directions, residual - step.T @ product
        preconditioned = residual @ inverse
        conjugated = preconditioned - torch.linalg.solve(gram, product @ preconditioned.T).T @ directions
        directions = torch.linalg.qr(conjugated.T).Q.T
    return solution


def test_refinement_is_never_worse_than_its_starting_approximation():
    matrix, rhs = indefinite_system(size=30, rows=4, seed=1)
    values, vectors = torch.linalg.eigh(matrix)
    inverse = vectors @ torch.diag(1 / values.abs().clamp_min(0.5)) @ vectors.T  # an SPD approximate inverse
    start = residuals(matrix, rhs, rhs @ inverse)
    assert float((residuals(matrix, rhs, legacy_refine(matrix, rhs, inverse, 1)) / start).max()) > 10  # it used to
    solution, info = block_conjugate_gradient(lambda v: v @ matrix, rhs, lambda r: r @ inverse,
                                              start_preconditioned=True, maxiter=3)
    assert info["negative_curvature"]
    assert bool((residuals(matrix, rhs, solution) <= start + 1e-12).all())


@pytest.fixture(scope="module")
def untrained():
    """An MLP at initialisation: its Hessian has negative eigenvalues well below −λ."""
    x, y = classification_data(60)
    module = mlp_model()
    reference = ExactReference(module, x, y, LAMBDA)
    return TwiceDifferentiable(module, F.cross_entropy), loader(x, y), reference


def test_cg_on_an_indefinite_hessian_stops_warns_and_keeps_later_solves_short(untrained):
    model, train, reference = untrained
    smallest = float(torch.linalg.eigvalsh(reference.hessian)[0])
    assert smallest + LAMBDA < 0
    solver = fit_solver(model, train, "cg", hessian_regularization=LAMBDA, rtol=1e-10, maxiter=500)
    rhs = torch.randn(5, model.num_params, dtype=torch.float64)
    with model.evaluating(), pytest.warns(RuntimeWarning) as caught:
        result = solver.solve(rhs)
    message = " ".join(str(w.message) for w in caught)
    estimate = result.info["smallest_eigenvalue_estimate"]
    assert smallest <= estimate < -LAMBDA and f"{estimate:.3e}" in message and "λ = 0.01" in message
    assert f"{result.info['suggested_regularization']:.3g}" in message and "curvature='ggn'" in message
    assert result.info["suggested_regularization"] > -estimate
    assert result.info["iterations"] < 500 and result.info["solve_hessian_passes"] == result.info["iterations"] + 1
    assert bool((residuals(reference.matrix, rhs, result.x) <= rhs.norm(dim=1)).all())
    with model.evaluating():
        again = solver.solve(torch.randn(7, model.num_params, dtype=torch.float64))  # warned once per fit
    assert again.info["solve_hessian_passes"] <= max(1, result.info["iterations"]) + 1


@pytest.mark.parametrize("method, options", [
    ("cg", {"rtol": 1e-8}),
    ("lissa", {"maxiter": 5}),
    ("nystroem", {"rank": 20, "refine": 3}),
    ("ekfac", {"refine": 3}),
])
def test_raise_mode_turns_the_warning_into_an_error(untrained, method, options):
    model, train, _ = untrained
    solver = fit_solver(model, train, method, hessian_regularization=LAMBDA, **options)  # warns at most
    with pytest.raises(IndefiniteCurvatureError, match=r"not positive definite \(smallest eigenvalue -"):
        strict = fit_solver(model, train, method, hessian_regularization=LAMBDA, on_negative_curvature="raise",
                            **options)
        with model.evaluating():
            strict.solve(torch.randn(3, model.num_params, dtype=torch.float64))
    assert solver.is_fitted


def test_refine_on_an_indefinite_hessian_keeps_the_better_of_the_start_and_its_iterates(untrained):
    model, train, reference = untrained
    rhs = torch.randn(6, model.num_params, dtype=torch.float64)
    plain = fit_solver(model, train, "ekfac", hessian_regularization=LAMBDA)
    refined = fit_solver(model, train, "ekfac", hessian_regularization=LAMBDA, refine=5)
    with model.evaluating(), pytest.warns(RuntimeWarning, match="found by refine"):
        start, result = plain.solve(rhs).x, refined.solve(rhs)
    assert result.info["indefinite"] and result.info["refine_iterations"] < 5
    assert bool((residuals(reference.matrix, rhs, result.x) <= residuals(reference.matrix, rhs, start) + 1e-10).all())


def test_nystroem_finds_an_indefinite_hessian_from_its_own_passes(untrained):
    model, train, reference = untrained
    smallest = float(torch.linalg.eigvalsh(reference.hessian)[0])
    with pytest.warns(RuntimeWarning, match="found by nystroem's Rayleigh-Ritz check") as caught:
        solver = fit_solver(model, train, "nystroem", hessian_regularization=LAMBDA, rank=10)
    estimate = solver.fit_info["min_eigenvalue_estimate"]
    assert smallest <= estimate < -LAMBDA and solver.fit_info["indefinite"]
    assert "curvature='ggn'" in str(caught[0].message)
    assert solver.fit_info["hessian_passes"] == 3  # the sketch, its power iteration and the trace: no extra pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_solver(model, train, "nystroem", hessian_regularization=LAMBDA, rank=10, curvature="ggn")


def test_nystroem_warns_about_an_indefinite_hessian_even_where_lambda_covers_it(untrained):
    model, train, reference = untrained
    values = torch.linalg.eigvalsh(reference.hessian)
    covering = -1.5 * float(values[0])
    with pytest.warns(RuntimeWarning, match="the sketch misrepresents the negative part of H"):
        solver = fit_solver(model, train, "nystroem", hessian_regularization=covering, rank=10)
    assert solver.fit_info["indefinite_curvature"] and "indefinite" not in solver.fit_info
