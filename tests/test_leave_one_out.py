"""Influence against reality: predicted leave-one-out changes against actual retraining.

Setting: binary L2-regularised logistic regression on standardised features, float64,
objective (1/N) Σ ℓᵢ + (λ/2)‖θ‖² with λ = 0.01 (weights and bias), trained by Newton's method to a gradient
norm below 1e-12. Removing zᵢ means minimising (1/N) Σ_{j≠i} ℓⱼ + (λ/2)‖θ‖²; DESIGN.md predicts
L_test(θ₋ᵢ) − L_test(θ) ≈ I_up(z_test, zᵢ) / N with H + λI the Hessian of the training objective.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian

from helpers import loader
from lightning_influence import TwiceDifferentiable, compute_influences

LAMBDA = 0.01
N, FEATURES, REMOVED = 120, 4, 40


def logistic_loss(outputs, targets):
    return F.binary_cross_entropy_with_logits(outputs.squeeze(-1), targets)


def make_data():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(N + 6, FEATURES, generator=generator, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)
    w = torch.tensor([1.5, -2.0, 0.5, 1.0], dtype=torch.float64)
    p = torch.sigmoid(x @ w + 0.3)
    y = torch.bernoulli(p, generator=generator)
    return x[:N], y[:N], x[N:], y[N:]


def train(module, x, y, weights):
    """Newton's method on Σ wᵢ ℓᵢ / N + λ/2 ‖θ‖² (wᵢ = 0 removes example i)."""
    names = [n for n, _ in module.named_parameters()]
    shapes = [p.shape for _, p in module.named_parameters()]

    def objective(theta):
        state, offset = {}, 0
        for name, shape in zip(names, shapes):
            state[name] = theta[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        losses = F.binary_cross_entropy_with_logits(
            functional_call(module, state, (x,)).squeeze(-1), y, reduction="none"
        )
        return (weights * losses).sum() / N + LAMBDA / 2 * theta.dot(theta)

    theta = torch.zeros(sum(s.numel() for s in shapes), dtype=torch.float64)
    for _ in range(50):
        gradient = grad(objective)(theta)
        if gradient.norm() < 1e-12:
            break
        theta = theta - torch.linalg.solve(hessian(objective)(theta), gradient)
    assert grad(objective)(theta).norm() < 1e-11
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta, module.parameters())
    return module


@pytest.mark.parametrize("method,options", [("direct", {}), ("cg", {"rtol": 1e-12})])
def test_predicted_leave_one_out_matches_retraining(method, options):
    x, y, x_test, y_test = make_data()
    module = train(nn.Linear(FEATURES, 1).double(), x, y, torch.ones(N, dtype=torch.float64))
    model = TwiceDifferentiable(module, logistic_loss)
    scores = compute_influences(
        model, loader(x, y, batch_size=32), test_data=loader(x_test, y_test), inversion_method=method,
        hessian_regularization=LAMBDA, **options,
    )
    predicted = scores[:, :REMOVED] / N  # [M, REMOVED]

    def test_losses(m):
        with torch.no_grad():
            return F.binary_cross_entropy_with_logits(m(x_test).squeeze(-1), y_test, reduction="none")

    base = test_losses(module)
    actual = torch.empty_like(predicted)
    for i in range(REMOVED):
        weights = torch.ones(N, dtype=torch.float64)
        weights[i] = 0
        retrained = train(nn.Linear(FEATURES, 1).double(), x, y, weights)
        actual[:, i] = test_losses(retrained) - base
    for query in range(predicted.shape[0]):
        pearson = torch.corrcoef(torch.stack([predicted[query], actual[query]]))[0, 1]
        assert pearson >= 0.99, (query, float(pearson))
    overall = torch.corrcoef(torch.stack([predicted.flatten(), actual.flatten()]))[0, 1]
    assert overall >= 0.99
    # The sign convention in action: removing the most helpful example raises that query's loss.
    for query in range(predicted.shape[0]):
        assert actual[query, int(predicted[query].argmax())] > 0
        assert actual[query, int(predicted[query].argmin())] < 0
