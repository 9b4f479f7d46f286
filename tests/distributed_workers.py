"""Process bodies for the two-process tests (module level so `torch.multiprocessing.spawn` can import them),
and a launcher that never waits forever."""

from __future__ import annotations

import datetime
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_influence import (
    DistributedReducer,
    IndexedData,
    InfluenceArguments,
    InfluenceEngine,
    TwiceDifferentiable,
    compute_influence_factors,
    fit_solver,
)
from lightning_influence.engine.distribution import Distribution, DistributedStageError
from lightning_influence.engine.scoring import stacked_gradients

#: (method, options) that every equality test runs; tolerances suit float64 on an 18-parameter model.
METHODS: list[tuple[str, dict[str, Any]]] = [
    ("direct", {}),
    ("cg", {"rtol": 1e-12}),
    ("arnoldi", {"rank": 8}),
    ("nystroem", {"rank": 4, "refine": 30}),  # refining makes passes in solve: processes solve in lockstep
]
REGULARIZATION = 0.01
LISSA = {"maxiter": 40, "rtol": 1e-30, "scale": 20.0}  # a fixed number of steps
BATCH = 8


def launch(body: Callable[..., None], args: tuple, world_size: int = 2, deadline_s: float = 120.0) -> None:
    """Run `body(rank, world_size, *args)` in `world_size` spawned processes; fail (and stop them) if any process
    fails or they are not all done within `deadline_s` — a hang is a failure, never a stuck test run."""
    context = mp.start_processes(body, args=(world_size, *args), nprocs=world_size, join=False, start_method="spawn")
    stop = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > stop:
                raise TimeoutError(f"{body.__name__} did not finish within {deadline_s} s: the processes hang.")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)


def _init(rank: int, world_size: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )


def problem(directory: Path) -> tuple[TensorDataset, TensorDataset, dict[str, torch.Tensor]]:
    """The training set, the query set and the trained weights saved by the test process."""
    saved = torch.load(directory / "problem.pt")
    return TensorDataset(saved["x"], saved["y"]), TensorDataset(saved["xq"], saved["yq"]), saved["state"]


def make_model(state: dict[str, torch.Tensor]) -> TwiceDifferentiable:
    from helpers import linear_model

    module = linear_model()
    module.load_state_dict(state)
    return TwiceDifferentiable(module, F.cross_entropy)


def shard_loader(dataset: TensorDataset, indices: list[int]) -> DataLoader:
    return DataLoader(Subset(dataset, indices), batch_size=BATCH, shuffle=False)


