"""Does the loader's batch size decide the cost? Ratios measured side by side in one run (issue 11, item 3).

1. One Hessian pass (100 vectors) and one scoring pass (100 queries) over 12,000 examples of a 64-32-10 MLP,
   at loader batch 64 against 4,096 (target: at most 1.5×).
2. `direct` against the plain computation it replaces — `torch.func.hessian` of the mean loss,
   `torch.linalg.solve`, and `vmap(grad)` per-example gradients — on a 650-parameter logistic regression
   (1,000 examples, 300 queries) and on the 2,410-parameter MLP (target: at most 1.5×).

Each timing is the best of `--repeats` runs, the two sides interleaved, so that load on the machine hits both.
Usage: python benchmarks/batch_size.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, vmap
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li
from lightning_influence.curvature.operator import CurvatureOperator


def best_of(repeats: int, *runs: Callable[[], object]) -> list[float]:
    """The best wall time of each run over `repeats` interleaved rounds."""
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for position, run in enumerate(runs):
            start = time.perf_counter()
            run()
            best[position] = min(best[position], time.perf_counter() - start)
    return best


def batch_size_ratios(repeats: int) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(12_000, 64), torch.randint(0, 10, (12_000,))
    model = li.TwiceDifferentiable(nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)), F.cross_entropy)
    vectors = torch.randn(100, model.num_params)
    loaders = {size: DataLoader(TensorDataset(x, y), batch_size=size) for size in (64, 4096)}
    with model.evaluating():
        passes = best_of(repeats, *[lambda s=s: CurvatureOperator(model, loaders[s]).matmat(vectors) for s in loaders])
        scores = best_of(repeats, *[lambda s=s: li.compute_influences_up(model, loaders[s], vectors) for s in loaders])
    for name, (small, large) in (("Hessian pass, 100 vectors", passes), ("scoring, 100 queries", scores)):
        print(f"{name:28s} batch 64: {small:6.2f} s   batch 4096: {large:6.2f} s   ratio {small / large:.2f}")


def plain_direct(module: nn.Module, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor,
                 regularization: float) -> torch.Tensor:
    """The reference: explicit Hessian of the mean loss, one solve, per-example gradients, one product."""
    names = [name for name, _ in module.named_parameters()]
    shapes = [p.shape for p in module.parameters()]
    sizes = [p.numel() for p in module.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])

    def loss(theta: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        params = {n: piece.view(s) for n, piece, s in zip(names, torch.split(theta, sizes), shapes)}
        return F.cross_entropy(functional_call(module, params, (inputs,)), targets)

    curvature = hessian(loss)(flat, x, y) + regularization * torch.eye(len(flat))
    per_example = vmap(grad(lambda t, a, b: loss(t, a[None], b[None])), in_dims=(None, 0, 0))
    factors = torch.linalg.solve(curvature, per_example(flat, xq, yq).T).T
    return factors @ per_example(flat, x, y).T


def direct_ratios(repeats: int) -> None:
    torch.manual_seed(0)
    problems = {
        "logistic regression, p = 650": (nn.Linear(64, 10), 1_000, 300),
        "64-32-10 MLP, p = 2,410": (nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)), 1_000, 100),
    }
    for name, (module, n, m) in problems.items():
        x, y = torch.randn(n + m, 64), torch.randint(0, 10, (n + m,))
        train, queries = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=64), DataLoader(
            TensorDataset(x[n:], y[n:]), batch_size=64)
        model = li.TwiceDifferentiable(module, F.cross_entropy)
        ours, plain = best_of(
            repeats,
            lambda: li.compute_influences(model, train, test_data=queries, inversion_method="direct",
                                          hessian_regularization=0.1),
            lambda: plain_direct(module, x[:n], y[:n], x[n:], y[n:], 0.1),
        )
        print(f"direct, {name:30s} ours: {ours:6.2f} s   plain torch.func: {plain:6.2f} s   ratio {ours / plain:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch_size_ratios(args.repeats)
    direct_ratios(args.repeats)


if __name__ == "__main__":
    main()
