"""The functional model: derivatives against plain autograd, parameter subsets, modes and bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import classification_data, mlp_model
from lightning_influence import TwiceDifferentiable


def autograd_example_grads(module, x, y, names):
    params = dict(module.named_parameters())
    rows = []
    for xi, yi in zip(x, y):
        loss = F.cross_entropy(module(xi[None]), yi[None])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [params[n] for n in names])]))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_example_gradients_match_autograd_loop(dtype):
    x, y = classification_data(12, dtype=dtype)
    module = mlp_model(dtype=dtype)
    model = TwiceDifferentiable(module, F.cross_entropy)
    names = [n for n, _ in module.named_parameters()]
    expected = autograd_example_grads(module, x, y, names)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert model.grad(x, y).dtype == dtype
    torch.testing.assert_close(model.grad(x, y), expected, atol=tolerance, rtol=tolerance)


def test_chunk_size_does_not_change_results():
    x, y = classification_data(10)
    module = mlp_model()
    whole = TwiceDifferentiable(module, F.cross_entropy).grad(x, y)
    chunked = TwiceDifferentiable(module, F.cross_entropy, chunk_size=3).grad(x, y)
    torch.testing.assert_close(chunked, whole, atol=0, rtol=0)


def test_hessian_vector_products_match_explicit_hessian():
    x, y = classification_data(20)
    model = TwiceDifferentiable(mlp_model(), F.cross_entropy)
    vectors = torch.randn(4, model.num_params, dtype=torch.float64)
    explicit = model.batch_hessian(x, y)
    torch.testing.assert_close(explicit, explicit.T)
    torch.testing.assert_close(model.batch_hvp(x, y, vectors), vectors @ explicit, atol=1e-12, rtol=1e-10)


def test_parameter_subset_by_glob_holds_the_rest_fixed():
    x, y = classification_data(8)
    module = mlp_model()
    model = TwiceDifferentiable(module, F.cross_entropy, params=["2.*"])
    assert model.param_names == ["2.weight", "2.bias"]
    assert model.num_params == 8 * 3 + 3
    expected = autograd_example_grads(module, x, y, ["2.weight", "2.bias"])
    torch.testing.assert_close(model.grad(x, y), expected, atol=1e-12, rtol=1e-10)


def test_parameter_selection_matching_nothing_names_the_parameters():
    with pytest.raises(ValueError, match=r"match no trainable parameter.*0\.weight"):
        TwiceDifferentiable(mlp_model(), F.cross_entropy, params=["head.*"])


def test_no_trainable_parameters_is_refused():
    module = mlp_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        TwiceDifferentiable(module, F.cross_entropy)


def test_mixed_gradient_matches_double_backward():
    x, y = classification_data(6)
    module = mlp_model()
    model = TwiceDifferentiable(module, F.cross_entropy)
    vectors = torch.randn(2, model.num_params, dtype=torch.float64)
    result = model.mixed_grad(x, y, vectors)
    assert result.shape == (2, 6, 5)
    params = list(module.parameters())
    for i in range(6):
        xi = x[i : i + 1].clone().requires_grad_(True)
        grads = torch.autograd.grad(F.cross_entropy(module(xi), y[i : i + 1]), params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        for k in range(2):
            (expected,) = torch.autograd.grad(flat @ vectors[k], xi, retain_graph=True)
            torch.testing.assert_close(result[k, i], expected[0], atol=1e-12, rtol=1e-10)


class NormalisedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


def test_eval_mode_uses_running_statistics_and_restores_modes():
    torch.manual_seed(0)
    module = NormalisedNet().double()
    x, y = classification_data(16)
    module.train()
    module(x)  # populate running statistics
    module.body[3].eval()  # a mixed state must come back exactly as it was
    modes = [m.training for m in module.modules()]
    model = TwiceDifferentiable(module, F.cross_entropy)
    with model.evaluating():
        first = model.grad(x, y)
        second = model.grad(x, y)
        module.eval()
        expected = autograd_example_grads(module, x, y, [n for n, _ in module.named_parameters()])
    assert [m.training for m in module.modules()] == modes
    torch.testing.assert_close(first, second, atol=0, rtol=0)  # dropout off: deterministic
    torch.testing.assert_close(first, expected, atol=1e-12, rtol=1e-10)


def test_non_scalar_loss_is_refused():
    x, y = classification_data(4)
    model = TwiceDifferentiable(mlp_model(), lambda out, t: F.cross_entropy(out, t, reduction="none"))
    with pytest.raises(ValueError, match="must return a scalar"):
        model.batch_loss(x, y)


def test_input_shape_mismatch_is_explained():
    x, y = classification_data(4, features=7)
    model = TwiceDifferentiable(mlp_model(features=5), F.cross_entropy)
    with pytest.raises(ValueError, match=r"could not be applied to a batch with \(inputs, targets\) shapes"):
        model.batch_loss(x, y)


def test_constructor_checks_its_arguments():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        TwiceDifferentiable("not a module", F.cross_entropy)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        TwiceDifferentiable(mlp_model(), "cross_entropy")
    with pytest.raises(ValueError, match="chunk_size"):
        TwiceDifferentiable(mlp_model(), F.cross_entropy, chunk_size=0)


class DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 1).double()

    def forward(self, x):
        return {"prediction": self.layer(x)}


def test_hessian_products_fall_back_to_reverse_mode_where_forward_mode_fails():
    """F.mse_loss on a whole batch (a dict output without output_transform goes to the loss as it is) has no
    working forward-over-reverse in torch 2.13; the product must still be right: 2/N XᵀX for a linear model."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(20, 1, generator=generator, dtype=torch.float64)
    model = TwiceDifferentiable(DictOutput(), lambda out, t: F.mse_loss(out["prediction"], t))
    vectors = torch.randn(2, model.num_params, generator=generator, dtype=torch.float64)
    homogeneous = torch.cat([x, torch.ones(20, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(model.batch_hvp(x, y, vectors), vectors @ (2 * homogeneous.T @ homogeneous / 20))
    assert model.reverse_mode_only


def test_check_finite_tells_an_overflowing_sum_from_nan_and_inf():
    from lightning_influence.errors import NonFiniteError
    from lightning_influence.model.twice_differentiable import check_finite

    large = torch.full((4, 3), 3e38, dtype=torch.float32)  # finite values whose sum overflows
    assert check_finite(large, "stage") is large
    for bad in (float("nan"), float("inf"), -float("inf")):
        tensor = torch.ones(4, 3)
        tensor[2, 1] = bad
        with pytest.raises(NonFiniteError, match="gradients in batch 7"):
            check_finite(tensor, "gradients", 7)