def functional_body(rank: int, world_size: int, init_file: str, directory: str) -> None:
    """Every case of the functional API under one two-process gloo group; each rank saves what it saw."""
    out = Path(directory)
    try:
        _init(rank, world_size, init_file)
        train, queries, state = problem(out)
        model = make_model(state)
        n, m = len(train), len(queries)
        distribution = Distribution.from_process_group(timeout=datetime.timedelta(seconds=30))
        results: dict[str, Any] = {"rank": distribution.rank, "world_size": distribution.world_size}
        # "strided": Distribution.shard (uneven: n is odd). "empty": this rank holds nothing.
        shards = {"strided": distribution.shard(range(n)), "empty": list(range(n)) if rank == 0 else []}
        for case, indices in shards.items():
            loader = shard_loader(train, indices)
            for method, options in METHODS:
                key = f"{case}/{method}"
                case_started = time.monotonic()
                # The plain functional API with the user's reducer: every rank passes all queries.
                plain = compute_influence_factors(
                    model, loader, DataLoader(queries, batch_size=BATCH), method,
                    hessian_perturbation=REGULARIZATION, reducer=DistributedReducer(), **options,
                )
                results[f"{key}/plain_factors"] = plain.x
                # The engine's path: each rank takes the gradients of its share of the queries.
                arguments = InfluenceArguments(method=method, method_kwargs=options,
                                               hessian_regularization=REGULARIZATION, batch_size=BATCH)
                engine = InfluenceEngine(model, loader, arguments, distribution=distribution)
                rhs = engine.query_gradients(IndexedData(queries), list(range(m)))
                factors = engine.factors(rhs)
                with distribution.stage("scoring"):
                    local = engine.scores(loader, factors.x)
                    self_local = engine.self_influences(loader)
                shard = torch.tensor(indices, dtype=torch.int64)
                scores, score_indices = distribution.gather_by_index(local, shard)
                self_influence, self_indices = distribution.gather_by_index(self_local, shard)
                results[f"{key}/factors"] = factors.x
                results[f"{key}/scores"] = scores
                results[f"{key}/indices"] = score_indices
                results[f"{key}/self"] = self_influence
                results[f"{key}/self_indices"] = self_indices
                results[f"{key}/N"] = engine.fit().operator.num_examples
                results[f"{key}/seconds"] = time.monotonic() - case_started
        # LiSSA steps on the union of the ranks' batches: with strided shards of batch 8 that union is the
        # one-process batch of 16 (examples 0-15, 16-31, 32-36), so the iterates match one process's exactly.
        lissa = fit_solver(
            model, shard_loader(train, shards["strided"]), "lissa", hessian_regularization=REGULARIZATION,
            reducer=distribution.reducer, **LISSA,
        )
        results["lissa/factors"] = lissa.solve(stacked_gradients(model, DataLoader(queries), name="queries")).x
        # LiSSA's "auto" acceleration is decided by all ranks together: one batch per rank is the full batch
        # (accelerated, as one process with one batch); 2 batches on rank 0 and 1 on rank 1 is not, on both.
        full_rhs = stacked_gradients(model, DataLoader(queries), name="queries")
        for name, batch in (("one_batch_each", 19), ("uneven_batches", 18)):
            loader = DataLoader(Subset(train, shards["strided"]), batch_size=batch)
            solver = fit_solver(model, loader, "lissa", hessian_regularization=REGULARIZATION,
                                reducer=distribution.reducer, maxiter=40, rtol=1e-30)
            results[f"lissa_{name}/factors"] = solver.solve(full_rhs).x
        # A failure outside collectives on rank 1 surfaces on both ranks at the end of the stage.
        try:
            with distribution.stage("scoring"):
                if rank == 1:
                    raise ValueError("a broken batch on rank 1")
            results["local_failure"] = "no error"
        except DistributedStageError as error:
            results["local_failure"] = str(error)
        try:
            if rank == 0:
                with distribution.stage("writing"):
                    raise OSError("disk full")
            else:
                distribution.barrier()
            results["barrier_failure"] = "no error"
        except DistributedStageError as error:
            results["barrier_failure"] = str(error)
        # A failure inside a collective stage: rank 1 breaks before its first Hessian product, rank 0 is left in
        # the all-reduce until the short timeout releases it; both then raise.
        short = Distribution.from_process_group(timeout=datetime.timedelta(seconds=3))
        started = time.monotonic()
        try:
            with short.stage("inversion"):
                if rank == 1:
                    raise RuntimeError("out of memory on rank 1")
                fit_solver(model, shard_loader(train, short.shard(range(n))), "cg", reducer=short.reducer).solve(
                    torch.ones(1, model.num_params, dtype=torch.float64)
                )
            results["collective_failure"] = "no error"
        except DistributedStageError as error:
            results["collective_failure"] = str(error)
        results["collective_failure_seconds"] = time.monotonic() - started
        control = distribution.control_group
        distribution.close()
        short.close()
        try:  # a destroyed group can no longer be used
            dist.get_rank(control)  # raises for a group that is no longer registered
            results["groups_destroyed"] = False
        except (ValueError, RuntimeError):
            results["groups_destroyed"] = distribution.owned_groups == ()
        torch.save(results, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    # The deliberately timed-out gloo group above can abort the process in gloo's C++ teardown ("terminate called
    # without an active exception") about one run in ten; the results are saved, so leave without that teardown.
    os._exit(0)


def store_body(rank: int, world_size: int, init_file: str, directory: str) -> None:
    """A stored run (`compute_influence` with store_gradients=True) under one two-process gloo group."""
    from lightning_influence import compute_influence

    out = Path(directory)
    try:
        _init(rank, world_size, init_file)
        train, queries, state = problem(out)
        arguments = InfluenceArguments(method="direct", hessian_regularization=REGULARIZATION, batch_size=BATCH,
                                       chunk_batches=1, store_gradients=True, store_dtype="float64")
        with Distribution.from_process_group(timeout=datetime.timedelta(seconds=30)) as distribution:
            compute_influence(make_model(state), IndexedData(train), IndexedData(queries), arguments,
                              save_dir=out / "run", distribution=distribution)
        dist.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
