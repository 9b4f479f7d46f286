"""Influence with the functional API on scikit-learn's digits, without Lightning.

Trains a small tanh MLP with plain PyTorch, computes up-weighting influence of every training image on a few
test images with conjugate gradient, and prints the most helpful and most harmful training examples.

    python examples/functional_api.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import TwiceDifferentiable, compute_influence_factors, compute_influences_up

WEIGHT_DECAY = 1e-3
DAMPING = 1e-2  # λ: H + λI must be positive definite; the trained MLP is not exactly at a minimum


def main() -> None:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]

    module = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2, weight_decay=WEIGHT_DECAY)
    for _ in range(300):
        optimizer.zero_grad()
        F.cross_entropy(module(x_train), y_train).backward()
        optimizer.step()
    accuracy = (module(x_test).argmax(1) == y_test).float().mean()
    print(f"test accuracy {accuracy:.3f}")

    model = TwiceDifferentiable(module, F.cross_entropy)
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=500)
    queries = DataLoader(TensorDataset(x_test[:5], y_test[:5]), batch_size=5)
    factors = compute_influence_factors(
        model, train_loader, queries, "cg", hessian_perturbation=DAMPING, rtol=1e-4, preconditioner="jacobi"
    )
    print(f"cg: {factors.info['iterations']} iterations, residual {factors.info['max_relative_residual']:.1e}")
    scores = compute_influences_up(model, train_loader, factors)  # [5 queries, 1500 training examples]
    for query in range(scores.shape[0]):
        helpful = scores[query].topk(3).indices.tolist()
        harmful = (-scores[query]).topk(3).indices.tolist()
        print(
            f"query {query} (label {int(y_test[query])}): helpful {helpful} labels {y_train[helpful].tolist()}; "
            f"harmful {harmful} labels {y_train[harmful].tolist()}"
        )


if __name__ == "__main__":
    main()
