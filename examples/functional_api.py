"""Influence with the functional API on scikit-learn's digits, without Lightning.

Trains a small tanh MLP with plain PyTorch, computes up-weighting influence of every training image on a few
test images with conjugate gradient through the last layer, and prints the most helpful and most harmful
training examples. Each step prints what it did and how long it took (under a minute on 2 CPU cores).

    python examples/functional_api.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import TwiceDifferentiable, compute_influence_factors, compute_influences_up

WEIGHT_DECAY = 1e-3
# λ: H + λI must be positive definite, and at least the weight decay the loss leaves out. Through the last layer
# with λ = 1e-2, cg converges in about ten Hessian passes; through all 2,410 parameters with λ = 1e-3 the Hessian
# is nearly singular and cg needs hundreds (minutes on a CPU).
DAMPING = 1e-2
LAST_LAYER = ["2.weight", "2.bias"]


def step(message: str, started: float) -> float:
    """Print a finished step with its duration; return the time for the next one."""
    now = time.perf_counter()
    print(f"{message} ({now - started:.1f} s)", flush=True)
    return now


def main() -> None:
    started = time.perf_counter()
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
    started = step(f"trained 300 full-batch Adam steps: test accuracy {accuracy:.3f}", started)

    model = TwiceDifferentiable(module, F.cross_entropy, params=LAST_LAYER)  # influence through the last layer
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=500)
    queries = DataLoader(TensorDataset(x_test[:5], y_test[:5]), batch_size=5)
    factors = compute_influence_factors(model, train_loader, queries, "cg", hessian_perturbation=DAMPING,
                                        rtol=1e-4, preconditioner="jacobi", maxiter=200)
    started = step(f"influence factors: cg over {model.num_params} parameters, {factors.info['iterations']} "
                   f"iterations, residual {factors.info['max_relative_residual']:.1e}", started)
    scores = compute_influences_up(model, train_loader, factors, progress=True)  # [5 queries, 1500 examples]
    step(f"scores: {scores.shape[0]} queries × {scores.shape[1]} training examples", started)
    for query in range(scores.shape[0]):
        helpful = scores[query].topk(3).indices.tolist()
        harmful = (-scores[query]).topk(3).indices.tolist()
        print(
            f"query {query} (label {int(y_test[query])}): helpful {helpful} labels {y_train[helpful].tolist()}; "
            f"harmful {harmful} labels {y_train[harmful].tolist()}"
        )


if __name__ == "__main__":
    main()
