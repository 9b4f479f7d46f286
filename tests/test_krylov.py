"""The conjugate-gradient loops behind `cg` and `refine`: one recurrence per row, and block CG."""

import pytest
import torch
import torch.nn.functional as F

from helpers import ExactReference, classification_data, fitted, loader, mlp_model
from lightning_influence import NonFiniteError, TwiceDifferentiable, fit_solver, make_solver
from lightning_influence.solvers.krylov import block_conjugate_gradient, block_lanczos, conjugate_gradient


def spd_system(size=30, rows=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(size, size, generator=generator, dtype=torch.float64)
    matrix = basis @ basis.T / size + 0.1 * torch.eye(size, dtype=torch.float64)
    return matrix, torch.randn(rows, size, generator=generator, dtype=torch.float64)


def test_both_cg_loops_match_a_solve():
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(30, 30, generator=generator, dtype=torch.float64)
    matrix = basis @ basis.T / 30 + 0.1 * torch.eye(30, dtype=torch.float64)
    rhs = torch.randn(4, 30, generator=generator, dtype=torch.float64)
    inverse_diagonal = 1 / torch.diagonal(matrix)
    for variant in (conjugate_gradient, block_conjugate_gradient):
        solution, info = variant(lambda v: v @ matrix, rhs, lambda r: r * inverse_diagonal, rtol=1e-12, maxiter=200)
        torch.testing.assert_close(solution, torch.linalg.solve(matrix, rhs.T).T, rtol=1e-9, atol=1e-10)
        assert info["converged"] and info["unconverged"] == 0 and info["iterations"] <= 30 + 5
    # Started at X₀ = P⁻¹B with a nearly exact P⁻¹, one step keeps a residual no larger than X₀'s.
    inverse = torch.linalg.inv(matrix) + 1e-3 * torch.eye(30, dtype=torch.float64)
    solution, started = block_conjugate_gradient(lambda v: v @ matrix, rhs, lambda r: r @ inverse,
                                                 start_preconditioned=True, rtol=1e-4, maxiter=1)
    start_residual = (rhs - rhs @ inverse @ matrix).norm(dim=1)
    assert started["iterations"] == 1 and bool(((rhs - solution @ matrix).norm(dim=1) <= start_residual).all())
    # With no tolerance every row runs exactly the steps asked for.
    _, fixed = conjugate_gradient(lambda v: v @ matrix, rhs, lambda r: r, maxiter=4)
    assert fixed["iterations"] == 4


def test_a_preconditioner_that_maps_a_residual_to_zero_stops_that_row_without_nan():
    matrix = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    rhs = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    keep_first_two = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    solution, info = conjugate_gradient(lambda v: v @ matrix, rhs, lambda r: r * keep_first_two, maxiter=5)
    assert bool(torch.isfinite(solution).all())
    torch.testing.assert_close(solution[0], torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    assert info["unconverged"] == 1 and not info["converged"]


def test_block_cg_solves_in_about_p_over_m_steps():
    matrix, rhs = spd_system(size=60, rows=6)
    solution, info = block_conjugate_gradient(lambda v: v @ matrix, rhs, lambda r: r, rtol=1e-10, maxiter=200)
    torch.testing.assert_close(solution, torch.linalg.solve(matrix, rhs.T).T, rtol=1e-8, atol=1e-9)
    assert info["converged"] and info["max_relative_residual"] <= 1e-10
    # Six right-hand sides share one Krylov space: in exact arithmetic 60 / 6 = 10 steps span all of R^60.
    assert info["iterations"] <= 14
    _, single = conjugate_gradient(lambda v: v @ matrix, rhs, lambda r: r, rtol=1e-10, maxiter=200)
    assert single["iterations"] > 2 * info["iterations"]


def test_block_cg_with_dependent_right_hand_sides_and_a_preconditioner():
    matrix, rhs = spd_system(size=30, rows=3, seed=1)
    rhs = torch.cat([rhs, rhs[:1], 2 * rhs[1:2], torch.zeros(1, 30, dtype=torch.float64)])  # rank 3 of 6 rows
    inverse_diagonal = 1 / torch.diagonal(matrix)
    solution, info = block_conjugate_gradient(lambda v: v @ matrix, rhs, lambda r: r * inverse_diagonal,
                                              rtol=1e-10, maxiter=100)
    assert bool(torch.isfinite(solution).all()) and info["converged"]
    torch.testing.assert_close(solution, torch.linalg.solve(matrix, rhs.T).T, rtol=1e-8, atol=1e-9)


def test_cg_solver_uses_block_cg_by_default_and_both_agree():
    x, y = classification_data(64)
    module = fitted(mlp_model(), x, y)
    reference = ExactReference(module, x, y, 0.01)
    x_test, y_test = classification_data(8, seed=1)
    rhs = reference.grads(x_test, y_test)
    exact = torch.linalg.solve(reference.matrix, rhs.T).T
    model = TwiceDifferentiable(module, F.cross_entropy)
    results = {}
    for block in (True, False):
        solver = fit_solver(model, loader(x, y), "cg", hessian_regularization=0.01, rtol=1e-10, block=block)
        with model.evaluating():
            results[block] = solver.solve(rhs)
        assert float((results[block].x - exact).norm() / exact.norm()) < 1e-8
    assert results[True].info["iterations"] < results[False].info["iterations"]
    assert make_solver("cg").block is True
    with pytest.raises(TypeError, match="block must be True or False"):
        make_solver("cg", block="yes")


def test_a_singular_system_stops_at_once_instead_of_raising_a_raw_linear_algebra_error():
    singular = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)  # A = diag(1, 0, 0), as with λ = 0 on a flat Hessian
    solution, info = block_conjugate_gradient(lambda v: v * singular, torch.eye(3, dtype=torch.float64)[:2],
                                              lambda r: r, rtol=1e-8, maxiter=10)
    assert info["negative_curvature"] is True and info["curvature_rayleigh_quotient"] == 0.0
    assert info["iterations"] == 0 and not info["converged"]  # no step taken along a zero-curvature direction
    assert bool(torch.isfinite(solution).all())


@pytest.mark.parametrize("block_size", [1, 4, 7])
def test_block_lanczos_at_full_dimension_has_the_dense_eigenvalues(block_size):
    generator = torch.Generator().manual_seed(2)
    basis = torch.randn(45, 45, generator=generator, dtype=torch.float64)
    matrix = basis @ basis.T / 45 - 0.4 * torch.eye(45, dtype=torch.float64)  # indefinite
    products = []

    def apply(block):
        products.append(block.shape[0])
        return block @ matrix

    q, t = block_lanczos(apply, 45, 45, block_size, torch.Generator().manual_seed(0), dtype=torch.float64,
                         device=torch.device("cpu"))
    assert len(products) == -(-45 // block_size) and max(products) == block_size  # about p / b products
    torch.testing.assert_close(q @ q.T, torch.eye(45, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(t, q @ matrix @ q.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.linalg.eigvalsh(t), torch.linalg.eigvalsh(matrix), rtol=0, atol=1e-12)


def test_block_lanczos_finds_the_extreme_eigenvalues_early_and_survives_an_invariant_subspace():
    generator = torch.Generator().manual_seed(1)
    vectors = torch.linalg.qr(torch.randn(200, 200, generator=generator, dtype=torch.float64)).Q
    values = torch.cat([torch.tensor([-3.0, 5.0, 8.0], dtype=torch.float64), torch.rand(197, generator=generator,
                                                                                          dtype=torch.float64)])
    matrix = vectors @ torch.diag(values) @ vectors.T
    _, t = block_lanczos(lambda v: v @ matrix, 200, 40, 8, torch.Generator().manual_seed(0),
                         dtype=torch.float64, device=torch.device("cpu"))
    ritz = torch.linalg.eigvalsh(t)
    assert abs(float(ritz[0]) + 3) < 1e-6 and abs(float(ritz[-1]) - 8) < 1e-6 and abs(float(ritz[-2]) - 5) < 1e-6
    low_rank = vectors[:, :3] @ torch.diag(values[:3]) @ vectors[:, :3].T  # rank 3: the Krylov space closes
    q, t = block_lanczos(lambda v: v @ low_rank, 200, 12, 2, torch.Generator().manual_seed(0),
                         dtype=torch.float64, device=torch.device("cpu"))
    torch.testing.assert_close(q @ q.T, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-12)
    nonzero = torch.linalg.eigvalsh(t)[torch.linalg.eigvalsh(t).abs() > 1e-8]
    torch.testing.assert_close(nonzero, torch.tensor([-3.0, 5.0, 8.0], dtype=torch.float64), rtol=0, atol=1e-10)


def test_arnoldi_with_blocks_at_full_rank_equals_the_exact_inverse():
    x, y = classification_data(64)
    module = fitted(mlp_model(), x, y)
    reference = ExactReference(module, x, y, 0.01)
    rhs = reference.grads(*classification_data(4, seed=1))
    model = TwiceDifferentiable(module, F.cross_entropy)
    p = model.num_params
    solver = fit_solver(model, loader(x, y), "arnoldi", hessian_regularization=0.01, rank=p, block_size=7)
    assert solver.fit_info["hessian_passes"] == -(-p // 7)  # one pass per block of 7 vectors
    with model.evaluating():
        solution = solver.solve(rhs).x
    torch.testing.assert_close(solution, torch.linalg.solve(reference.matrix, rhs.T).T, rtol=1e-7, atol=1e-9)


def test_a_zero_right_hand_side_gets_a_zero_solution_from_every_loop():
    matrix, rhs = spd_system(size=20, rows=3)
    rhs[1] = 0
    for loop, options in ((conjugate_gradient, {}), (block_conjugate_gradient, {}),
                          (block_conjugate_gradient, {"start_preconditioned": True})):
        solution, info = loop(lambda v: v @ matrix, rhs, lambda r: 2 * r, maxiter=3, **options)
        assert not solution[1].any() and info["max_relative_residual"] < float("inf")
