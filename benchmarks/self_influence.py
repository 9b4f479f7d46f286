"""Benchmark: the cost of self-influence per training example, for every method with its defaults.

    python benchmarks/self_influence.py [--threads N] [--repeat R]

On benchmark problem (a) (64-32-10 tanh MLP on scikit-learn's digits, N = 1,400, λ = 1e-3, see problems.py) each
method is fitted once, then self-influence ⟨(H + λI)⁻¹ gᵢ, gᵢ⟩ is computed for all N training examples. The
table gives the self-influence time (fit excluded) per example, the same as a multiple of the floor (forming
the N per-example gradients, measured in the same round), and the Pearson correlation with the exact float64
values (explicit Hessian, written here independently of the engine). Rounds interleave the methods; each keeps
its fastest round.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, os.path.dirname(__file__))
from problems import Problem, digits_problem  # noqa: E402
from run import exact_scores, pearson  # noqa: E402

from lightning_influence import TwiceDifferentiable  # noqa: E402
from lightning_influence.engine.functional import compute_self_influences, fit_solver  # noqa: E402
from lightning_influence.engine.scoring import gradients  # noqa: E402

METHODS: list[tuple[str, dict[str, Any]]] = [
    ("direct", {}),
    ("cg", {}),
    ("lissa", {}),
    ("arnoldi", {"rank": 50}),
    ("ekfac", {}),
    ("nystroem", {"rank": 50}),
]


def exact_self_influences(problem: Problem) -> Tensor:
    """diag(G (H + λI)⁻¹ Gᵀ) in float64, from the exact reference's ingredients (queries = training set)."""
    swapped = Problem(problem.name, problem.module, problem.x_train, problem.y_train, problem.x_train,
                      problem.y_train, problem.regularization, problem.batch_size, problem.curvature_examples)
    return exact_scores(swapped).diagonal()


def floor_seconds(problem: Problem) -> float:
    """Seconds to form every per-example gradient [N, p], batch by batch (what any method must do once)."""
    model = TwiceDifferentiable(problem.module, F.cross_entropy)
    start = time.perf_counter()
    with model.evaluating():
        for _, block in gradients(model, problem.train_loader(), name="train"):
            block.sum().item()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    problem = digits_problem()
    n = len(problem.x_train)
    exact = exact_self_influences(problem)
    model = TwiceDifferentiable(problem.module, F.cross_entropy)
    solvers = {name: fit_solver(model, problem.curvature_loader(), name,
                                hessian_regularization=problem.regularization, **options)
               for name, options in METHODS}
    best: dict[str, float] = {}
    values: dict[str, Tensor] = {}
    floors = []
    for _ in range(args.repeat):
        floors.append(floor_seconds(problem))
        for name, solver in solvers.items():
            start = time.perf_counter()
            values[name] = compute_self_influences(model, problem.train_loader(), solver)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    floor = min(floors)
    print(f"Problem (a): N = {n:,}, p = {model.num_params:,}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f}, best of {args.repeat} rounds. Floor (forming the N per-example gradients): "
          f"{floor * 1e3 / n:.3f} ms per example.\n")
    print("| method (defaults) | self-influence (s) | ms per example | × floor | Pearson vs exact |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, options in METHODS:
        label = name + "".join(f", {key} {value}" for key, value in options.items())
        seconds = best[name]
        print(f"| {label} | {seconds:.2f} | {seconds * 1e3 / n:.3f} | {seconds / floor:.1f} | "
              f"{pearson(values[name], exact):.3f} |")


if __name__ == "__main__":
    main()
