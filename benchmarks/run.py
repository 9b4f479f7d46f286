"""Benchmark: our inversion methods against the peers' on the same trained models, in one process run.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--threads N] [--problems a b] [--no-peers]
                             [--only LABEL ...] [--repeat R]

Problem (a): 64-32-10 tanh MLP on scikit-learn's digits, weight decay 1e-3 = λ; accuracy is the Pearson
correlation over the whole [M, N] score matrix against an exact float64 reference (explicit Hessian by
torch.func.hessian, torch.linalg.solve), written here independently of the engine. Problem (b): a synthetic
101k-parameter MLP, ≥ 20k training examples, 100 queries; accuracy is the Pearson correlation with our own
CG run to a tight tolerance. Peers (pyDVL, captum, kronfluence) are optional (`pip install -e ".[bench]"`);
missing ones are reported with the import error. Peak memory is the largest increase of the process's resident
memory (CPU, sampled every 5 ms) or of allocated device memory (CUDA) during a method, above its start.
Scores of peers with the opposite sign convention are compared by |Pearson|.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, vmap

sys.path.insert(0, os.path.dirname(__file__))
from problems import Problem, digits_problem, synthetic_problem  # noqa: E402

from lightning_influence import TwiceDifferentiable, compute_influence_factors, compute_influences_up  # noqa: E402
from lightning_influence.engine.scoring import gradients  # noqa: E402


# -- measurement ---------------------------------------------------------------------------------------------
class PeakMemory:
    """Largest increase of resident memory (CPU) or allocated memory (CUDA) while the block runs, in bytes."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._start = self._rss()
        self._stop = threading.Event()
        self._max = self._start

        def sample() -> None:
            while not self._stop.is_set():
                self._max = max(self._max, self._rss())
                time.sleep(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self._max, self._rss()) - self._start


def timed(device: str, fn: Callable[[], Tensor]) -> tuple[Tensor | None, float, int, str]:
    """(scores, seconds, peak bytes, error) of one method run."""
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        try:
            scores = fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            error = ""
        except Exception as exc:  # a peer that fails is reported, not fatal
            scores, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
            traceback.print_exc(limit=3, file=sys.stderr)
        seconds = time.perf_counter() - start
    return scores, seconds, memory.peak, error


def pearson(a: Tensor, b: Tensor) -> float:
    stacked = torch.stack([a.detach().double().flatten().cpu(), b.detach().double().flatten().cpu()])
    return float(torch.corrcoef(stacked)[0, 1])


