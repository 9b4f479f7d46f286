"""Benchmark: how well each inversion method's scores predict retraining on problem (a), by `lightning_influence.validate`.

    python benchmarks/lds.py [--subsets 100] [--workers 2] [--save-dir runs/lds] [--loo 3] [--loo-queries 5]

Set up as dattri does: K random subsets of half the training set (α = 0.5), each retrained from scratch; the LDS
of a score matrix is the Spearman correlation over subsets between the summed scores of a subset and the
retrained model's −loss on the query, averaged over the queries. (With cross-entropy, the margin
log p/(1 − p) and −loss = log p are both increasing in p, so a rank correlation gives them the same LDS.) Every subset is retrained
with two seeds, and the LDS one seed's outcomes reach in predicting the other's is the noise ceiling (TRAK).
Leave-one-out retrains without each of the top-`--loo` helpful and harmful examples of the first queries.

Problem (a) of `problems.py`: a 64-32-10 tanh MLP on scikit-learn's digits (N = 1400, 100 queries), weight decay
1e-3 = λ, trained to near its minimum by full-batch L-BFGS in float64. The scores come from that model (every
method with its defaults, as `run.py` calls them, plus baselines); each retraining is a fresh `DigitsMLP` trained
the same way through `pl.Trainer` (one full-batch L-BFGS step of `--max-iter` iterations, float64), in worker
processes of one thread each. Retrainings are stored in `--save-dir`, so an interrupted run continues and a
rerun only re-analyses.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import sys
import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(__file__))
from problems import Problem, digits_problem  # noqa: E402
from run import ours  # noqa: E402

from lightning_influence import TwiceDifferentiable, validate  # noqa: E402
from lightning_influence.lightning.validation import ValidationReport  # noqa: E402
from lightning_influence.engine.scoring import gradients  # noqa: E402

WEIGHT_DECAY = 1e-3  # problem (a)'s, also its λ
#: dattri's published MNIST-10 MLP figures (5000 training examples, 0.11M parameters), as quoted in issue 15.
DATTRI_MNIST_MLP = {"dattri IF-CG (MNIST MLP, published)": 0.26, "dattri TRAK-50 (MNIST MLP, published)": 0.45}


class DigitsMLP(pl.LightningModule):
    """Problem (a)'s network and objective: mean cross-entropy + (weight decay / 2)‖θ‖², full-batch L-BFGS."""

    def __init__(self, max_iter: int = 1000) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
        self.loss_fn = F.cross_entropy
        self.max_iter = max_iter

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return self.loss_fn(self(x), y) + WEIGHT_DECAY / 2 * sum((p**2).sum() for p in self.parameters())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.LBFGS(self.parameters(), max_iter=self.max_iter, tolerance_grad=1e-9, tolerance_change=0,
                                 history_size=50, line_search_fn="strong_wolfe")


def gradient_dot(problem: Problem) -> Tensor:
    """Grad-Dot (no Hessian): ⟨∇ℓ(z_test), ∇ℓ(zᵢ)⟩, the baseline every inverse should beat."""
    model = TwiceDifferentiable(problem.module, F.cross_entropy)
    with model.evaluating():
        test = torch.cat([block for _, block in gradients(model, problem.test_loader(), name="test")])
        train = torch.cat([block for _, block in gradients(model, problem.train_loader(), name="train")])
    return test @ train.T


def score_matrices(problem: Problem) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Every method's scores on problem (a) with its defaults (and the best low-rank setting of `run.py`), the
    baselines, and the seconds each took."""
    runs: dict[str, Callable[[], Tensor]] = {
        method: ours(problem, "cpu", method) for method in ("direct", "cg", "lissa", "arnoldi", "ekfac", "nystroem")
    }
    runs["arnoldi (rank 50, trace, refine 5)"] = ours(problem, "cpu", "arnoldi", rank=50, complement="trace", refine=5)
    runs["grad-dot (no Hessian)"] = lambda: gradient_dot(problem)
    scores, seconds = {}, {}
    for name, run in runs.items():
        start = time.perf_counter()
        scores[name] = run().detach().double()
        seconds[name] = time.perf_counter() - start
        print(f"scores: {name} in {seconds[name]:.1f} s", flush=True)
    generator = torch.Generator().manual_seed(0)
    scores["random"] = torch.randn(scores["direct"].shape, generator=generator, dtype=torch.float64)
    return scores, seconds


def table(report: ValidationReport, seconds: dict[str, float]) -> str:
    """The markdown table of the README."""
    def number(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    lines = ["| scores | time (s) | LDS | LOO Pearson | LOO sign agreement |", "| --- | --- | --- | --- | --- |"]
    for name, lds in report.lds.items():
        loo = (report.leave_one_out or {}).get(name, {})
        time_taken = f"{seconds[name]:.2f}" if name in seconds else "–"
        lines.append(f"| {name} | {time_taken} | {number(lds)} | {number(loo.get('pearson'))} | "
                     f"{number(loo.get('sign_agreement'))} |")
    lines.append(f"| two-seed ceiling (one seed's retrainings predicting the other's) | – | {number(report.ceiling)} "
                 "| – | – |")
    lines += [f"| {name} | – | {value} | – | – |" for name, value in DATTRI_MNIST_MLP.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--loo", type=int, default=3, help="top-k helpful and harmful examples left out per query")
    parser.add_argument("--loo-queries", type=int, default=5)
    parser.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations of a retraining")
    parser.add_argument("--save-dir", default="runs/lds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    problem = digits_problem(queries=args.queries)
    scores, seconds = score_matrices(problem)
    train = DataLoader(TensorDataset(problem.x_train.double(), problem.y_train), batch_size=len(problem.x_train))
    queries = TensorDataset(problem.x_test.double(), problem.y_test)
    report = validate(scores, functools.partial(DigitsMLP, max_iter=args.max_iter), train, queries,
                      trainer_kwargs={"max_epochs": 1, "accelerator": "cpu"}, num_subsets=args.subsets,
                      fraction=args.fraction, leave_one_out=args.loo, leave_one_out_queries=args.loo_queries,
                      num_workers=args.workers, save_dir=args.save_dir, progress=True)
    print(f"\n### LDS on problem (a), {datetime.date.today()}: K = {args.subsets} subsets, α = {args.fraction}, "
          f"2 seeds each, {report.retrainings['count']} retrainings ({report.retrainings['seconds']:.0f} s of "
          f"retraining, {args.workers} workers), {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}; total {time.perf_counter() - started:.0f} s\n")
    print(table(report, seconds))


if __name__ == "__main__":
    main()
