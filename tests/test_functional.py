"""The classic functional API: shapes, the sign convention, perturbation influence and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from helpers import ExactReference, classification_data, fitted, loader, mlp_model
from lightning_influence import (
    InfluenceComputationError,
    NonFiniteError,
    TwiceDifferentiable,
    compute_influence_factors,
    compute_influences,
    compute_influences_pert,
    compute_influences_up,
    compute_self_influences,
    fit_solver,
)

LAMBDA = 0.05


@pytest.fixture(scope="module")
def setup():
    x, y = classification_data(40)
    x_test, y_test = classification_data(4, seed=1)
    module = fitted(mlp_model(), x, y)
    return {
        "x": x, "y": y, "x_test": x_test, "y_test": y_test, "module": module,
        "model": TwiceDifferentiable(module, F.cross_entropy),
        "reference": ExactReference(module, x, y, LAMBDA),
    }


def test_up_influence_equals_the_exact_bilinear_form(setup):
    scores = compute_influences(
        setup["model"], loader(setup["x"], setup["y"]), test_data=loader(setup["x_test"], setup["y_test"]),
        hessian_regularization=LAMBDA,
    )
    expected = setup["reference"].up(setup["x_test"], setup["y_test"], setup["x"], setup["y"])
    assert scores.shape == (4, 40)
    torch.testing.assert_close(scores, expected, atol=1e-10, rtol=1e-8)


def test_default_test_and_input_data_are_the_training_data(setup):
    scores = compute_influences(setup["model"], loader(setup["x"], setup["y"]), hessian_regularization=LAMBDA)
    assert scores.shape == (40, 40)
    torch.testing.assert_close(scores, scores.T, atol=1e-10, rtol=1e-8)  # gᵢᵀ A⁻¹ gⱼ is symmetric
    self_influence = compute_self_influences(
        setup["model"], loader(setup["x"], setup["y"]),
        fit_solver(setup["model"], loader(setup["x"], setup["y"]), "direct", hessian_regularization=LAMBDA),
    )
    torch.testing.assert_close(self_influence, torch.diagonal(scores), atol=1e-10, rtol=1e-8)


def test_sign_convention_positive_means_helpful(setup):
    """DESIGN.md: I_up > 0 means removing zᵢ raises the query's loss; self-influence is always > 0."""
    scores = compute_influences(setup["model"], loader(setup["x"], setup["y"]), hessian_regularization=LAMBDA)
    assert bool((torch.diagonal(scores) > 0).all())
    # A query identical to a training example is helped most by that example among near-duplicates of itself.
    x, y = setup["x"], setup["y"]
    duplicate = compute_influences(
        setup["model"], loader(x, y), test_data=loader(x[:1], y[:1]), hessian_regularization=LAMBDA
    )
    assert float(duplicate[0, 0]) > 0


