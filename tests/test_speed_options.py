"""Options that change speed, not meaning: the per-layer gradient/score path, chunking, LiSSA acceleration."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import ExactReference, classification_data, fitted, loader, mlp_model
from lightning_influence import TwiceDifferentiable, compute_influence_factors, compute_influences_up, fit_solver
from lightning_influence.model.layers import LayerStructure
from lightning_influence.engine.scoring import stacked_gradients

LAMBDA = 0.05


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1, dilation=1)
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class Shared(nn.Module):
    """One Linear used twice per forward: the outer-product form does not apply."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(torch.tanh(self.layer(x)))))


def conv_data(n=12):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 2, 6, 6, generator=generator, dtype=torch.float64), torch.randint(0, 4, (n,), generator=generator)


@pytest.mark.parametrize("kind", ["mlp", "conv", "sequence"])
def test_layer_gradients_equal_vmap_gradients(kind):
    if kind == "mlp":
        x, y = classification_data(20)
        module = mlp_model()
    elif kind == "conv":
        x, y = conv_data()
        torch.manual_seed(0)
        module = ConvNet().double()
    else:  # a Linear applied at several positions per example, loss on the mean over positions
        generator = torch.Generator().manual_seed(0)
        x, y = torch.randn(10, 4, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (10,), generator=generator)
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 3)).double()
        base = module
        module = nn.Module()
        module.body = base
        module.forward = lambda inputs: base(inputs).mean(1)  # type: ignore[method-assign]
    model = TwiceDifferentiable(module, F.cross_entropy)
    structure = LayerStructure(model)
    with model.evaluating():
        fast = structure.example_gradients(x, y)
        slow = model.grad(x, y)
    assert torch.allclose(fast, slow, rtol=1e-10, atol=1e-12)


def test_scores_through_the_layer_path_equal_the_vmap_path():
    x, y = classification_data(40)
    x_test, y_test = classification_data(5, seed=1)
    module = fitted(mlp_model(), x, y, steps=50)
    model = TwiceDifferentiable(module, F.cross_entropy)
    assert model.uses_layer_gradients
    factors = compute_influence_factors(model, loader(x, y), loader(x_test, y_test), "cg", hessian_perturbation=LAMBDA)
    fast = compute_influences_up(model, loader(x, y), factors)
    generic = TwiceDifferentiable(module, F.cross_entropy, layer_gradients=False)
    assert not generic.uses_layer_gradients
    slow = compute_influences_up(generic, loader(x, y), factors)
    assert torch.allclose(fast, slow, rtol=1e-9, atol=1e-12)


def test_weight_sharing_falls_back_to_vmap():
    x, y = classification_data(12)
    torch.manual_seed(0)
    model = TwiceDifferentiable(Shared().double(), F.cross_entropy)
    assert model.uses_layer_gradients  # until the first forward shows the shared layer
    with model.evaluating():
        gradients = stacked_gradients(model, loader(x, y, batch_size=4), name="data")
        expected = model.grad(x, y)
    assert not model.uses_layer_gradients  # switched to vmap for good by the model itself
    assert torch.allclose(gradients, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_chunk_size_does_not_change_results(chunk_size):
    x, y = classification_data(30)
    x_test, y_test = classification_data(4, seed=1)
    module = fitted(mlp_model(), x, y, steps=50)
    results = []
    for chunk in (None, chunk_size):
        model = TwiceDifferentiable(module, F.cross_entropy, chunk_size=chunk, layer_gradients=False)
        # direct: an iterative solver would amplify rounding-level differences by the condition number, which
        # says nothing about chunking.
        factors = compute_influence_factors(model, loader(x, y), loader(x_test, y_test), "direct",
                                            hessian_perturbation=LAMBDA)
        results.append(compute_influences_up(model, loader(x, y), factors))
    assert torch.allclose(results[0], results[1], rtol=1e-8, atol=1e-12)


def test_chebyshev_lissa_reaches_the_answer_in_fewer_passes():
    x, y = classification_data(60)
    x_test, y_test = classification_data(5, seed=1)
    module = fitted(mlp_model(), x, y)
    exact = ExactReference(module, x, y, LAMBDA).factors(x_test, y_test)
    model = TwiceDifferentiable(module, F.cross_entropy)
    full = loader(x, y, batch_size=len(x))
    infos = {}
    for acceleration in (None, "chebyshev"):
        result = compute_influence_factors(model, full, loader(x_test, y_test), "lissa", hessian_perturbation=LAMBDA,
                                           maxiter=5000, rtol=1e-10, acceleration=acceleration)
        assert result.info["converged"]
        assert float((result.x - exact).norm() / exact.norm()) < 1e-6
        infos[acceleration] = result.info
    assert infos["chebyshev"]["iterations"] < infos[None]["iterations"] / 2
    auto = fit_solver(model, full, "lissa", hessian_regularization=LAMBDA, rtol=1e-10)
    assert auto.solve(exact).info.get("acceleration") == "chebyshev"  # one-batch loader: exact steps, accelerated


def test_nystroem_preconditioned_cg_converges_in_fewer_iterations_to_the_same_answer():
    preconditioner = "nystroem"
    x, y = classification_data(60)
    x_test, y_test = classification_data(5, seed=1)
    module = fitted(mlp_model(), x, y)
    exact = ExactReference(module, x, y, 1e-2).factors(x_test, y_test)
    model = TwiceDifferentiable(module, F.cross_entropy)
    results = {}
    for option in (None, preconditioner):
        results[option] = compute_influence_factors(model, loader(x, y), loader(x_test, y_test), "cg",
                                                    hessian_perturbation=1e-2, rtol=1e-9, preconditioner=option,
                                                    preconditioner_rank=10)
        assert results[option].info["converged"]
        assert float((results[option].x - exact).norm() / exact.norm()) < 1e-6
    assert results[preconditioner].info["iterations"] < results[None].info["iterations"]
