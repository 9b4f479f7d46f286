"""Low-rank queries (`query_rank`, issue 11 item 5): what they save and what they cost in agreement.

1. Speed: scoring N training examples against M = 100 queries on an MLP with 512×512 layers, full factors against
   query_rank=32, side by side in one run (best of `--repeats`, interleaved). The cut of the factors (one SVD per
   layer block and query, once per run) is timed on its own.
2. Agreement: Pearson correlation of rank-8 and rank-32 scores with the full-rank scores (the same factors), on
   benchmark problem (a) (the 64-32-10 digits MLP, `direct`; its blocks are [32, 65] and [10, 33], so rank 32 is
   full rank there) and on a wider digits MLP 64-256-256-10 (EK-FAC factors, and CG on the Gauss-Newton matrix).

Usage: python benchmarks/query_rank.py [--threads 1] [--repeats 3] [--train 4000]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li
from lightning_influence.engine.low_rank import low_rank_factors, low_rank_scores, rank_structure

from batch_size import best_of
from problems import digits_problem, train


def speed(train_size: int, repeats: int) -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10))
    model = li.TwiceDifferentiable(module, F.cross_entropy)
    x, y = torch.randn(train_size, 512), torch.randint(0, 10, (train_size,))
    data = DataLoader(TensorDataset(x, y), batch_size=512)
    factors = torch.randn(100, model.num_params)
    structure = rank_structure(model)
    started = time.perf_counter()
    cut = low_rank_factors(structure, factors, 32)
    cutting = time.perf_counter() - started
    full, low = best_of(repeats, lambda: li.compute_influences_up(model, data, factors),
                        lambda: low_rank_scores(model, structure, data, cut))
    print(f"MLP 512-512-512-10 (p = {model.num_params:,}), N = {train_size:,}, M = 100, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"  scoring, full factors: {full:7.2f} s")
    print(f"  scoring, query_rank=32: {low:6.2f} s   ratio full / rank-32: {full / low:.1f}x")
    print(f"  cutting the factors to rank 32 (once per run): {cutting:.2f} s")


def pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def agreement(name: str, model: li.TwiceDifferentiable, data: DataLoader, factors: Tensor) -> None:
    full = li.compute_influences_up(model, data, factors)
    for rank in (8, 32):
        low = li.compute_influences_up(model, data, factors, query_rank=rank)
        per_query = sum(pearson(low[i], full[i]) for i in range(len(full))) / len(full)
        print(f"  {name}: rank {rank:2d} vs full rank: Pearson {pearson(low, full):.4f} over all scores, "
              f"{per_query:.4f} per query (mean)")


def correlations() -> None:
    problem = digits_problem()
    model = li.TwiceDifferentiable(problem.module, F.cross_entropy)
    factors = li.compute_influence_factors(model, problem.train_loader(), problem.test_loader(), "direct",
                                           hessian_perturbation=problem.regularization).x
    print(f"Agreement with full rank ({len(problem.x_test)} queries, {len(problem.x_train):,} training examples)")
    agreement("problem (a), 64-32-10, direct", model, problem.train_loader(), factors)
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    train(wide, problem.x_train, problem.y_train, weight_decay=1e-3, epochs=60, batch_size=64, lr=1e-3)
    wide_model = li.TwiceDifferentiable(wide.eval(), F.cross_entropy)
    for method, options in (("ekfac", {}), ("cg", {"curvature": "ggn", "rtol": 1e-3, "maxiter": 200})):
        wide_factors = li.compute_influence_factors(wide_model, problem.train_loader(), problem.test_loader(), method,
                                                    hessian_perturbation=1e-2, **options).x
        agreement(f"64-256-256-10, {method}", wide_model, problem.train_loader(), wide_factors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train", type=int, default=4000)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    speed(arguments.train, arguments.repeats)
    correlations()


if __name__ == "__main__":
    main()
