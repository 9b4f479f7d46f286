"""EK-FAC against dense constructions from the definitions (torch.func Jacobians, no hooks)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import ExactReference, classification_data, fitted, linear_model, loader, mlp_model, reference_ggn
from lightning_influence import CurvatureOperator, TwiceDifferentiable, compute_influence_factors, fit_solver
from lightning_influence.model.layers import LayerStructure

LAMBDA = 0.05


def kfe_basis(solver):
    """The Kronecker eigenbasis Q as a dense [p, p] matrix (columns), via the solver's own layer mapping."""
    p = solver.operator.num_params
    identity = torch.eye(p, dtype=torch.float64)
    rotated = [qs.T @ m @ qa for m, (qs, qa) in zip(solver.structure.to_matrices(identity), solver._basis)]
    return solver.structure.from_matrices(rotated)


class SmallConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=2, stride=1, padding=1)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_ekfac_is_its_kronecker_eigenbasis_diagonal_of_the_ggn_and_inverts_it_exactly(kind):
    if kind == "mlp":
        x, y = classification_data(40)
        module = fitted(mlp_model(), x, y, steps=50)
    else:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(30, 1, 3, 3, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 3, (30,), generator=generator)
        torch.manual_seed(0)
        module = SmallConv().double()
    model = TwiceDifferentiable(module, F.cross_entropy)
    solver = fit_solver(model, loader(x, y, batch_size=16), "ekfac", hessian_regularization=LAMBDA, refine=0)
    ggn = reference_ggn(module, x, y)
    basis = kfe_basis(solver)
    p = model.num_params
    assert torch.allclose(basis.T @ basis, torch.eye(p, dtype=torch.float64), atol=1e-10)
    # Block-diagonal over layers, diagonal in the Kronecker eigenbasis with the GGN's own diagonal there.
    layer_of = torch.cat([torch.full((b.numel,), i) for i, b in enumerate(solver.structure.blocks)])
    same_layer = layer_of[:, None] == layer_of[None, :]
    corrected = torch.diag(basis.T @ (ggn * same_layer) @ basis)
    expected = basis @ torch.diag(corrected) @ basis.T
    curvature = solver.curvature_matrix()
    assert torch.allclose(curvature, expected, atol=1e-10 * float(ggn.abs().max()))
    rhs = torch.randn(4, p, dtype=torch.float64)
    solution = solver.solve(rhs).x
    direct = torch.linalg.solve(expected + LAMBDA * torch.eye(p, dtype=torch.float64), rhs.T).T
    assert torch.allclose(solution, direct, rtol=1e-8, atol=1e-10)


def test_ekfac_activation_factor_eigenvectors_diagonalise_the_input_covariance():
    x, y = classification_data(40)
    module = fitted(linear_model(), x, y, steps=50)
    solver = fit_solver(TwiceDifferentiable(module, F.cross_entropy), loader(x, y), "ekfac", hessian_regularization=LAMBDA)
    homogeneous = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    covariance = homogeneous.T @ homogeneous / len(x)
    q_a = solver._basis[0][1]
    rotated = q_a.T @ covariance @ q_a
    assert torch.allclose(rotated, torch.diag(torch.diag(rotated)), atol=1e-10)


def test_ekfac_is_exact_for_a_linear_model_on_one_example():
    """One example through a linear layer: GGN = Hessian = (Σ_c r_c r_cᵀ) ⊗ a aᵀ, an exact Kronecker product."""
    x, y = classification_data(1)
    module = linear_model()
    reference = ExactReference(module, x, y, LAMBDA)
    model = TwiceDifferentiable(module, F.cross_entropy)
    x_test, y_test = classification_data(3, seed=1)
    result = compute_influence_factors(model, loader(x, y), loader(x_test, y_test), "ekfac", hessian_perturbation=LAMBDA)
    exact = reference.factors(x_test, y_test)
    assert float((result.x - exact).norm() / exact.norm()) < 1e-8


def test_sampled_pseudo_gradients_approach_the_exact_ones():
    x, y = classification_data(60)
    module = fitted(mlp_model(), x, y, steps=50)
    model = TwiceDifferentiable(module, F.cross_entropy)
    exact = fit_solver(model, loader(x, y), "ekfac", hessian_regularization=LAMBDA).curvature_matrix()
    errors = []
    for samples in (1, 64):
        sampled = fit_solver(model, loader(x, y), "ekfac", hessian_regularization=LAMBDA, samples=samples)
        errors.append(float((sampled.curvature_matrix() - exact).norm() / exact.norm()))
    assert errors[1] < errors[0] and errors[1] < 0.1


def test_factor_dtype_float32_matches_float64():
    x, y = classification_data(60)
    module = fitted(mlp_model(), x, y, steps=50)
    model = TwiceDifferentiable(module, F.cross_entropy)
    rhs = torch.randn(3, model.num_params, dtype=torch.float64)
    full = fit_solver(model, loader(x, y), "ekfac", hessian_regularization=LAMBDA).solve(rhs).x
    single = fit_solver(model, loader(x, y), "ekfac", hessian_regularization=LAMBDA, factor_dtype="float32").solve(rhs).x
    assert float((single - full).norm() / full.norm()) < 1e-4


def test_ekfac_refuses_unsupported_layers_by_name():
    module = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    model = TwiceDifferentiable(module, F.cross_entropy)
    x, y = classification_data(10)
    with pytest.raises(ValueError, match=r"1\.weight \(LayerNorm\).*1\.bias \(LayerNorm\)"):
        fit_solver(model, loader(x, y), "ekfac", hessian_regularization=LAMBDA)
    # Selecting only the supported layers works.
    subset = TwiceDifferentiable(module, F.cross_entropy, params=["0.*", "2.*"])
    assert fit_solver(subset, loader(x, y), "ekfac", hessian_regularization=LAMBDA).fit_info["layers"] == ["0", "2"]


def test_ekfac_factors_are_summed_through_the_reducer():
    """A reducer that doubles every sum (two identical shards) leaves the means, and so the solution, unchanged."""

    class Doubling:
        def __init__(self):
            self.calls = 0

        def sum(self, tensor):
            self.calls += 1
            return 2 * tensor

    x, y = classification_data(40)
    module = fitted(mlp_model(), x, y, steps=50)
    model = TwiceDifferentiable(module, F.cross_entropy)
    rhs = torch.randn(2, model.num_params, dtype=torch.float64)
    local = fit_solver(model, loader(x, y), "ekfac", hessian_regularization=LAMBDA).solve(rhs).x
    reducer = Doubling()
    with model.evaluating():
        solver = make_ekfac().fit(CurvatureOperator(model, loader(x, y), reducer=reducer), LAMBDA)
    assert reducer.calls > 0
    assert torch.allclose(solver.solve(rhs).x, local, rtol=1e-10, atol=1e-12)


def make_ekfac():
    from lightning_influence import make_solver

    return make_solver("ekfac")


def test_layer_structure_round_trips_flat_vectors():
    module = SmallConv().double()
    structure = LayerStructure(TwiceDifferentiable(module, F.cross_entropy))
    vectors = torch.randn(3, sum(p.numel() for p in module.parameters()), dtype=torch.float64)
    assert torch.equal(structure.from_matrices(structure.to_matrices(vectors)), vectors)
