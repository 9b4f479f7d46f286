"""The benchmark problems, built the same way for every method: (a) a 64-32-10 tanh MLP on scikit-learn's digits
with weight decay 1e-3 (exact float64 reference possible); (b) a synthetic classification MLP with ≥ 100k
parameters, ≥ 20k training examples and ≥ 100 queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


@dataclass
class Problem:
    name: str
    module: nn.Module
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    regularization: float
    batch_size: int
    curvature_examples: int  # the first examples of the training set that define H

    def train_loader(self, device: str = "cpu") -> DataLoader:
        return DataLoader(TensorDataset(self.x_train.to(device), self.y_train.to(device)), batch_size=self.batch_size)

    def curvature_loader(self, device: str = "cpu") -> DataLoader:
        n = self.curvature_examples
        data = TensorDataset(self.x_train[:n].to(device), self.y_train[:n].to(device))
        return DataLoader(data, batch_size=self.batch_size)

    def test_loader(self, device: str = "cpu") -> DataLoader:
        return DataLoader(TensorDataset(self.x_test.to(device), self.y_test.to(device)), batch_size=self.batch_size)


def train(module: nn.Module, x: Tensor, y: Tensor, weight_decay: float, epochs: int, batch_size: int, lr: float, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(module(x[index]), y[index])
            loss = loss + weight_decay / 2 * sum((p**2).sum() for p in module.parameters())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return module


def digits_problem(queries: int = 100, seed: int = 0) -> Problem:
    """(a): 64-32-10 tanh MLP on digits, weight decay 1e-3 (also λ), trained to near its minimum with L-BFGS."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    x, y = x[order], y[order]
    n_train = 1400
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    weight_decay = 1e-3
    x64, y_fit = x[:n_train].double(), y[:n_train]
    # Full-batch L-BFGS in float64 to a tight gradient tolerance: the model sits at a minimum of the
    # regularised objective, so H + λI (λ = weight decay) is its positive semi-definite Hessian.
    optimizer = torch.optim.LBFGS(module.parameters(), max_iter=3000, tolerance_grad=1e-9, tolerance_change=0,
                                  history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(module(x64), y_fit)
        loss = loss + weight_decay / 2 * sum((p**2).sum() for p in module.parameters())
        loss.backward()
        return loss

    optimizer.step(closure)
    module = module.float()
    module.eval()
    return Problem("a", module, x[:n_train], y[:n_train], x[n_train : n_train + queries], y[n_train : n_train + queries],
                   weight_decay, batch_size=200, curvature_examples=n_train)


def synthetic_problem(n_train: int = 20_000, queries: int = 100, curvature_examples: int = 2_000, seed: int = 0,
                      epochs: int = 3) -> Problem:
    """(b): 128-256-256-10 ReLU MLP (101,386 parameters) on synthetic 10-class data from a random teacher."""
    generator = torch.Generator().manual_seed(seed)
    features, classes = 128, 10
    teacher = torch.randn(features, classes, generator=generator)
    x = torch.randn(n_train + queries, features, generator=generator)
    logits = torch.tanh(x @ teacher / features**0.5 * 3) * 3 + 0.5 * torch.randn(n_train + queries, classes, generator=generator)
    y = torch.distributions.Categorical(logits=logits).sample()
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(features, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, classes))
    train(module, x[:n_train], y[:n_train], 1e-3, epochs=epochs, batch_size=256, lr=1e-3, seed=seed)
    module.eval()
    return Problem("b", module, x[:n_train], y[:n_train], x[n_train:], y[n_train:], 1.0,
                   batch_size=1000, curvature_examples=curvature_examples)