def test_perturbation_influence_matches_an_independent_autograd_computation(setup):
    factors = compute_influence_factors(
        setup["model"], loader(setup["x"], setup["y"]), loader(setup["x_test"], setup["y_test"]), "direct",
        hessian_perturbation=LAMBDA,
    )
    x_in, y_in = setup["x"][:6], setup["y"][:6]
    pert = compute_influences_pert(setup["model"], loader(x_in, y_in, batch_size=4), factors)
    assert pert.shape == (4, 6, 5)
    module = setup["module"]
    params = list(module.parameters())
    for i in range(6):
        xi = x_in[i : i + 1].clone().requires_grad_(True)
        grads = torch.autograd.grad(F.cross_entropy(module(xi), y_in[i : i + 1]), params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        for m in range(4):
            (expected,) = torch.autograd.grad(flat @ factors.x[m], xi, retain_graph=True)
            torch.testing.assert_close(pert[m, i], expected[0], atol=1e-10, rtol=1e-8)


def test_perturbation_is_the_input_gradient_of_up_influence(setup):
    """A finite-difference check of the convention I_pert = ∇ₓ I_up."""
    factors = compute_influence_factors(
        setup["model"], loader(setup["x"], setup["y"]), loader(setup["x_test"], setup["y_test"]), "direct",
        hessian_perturbation=LAMBDA,
    )
    x, y = setup["x"][:1].clone(), setup["y"][:1]
    pert = compute_influences_pert(setup["model"], loader(x, y), factors)
    step = 1e-6
    direction = torch.zeros_like(x)
    direction[0, 2] = 1.0
    up_plus = compute_influences_up(setup["model"], loader(x + step * direction, y), factors)
    up_minus = compute_influences_up(setup["model"], loader(x - step * direction, y), factors)
    torch.testing.assert_close((up_plus - up_minus)[:, 0] / (2 * step), pert[:, 0, 2], atol=1e-6, rtol=1e-5)


def test_influence_type_perturbation_via_compute_influences(setup):
    result = compute_influences(
        setup["model"], loader(setup["x"], setup["y"]), test_data=loader(setup["x_test"], setup["y_test"]),
        influence_type="perturbation", hessian_regularization=LAMBDA,
    )
    assert result.shape == (4, 40, 5)


def test_progress_bars_do_not_change_results(setup, capsys):
    args = (setup["model"], loader(setup["x"], setup["y"]))
    quiet = compute_influences(*args, hessian_regularization=LAMBDA, inversion_method="cg", rtol=1e-10)
    loud = compute_influences(*args, hessian_regularization=LAMBDA, inversion_method="cg", rtol=1e-10, progress=True)
    torch.testing.assert_close(quiet, loud, atol=0, rtol=0)


def test_unknown_influence_type_lists_the_valid_ones(setup):
    with pytest.raises(ValueError, match=r"Unknown influence type 'down'; choose one of 'up', 'perturbation'"):
        compute_influences(setup["model"], loader(setup["x"], setup["y"]), influence_type="down")


def test_empty_loader_is_refused(setup):
    empty = DataLoader(TensorDataset(torch.zeros(0, 5, dtype=torch.float64), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="training_data yielded no batches"):
        compute_influences(setup["model"], empty)


def test_non_loader_data_is_refused(setup):
    with pytest.raises(TypeError, match="must be an iterable of \\(inputs, targets\\) batches"):
        compute_influences(setup["model"], setup["x"])


def test_model_must_be_twice_differentiable(setup):
    with pytest.raises(TypeError, match=r"wrap a module as TwiceDifferentiable\(module, loss_fn\)"):
        compute_influences(setup["module"], loader(setup["x"], setup["y"]))


def test_non_finite_gradients_name_the_stage_and_batch(setup):
    x = setup["x"].clone()
    x[13, 0] = math.nan
    with pytest.raises(NonFiniteError, match="Hessian-vector products in batch 1") as caught:
        compute_influences(
            setup["model"], loader(x, setup["y"], batch_size=8),
            test_data=loader(setup["x_test"], setup["y_test"]), inversion_method="cg",
        )
    assert caught.value.batch == 1
    with pytest.raises(NonFiniteError, match="per-example gradients of test_data in batch 1"):
        compute_influences(setup["model"], loader(x, setup["y"], batch_size=8), inversion_method="cg")


def test_late_failure_keeps_the_factors(setup):
    wrong_inputs = loader(torch.zeros(3, 9, dtype=torch.float64), torch.zeros(3, dtype=torch.long))
    with pytest.raises(InfluenceComputationError, match="factors are kept") as caught:
        compute_influences(
            setup["model"], loader(setup["x"], setup["y"]), test_data=loader(setup["x_test"], setup["y_test"]),
            input_data=wrong_inputs, hessian_regularization=LAMBDA,
        )
    kept = caught.value.partial["factors"]
    assert kept.x.shape == (4, setup["model"].num_params)
    rescored = compute_influences_up(setup["model"], loader(setup["x"], setup["y"]), kept)
    assert rescored.shape == (4, 40)


def test_factors_of_the_wrong_shape_are_refused(setup):
    with pytest.raises(ValueError, match=r"influence_factors must have shape \[M, "):
        compute_influences_up(setup["model"], loader(setup["x"], setup["y"]), torch.zeros(2, 3))


def test_dict_batches_are_split(setup):
    class DictData(torch.utils.data.Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            return {"x": setup["x"][i], "y": setup["y"][i]}

    scores = compute_influences(setup["model"], DataLoader(DictData(), batch_size=7), hessian_regularization=LAMBDA)
    plain = compute_influences(setup["model"], loader(setup["x"], setup["y"]), hessian_regularization=LAMBDA)
    torch.testing.assert_close(scores, plain, atol=1e-10, rtol=1e-8)


class _SquareWithoutJvp(torch.autograd.Function):
    """A custom function functorch cannot transform (no setup_context)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return 2 * x * grad_output


@pytest.mark.parametrize(
    ("loss_fn", "message"),
    [
        (lambda out, t: _SquareWithoutJvp.apply(out).mean(), "cannot be differentiated twice with torch.func"),
        (lambda out, t: F.cross_entropy(out.detach(), t), "zero curvature in the selected parameters"),
        (lambda out, t: F.l1_loss(out, F.one_hot(t, 3).to(out.dtype)), "piecewise linear"),
    ],
    ids=["no-forward-mode", "detached", "l1"],
)
def test_losses_that_are_not_twice_differentiable_are_refused_before_fitting(setup, loss_fn, message):
    model = TwiceDifferentiable(torch.nn.Linear(5, 3).double(), loss_fn)
    with pytest.raises(ValueError, match=message):
        fit_solver(model, loader(setup["x"], setup["y"]), "cg")


def test_iterable_datasets_without_a_length_are_streamed(setup):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(setup["x"], setup["y"]))

    streamed = compute_influences(setup["model"], DataLoader(Stream(), batch_size=7), hessian_regularization=LAMBDA,
                                  test_data=loader(setup["x_test"], setup["y_test"]))
    plain = compute_influences(setup["model"], loader(setup["x"], setup["y"]), hessian_regularization=LAMBDA,
                               test_data=loader(setup["x_test"], setup["y_test"]))
    torch.testing.assert_close(streamed, plain, atol=1e-10, rtol=1e-8)


def test_dict_batches_without_known_keys_are_explained(setup):
    class Unnamed(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"pixels": setup["x"][i], "class": setup["y"][i]}

    with pytest.raises(ValueError, match=r"Cannot find inputs and targets in a dict batch with keys \['class', 'pixels'\]"):
        compute_influences(setup["model"], DataLoader(Unnamed(), batch_size=2))