# -- exact float64 reference, independent of the engine ------------------------------------------------------
def exact_scores(problem: Problem) -> Tensor:
    module = copy.deepcopy(problem.module).double().cpu()
    names = [n for n, _ in module.named_parameters()]
    shapes = [p.shape for _, p in module.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in module.parameters()])

    def loss(t: Tensor, x: Tensor, y: Tensor) -> Tensor:
        state, offset = {}, 0
        for name, shape in zip(names, shapes):
            state[name] = t[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return F.cross_entropy(functional_call(module, state, (x,)), y)

    x, y = problem.x_train[: problem.curvature_examples].double(), problem.y_train[: problem.curvature_examples]
    matrix = hessian(loss)(theta, x, y) + problem.regularization * torch.eye(theta.numel(), dtype=torch.float64)
    one = lambda t, xi, yi: loss(t, xi[None], yi[None])  # noqa: E731
    test = vmap(grad(one), in_dims=(None, 0, 0))(theta, problem.x_test.double(), problem.y_test)
    train = vmap(grad(one), in_dims=(None, 0, 0))(theta, problem.x_train.double(), problem.y_train)
    return torch.linalg.solve(matrix, test.T).T @ train.T


# -- our methods ---------------------------------------------------------------------------------------------
def ours(problem: Problem, device: str, method: str, max_memory: str | None = None,
         **options: Any) -> Callable[[], Tensor]:
    def run() -> Tensor:
        model = TwiceDifferentiable(problem.module, F.cross_entropy, max_memory=max_memory)
        factors = compute_influence_factors(
            model, problem.curvature_loader(device), problem.test_loader(device), method,
            hessian_perturbation=problem.regularization, **options,
        )
        return compute_influences_up(model, problem.train_loader(device), factors)

    return run


def floor(problem: Problem, device: str) -> tuple[float, float, float]:
    """Seconds of one batched forward+backward over the training data, of forming the per-example gradients
    [N, p] batch by batch, and of the final [M, p] × [p, N] score product (streamed by batch, as scoring does)."""
    module = problem.module
    start = time.perf_counter()
    for x, y in problem.train_loader(device):
        module.zero_grad()
        F.cross_entropy(module(x), y).backward()
    module.zero_grad()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    fwd_bwd = time.perf_counter() - start
    model = TwiceDifferentiable(module, F.cross_entropy)
    factors = torch.randn(len(problem.x_test), model.num_params, device=device)
    forming = product = 0.0
    with model.evaluating():
        start = time.perf_counter()
        for _, block in gradients(model, problem.train_loader(device), name="train"):
            middle = time.perf_counter()
            (factors @ block.T).sum().item()
            product += time.perf_counter() - middle
        forming = time.perf_counter() - start - product
    return fwd_bwd, forming, product


# -- peers ---------------------------------------------------------------------------------------------------
def pydvl(problem: Problem, device: str, name: str, **options: Any) -> Callable[[], Tensor]:
    def run() -> Tensor:
        from pydvl.influence import InfluenceMode
        from pydvl.influence.torch import influence_function_model as ifm

        cls = getattr(ifm, name)
        module = problem.module
        if name == "EkfacInfluence":
            model = cls(module, hessian_regularization=problem.regularization, **options)
        else:
            model = cls(module, F.cross_entropy, regularization=problem.regularization, **options)
        model = model.fit(problem.curvature_loader(device))
        # The factors once for all queries, then scores batch by batch (`influences` would solve again per batch).
        factors = model.influence_factors(problem.x_test.to(device), problem.y_test.to(device))
        blocks = []
        for x, y in problem.train_loader(device):
            blocks.append(model.influences_from_factors(factors, x, y, mode=InfluenceMode.Up).detach())
        return torch.cat(blocks, dim=1)

    return run


def captum_arnoldi(problem: Problem, device: str, rank: int) -> Callable[[], Tensor]:
    def run() -> Tensor:
        from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction
        from torch.utils.data import TensorDataset

        module = problem.module
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.pt")
            torch.save(module.state_dict(), path)

            def load(model: nn.Module, checkpoint: str) -> float:
                model.load_state_dict(torch.load(checkpoint))
                return 1.0

            train = TensorDataset(problem.x_train.to(device), problem.y_train.to(device))
            hessian_data = TensorDataset(
                problem.x_train[: problem.curvature_examples].to(device),
                problem.y_train[: problem.curvature_examples].to(device),
            )
            method = ArnoldiInfluenceFunction(
                module, train, path, load, loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=problem.batch_size,
                hessian_dataset=hessian_data, projection_dim=rank, hessian_reg=problem.regularization,
                sample_wise_grads_per_batch=True,
            )
            return method.influence((problem.x_test.to(device), problem.y_test.to(device))).detach()

    return run


def kronfluence_ekfac(problem: Problem, device: str, *, score_options: dict[str, Any] | None = None,
                      tracked_modules: list[str] | None = None, record: dict[str, Any] | None = None
                      ) -> Callable[[], Tensor]:
    """kronfluence's EK-FAC scores [M, N]. `score_options` go to its `ScoreArguments` (e.g.
    `query_gradient_low_rank`), `tracked_modules` to `Task.get_influence_tracked_modules` (None: every Linear and
    Conv2d). With `record`, the seconds of the factor fit ("fit_seconds") and of the scores ("score_seconds") go
    into it, and when it holds "self_influence": True the self-influence of every training example too."""
    def run() -> Tensor:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
        from torch.utils.data import TensorDataset

        class Classification(Task):
            def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
                x, y = batch
                logits = model(x)
                if sample:
                    with torch.no_grad():
                        y = torch.distributions.Categorical(logits=logits.detach()).sample()
                return F.cross_entropy(logits, y, reduction="sum")

            def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
                x, y = batch
                return F.cross_entropy(model(x), y, reduction="sum")

            def get_influence_tracked_modules(self) -> list[str] | None:
                return tracked_modules

        task = Classification()
        module = prepare_model(copy.deepcopy(problem.module), task)
        times = record if record is not None else {}
        score_args = ScoreArguments(damping_factor=problem.regularization, **(score_options or {}))
        train = TensorDataset(problem.x_train, problem.y_train)
        with tempfile.TemporaryDirectory() as folder:
            analyzer = Analyzer("bench", module, task, output_dir=folder, disable_tqdm=True, disable_model_save=True,
                                cpu=not device.startswith("cuda"))
            curvature = TensorDataset(problem.x_train[: problem.curvature_examples], problem.y_train[: problem.curvature_examples])
            start = time.perf_counter()
            analyzer.fit_all_factors("factors", curvature, factor_args=FactorArguments(strategy="ekfac"),
                                     per_device_batch_size=problem.batch_size, overwrite_output_dir=True)
            middle = time.perf_counter()
            analyzer.compute_pairwise_scores(
                "scores", "factors", TensorDataset(problem.x_test, problem.y_test), train,
                per_device_query_batch_size=len(problem.x_test), per_device_train_batch_size=problem.batch_size,
                overwrite_output_dir=True, score_args=score_args,
            )
            scores = analyzer.load_pairwise_scores("scores")["all_modules"].detach()
            times.update(fit_seconds=middle - start, score_seconds=time.perf_counter() - middle)
            if times.get("self_influence"):
                start = time.perf_counter()
                analyzer.compute_self_scores("self", "factors", train, per_device_train_batch_size=problem.batch_size,
                                             overwrite_output_dir=True, score_args=score_args)
                times.update(self_influence=analyzer.load_self_scores("self")["all_modules"].detach(),
                             self_seconds=time.perf_counter() - start)
            return scores

    return run


# -- the run -------------------------------------------------------------------------------------------------
def methods(problem: Problem, device: str, quick: bool, peers: bool) -> list[tuple[str, str, Callable[[], Tensor]]]:
    """(family, label, run) for every method; the family groups a method with its peers for the ratio.

    Our rows run each method with its defaults (rank 50 for the low-rank ones, rtol 1e-4 for cg as for pyDVL).
    On problem (a) further rows run the settings that were the defaults before issue 12, and arnoldi at full rank.
    On problem (b) LiSSA runs 100 steps for ours and pyDVL alike (each step multiplies 100 vectors by the Hessian
    of 1,000 examples; the defaults' 1,000 steps would take most of an hour on 2 cores). `--quick` leaves the CG
    and LiSSA rows out of problem (b).
    """
    rank = 50
    lissa_options: dict[str, Any] = {"maxiter": 100} if problem.name == "b" else {}
    lissa_label = "Chebyshev steps, maxiter 100" if lissa_options else "defaults: Chebyshev steps"
    ours_list = [
        ("cg", "ours cg (rtol 1e-4)", ours(problem, device, "cg", rtol=1e-4, maxiter=300)),
        ("lissa", f"ours lissa ({lissa_label})", ours(problem, device, "lissa", **lissa_options)),
        ("arnoldi", f"ours arnoldi (rank {rank}; defaults: complement=trace, refine=2, block_size=10)",
         ours(problem, device, "arnoldi", rank=rank)),
        ("ekfac", "ours ekfac (defaults: refine=2)", ours(problem, device, "ekfac")),
        ("nystroem", f"ours nystroem (rank {rank}; defaults: refine=2)", ours(problem, device, "nystroem", rank=rank)),
    ]
    if problem.name == "a":
        ours_list += [
            ("direct", "ours direct", ours(problem, device, "direct")),
            ("cg", "ours cg (defaults: rtol 1e-6)", ours(problem, device, "cg")),
            ("lissa", "ours lissa (before: stochastic series, maxiter 1000)",
             ours(problem, device, "lissa", acceleration="auto")),
            ("arnoldi", f"ours arnoldi (rank {rank}; before: complement=none, refine=0, one vector per pass)",
             ours(problem, device, "arnoldi", rank=rank, complement="none", refine=0, block_size=1)),
            ("arnoldi", "ours arnoldi (full rank 2,410, refine=0)", ours(problem, device, "arnoldi", rank=2410,
                                                                        refine=0)),
            ("ekfac", "ours ekfac (before: refine=0)", ours(problem, device, "ekfac", refine=0)),
            ("nystroem", f"ours nystroem (rank {rank}; before: refine=0)",
             ours(problem, device, "nystroem", rank=rank, refine=0)),
        ]
    if problem.name == "b" and quick:
        ours_list = [m for m in ours_list if m[0] not in ("cg", "lissa")]
    if not peers:
        return ours_list
    peer_list = [
        ("cg", "pyDVL CgInfluence (rtol 1e-4)", pydvl(problem, device, "CgInfluence", rtol=1e-4, maxiter=300,
                                                      solve_simultaneously=True)),
        ("lissa", f"pyDVL LissaInfluence ({lissa_label})", pydvl(problem, device, "LissaInfluence", **lissa_options)),
        ("arnoldi", f"pyDVL ArnoldiInfluence (rank {rank})", pydvl(problem, device, "ArnoldiInfluence", rank=rank)),
        ("arnoldi", f"captum ArnoldiInfluenceFunction (rank {rank})", captum_arnoldi(problem, device, rank)),
        ("ekfac", "pyDVL EkfacInfluence", pydvl(problem, device, "EkfacInfluence")),
        ("ekfac", "kronfluence ekfac", kronfluence_ekfac(problem, device)),
        ("nystroem", f"pyDVL NystroemSketchInfluence (rank {rank})", pydvl(problem, device, "NystroemSketchInfluence",
                                                                           rank=rank)),
    ]
    if problem.name == "b" and quick:
        peer_list = [m for m in peer_list if m[0] not in ("lissa", "cg")]
    return ours_list + peer_list


ONLY: list[str] | None = None
#: Rounds over the selected rows; each row reports its fastest round.
REPEAT = 1


def run_problem(problem: Problem, device: str, quick: bool, peers: bool) -> None:
    problem.module.to(device)
    print(f"\n### Problem ({problem.name}): p = {sum(p.numel() for p in problem.module.parameters()):,}, "
          f"N = {len(problem.x_train):,} (curvature on {problem.curvature_examples:,}), M = {len(problem.x_test)}, "
          f"λ = {problem.regularization:g}\n", flush=True)
    fwd_bwd, forming, product = floor(problem, device)
    if problem.name == "a":
        start = time.perf_counter()
        reference = exact_scores(problem)
        label = f"exact float64 reference ({time.perf_counter() - start:.1f} s)"
    else:
        start = time.perf_counter()
        reference = ours(problem, device, "cg", rtol=1e-5, maxiter=300)()
        label = f"our CG to rtol 1e-5 ({time.perf_counter() - start:.1f} s)"
    selected = [(family, name, fn) for family, name, fn in methods(problem, device, quick, peers)
                if not ONLY or any(word in name for word in ONLY)]
    best: dict[str, tuple[Tensor | None, float, int, str]] = {}
    for _ in range(REPEAT):  # rounds interleave the rows, so a busy spell of the machine hits them all alike
        for family, name, fn in selected:
            print(f"  running {name} ...", file=sys.stderr, flush=True)
            run = timed(device, fn)
            if name not in best or run[1] < best[name][1]:
                best[name] = run
    rows = []
    for family, name, _ in selected:
        scores, seconds, peak, error = best[name]
        accuracy = float("nan")
        if scores is not None:
            accuracy = pearson(scores, reference)
            if accuracy < 0 and not name.startswith("ours"):
                accuracy = -accuracy  # opposite sign convention
        rows.append((family, name, seconds, peak, accuracy, error))
    print(f"Floor: one batched forward+backward over the training data {fwd_bwd:.3f} s; per-example gradients "
          f"[N, p] formed batch by batch {forming:.3f} s; final score product [M, p] × [p, N] by batch "
          f"{product:.3f} s. Reference: {label}.\n")
    print("| method | wall time (s) | ratio to fastest peer | peak memory (MB) | accuracy (Pearson) | note |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for family, name, seconds, peak, accuracy, error in rows:
        peer_times = [r[2] for r in rows if r[0] == family and not r[1].startswith("ours") and not r[5]]
        ratio = f"{seconds / min(peer_times):.2f}" if peer_times and not error else "–"
        acc = f"{accuracy:.3f}" if accuracy == accuracy else "–"
        print(f"| {name} | {seconds:.2f} | {ratio} | {peak / 2**20:.0f} | {acc} | {error} |")
    sys.stdout.flush()


def memory_scaling(device: str, n: int) -> None:
    """Peak memory of our EK-FAC influence on problem (b) at N and 2N (curvature and scoring over all N), and at
    2N with a `max_memory` budget for the per-example gradient blocks."""
    print("\n### Peak memory of ours on problem (b) at N and 2N (EK-FAC, curvature and scores over all N)\n")
    print("| N | max_memory | wall time (s) | peak memory (MB) |")
    print("| ---: | ---: | ---: | ---: |")
    for size, budget in ((n, None), (2 * n, None), (2 * n, "128MB")):
        problem = synthetic_problem(n_train=size, curvature_examples=size, epochs=1)
        problem.module.to(device)
        _, seconds, peak, error = timed(device, ours(problem, device, "ekfac", max_memory=budget))
        print(f"| {size:,} | {budget or '–'} | {seconds:.2f} | {peak / 2**20:.0f} |{' ' + error if error else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="leave the CG and LiSSA rows out of problem (b)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--problems", nargs="+", default=["a", "b"])
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--only", nargs="+", default=None, help="run only methods whose label contains one of these")
    parser.add_argument("--no-scaling", action="store_true", help="skip the N / 2N memory runs")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over the rows, interleaved; best time kept")
    args = parser.parse_args()
    global ONLY, REPEAT
    ONLY, REPEAT = args.only, args.repeat
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch.cuda.is_available() is False.")
    hardware = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# lightning_influence benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    print(f"device {args.device} ({hardware}), {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}, quick={args.quick}")
    if "a" in args.problems:
        run_problem(digits_problem(), args.device, args.quick, not args.no_peers)
    if "b" in args.problems:
        n = 20_000
        problem = synthetic_problem(n_train=n, curvature_examples=1_000, epochs=1)
        run_problem(problem, args.device, args.quick, not args.no_peers)
        if not args.no_scaling:
            memory_scaling(args.device, n)


if __name__ == "__main__":
    main()
