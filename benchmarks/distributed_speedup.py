"""Speed-up of the influence pipeline from two processes (gloo, CPU) over one, on the same problem in one run.

Runs `lightning_influence.compute_influence` (what the callback calls) for the same trained MLP and
data with: one process and one thread, one process and two threads, and two processes of one thread each under
a torch.distributed gloo group (as Lightning's ddp/ddp_spawn on CPU would give). Time is measured inside the
processes from a common start (process start-up and imports are excluded) and the best of `--repeats` is kept.
Checks that the two-process scores equal the one-process ones before reporting.

    python benchmarks/distributed_speedup.py [--n 3000] [--method cg] [--repeats 1]
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence import Distribution, IndexedData, InfluenceArguments, TwiceDifferentiable, compute_influence


def make_problem(n: int, queries: int, features: int, hidden: int, classes: int):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n + queries, features, generator=generator)
    y = (x @ torch.randn(features, classes, generator=generator)).argmax(1)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, classes))
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    for _ in range(200):  # full-batch training, so the weights sit near a minimum
        optimizer.zero_grad()
        F.cross_entropy(module(x[:n]), y[:n]).backward()
        optimizer.step()
    return {"state": module.state_dict(), "x": x[:n], "y": y[:n], "xq": x[n:], "yq": y[n:]}


def body(rank: int, world_size: int, threads: int, workdir: str, args: argparse.Namespace, label: str) -> None:
    torch.set_num_threads(threads)
    folder = Path(workdir)
    saved = torch.load(folder / "problem.pt")
    state = saved["state"]
    train, queries = TensorDataset(saved["x"], saved["y"]), TensorDataset(saved["xq"], saved["yq"])
    module = nn.Sequential(nn.Linear(args.features, args.hidden), nn.Tanh(), nn.Linear(args.hidden, args.classes))
    module.load_state_dict(state)
    model = TwiceDifferentiable(module, F.cross_entropy)
    distribution = Distribution()
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder / f'init-{label}'}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(minutes=10))
        distribution = Distribution.from_process_group()
    best, cpu = float("inf"), float("inf")
    for repeat in range(args.repeats):
        distribution.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        arguments = InfluenceArguments(method=args.method, method_kwargs={"rtol": 1e-6} if args.method == "cg" else {},
                                       hessian_regularization=0.01, batch_size=args.batch_size)
        result = compute_influence(model, IndexedData(train), IndexedData(queries), arguments,
                                   save_dir=folder / f"{label}-{repeat}", distribution=distribution)
        cpu = min(cpu, time.process_time() - cpu_start)
        distribution.barrier()
        best = min(best, time.perf_counter() - start)
    cpu_per_rank = distribution.all_gather_rows(torch.tensor([cpu], dtype=torch.float64)).tolist()
    if distribution.is_global_zero:
        torch.save({"seconds": best, "scores": result.scores, "info": result.metadata["convergence"],
                    "stages": result.metadata["timings"], "cpu": cpu_per_rank},
                   folder / f"{label}.pt")
    if world_size > 1:
        dist.destroy_process_group()


def run(label: str, world_size: int, threads: int, workdir: str, args: argparse.Namespace) -> dict:
    mp.start_processes(body, args=(world_size, threads, workdir, args, label), nprocs=world_size,
                       start_method="spawn")
    found = torch.load(Path(workdir) / f"{label}.pt")
    stages = ", ".join(f"{k.removesuffix('_seconds')} {v:.2f}" for k, v in found["stages"].items())
    print(f"  ({label}: {found['seconds']:.2f} s; rank zero's stages in s: {stages})", flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000, help="training examples")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--method", default="cg")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--with-threads", action="store_true", help="also one process with two threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        torch.save(make_problem(args.n, args.queries, args.features, args.hidden, args.classes),
                   Path(workdir) / "problem.pt")
        load_before = os.getloadavg()[0]
        runs = {"1 process x 1 thread": run("one", 1, 1, workdir, args)}
        if args.with_threads:
            runs["1 process x 2 threads"] = run("one-threads", 1, 2, workdir, args)
        runs["2 processes x 1 thread"] = run("two", 2, 1, workdir, args)
        load_after = os.getloadavg()[0]
    one, two = runs["1 process x 1 thread"]["scores"], runs["2 processes x 1 thread"]["scores"]
    error = float((two - one).norm() / one.norm())
    assert error < 1e-3, f"two-process scores differ from one-process scores: relative error {error:.2e}"
    p = (args.features + 1) * args.hidden + (args.hidden + 1) * args.classes
    print(f"influence pipeline, method={args.method}, N={args.n}, M={args.queries}, p={p}, "
          f"batch={args.batch_size}, {os.cpu_count()} CPU cores, best of {args.repeats}")
    baseline = runs["1 process x 1 thread"]["seconds"]
    for label, found in runs.items():
        extra = f", {found['info'].get('iterations')} cg iterations" if args.method == "cg" else ""
        cpu = " + ".join(f"{value:.2f}" for value in found["cpu"])
        print(f"  {label:24s} {found['seconds']:7.2f} s wall   speed-up {baseline / found['seconds']:.2f}x   "
              f"CPU s per process {cpu}{extra}")
    print(f"  two-process scores vs one-process: relative error {error:.1e} (float32, cg rtol 1e-6)")
    print(f"  1-minute load average {load_before:.1f} before, {load_after:.1f} after (other work on the machine)")
    print("  (a process's CPU seconds below its wall seconds: it waited for a core or for the other process)")


if __name__ == "__main__":
    main()
