"""The callback under a real two-process Trainer (CPU, gloo) gives the one-process numbers; refused strategies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lit_helpers import Classifier, blobs, make_trainer
from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_influence import IndexedData, InfluenceArguments, InfluenceCallback, TwiceDifferentiable, compute_influence
from lightning_influence.lightning.strategy import distribution_for
from lightning_influence.storage.result import InfluenceResult, parameter_digest

N_TRAIN, N_VAL, N_QUERIES, BATCH = 45, 7, 5, 8  # 45 examples: shards of 23 and 22; 5 queries: 3 and 2
METHODS = {"direct": {}, "cg": {"rtol": 1e-12}, "arnoldi": {"rank": 10}}
REGULARIZATION = 0.5  # H + λI positive definite after two epochs, so cg converges
SINGLE_REGULARIZATION = 5.0  # one example's Hessian of an MLP is indefinite: more damping keeps cg definite


def problem() -> tuple[TensorDataset, TensorDataset]:
    x, y = blobs(N_TRAIN)
    xv, yv = blobs(N_VAL, seed=1)
    return TensorDataset(x.double(), y), TensorDataset(xv.double(), yv)


def callbacks(root: Path) -> list[InfluenceCallback]:
    """One callback per method, and one with a single training example and a single query, so that rank 1
    holds an empty shard of both (cg: self-influence in lockstep with an empty rank)."""
    train, _ = problem()
    return [
        InfluenceCallback(method=method, method_kwargs=options, hessian_regularization=REGULARIZATION,
                          self_influence=True, num_queries=N_QUERIES, batch_size=BATCH, top_k=3,
                          save_dir=root / method)
        for method, options in METHODS.items()
    ] + [
        InfluenceCallback(method="cg", method_kwargs=METHODS["cg"], hessian_regularization=SINGLE_REGULARIZATION,
                          self_influence=True, num_queries=1, batch_size=BATCH, top_k=1,
                          training_data=Subset(train, [0]), save_dir=root / "single-example")
    ]


def assert_equals_one_process(module: pl.LightningModule, root: Path, train: TensorDataset, val: TensorDataset,
                              world_size: int) -> None:
    """Every method's stored two-process result equals the one-process pipeline on the same trained weights."""
    model = TwiceDifferentiable(module, F.cross_entropy)
    for method, options in METHODS.items():
        result = InfluenceResult.load(root / method / "result")
        assert result.metadata["world_size"] == world_size
        assert result.metadata["fingerprint"]["parameters"] == parameter_digest(model)  # the same weights
        arguments = InfluenceArguments(method=method, method_kwargs=options, hessian_regularization=REGULARIZATION,
                                       curvature="auto", self_influence=True, batch_size=N_TRAIN)  # one batch: fast
        assert result.metadata["choices"]["curvature"] in ("hessian", "ggn")  # the callback's default, "auto"
        reference = compute_influence(model, IndexedData(train), IndexedData(val), arguments,
                                      save_dir=root / f"one-process-{method}", query_indices=list(range(N_QUERIES)))
        assert result.train_indices.tolist() == list(range(N_TRAIN))  # each example once, in dataset order
        assert result.query_indices.tolist() == list(range(N_QUERIES))
        torch.testing.assert_close(result.factors, reference.factors, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(result.scores, reference.scores, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(result.self_influence, reference.self_influence, rtol=1e-7, atol=1e-10)
        assert not (root / method / "partial").exists()  # finished and cleaned up once
        assert (root / method / "report").is_dir()
    # Rank 1 had no training example and no query.
    single = InfluenceResult.load(root / "single-example" / "result")
    arguments = InfluenceArguments(method="cg", method_kwargs=METHODS["cg"], hessian_regularization=SINGLE_REGULARIZATION,
                                   curvature="auto", self_influence=True, batch_size=BATCH)
    reference = compute_influence(model, IndexedData(Subset(train, [0])), IndexedData(val), arguments,
                                  save_dir=root / "one-process-single", query_indices=[0])
    assert single.scores.shape == (1, 1) and single.train_indices.tolist() == [0]
    torch.testing.assert_close(single.scores, reference.scores, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(single.self_influence, reference.self_influence, rtol=1e-7, atol=1e-10)


def test_ddp_spawn_callback_equals_one_process(tmp_path):
    train, val = problem()
    module = Classifier(hidden=4).double()
    trainer = make_trainer(
        tmp_path, callbacks=callbacks(tmp_path), epochs=2, devices=2, strategy="ddp_spawn", logger=False
    )
    trainer.fit(module, DataLoader(train, batch_size=BATCH, shuffle=True), DataLoader(val, batch_size=BATCH))
    # ddp_spawn brings rank zero's trained weights back into this process's module.
    assert_equals_one_process(module, tmp_path, train, val, world_size=2)


DDP_SCRIPT = Path(__file__).with_name("ddp_script.py")


@pytest.mark.slow
def test_ddp_subprocess_launcher_callback_equals_one_process(tmp_path):
    """strategy='ddp' re-launches its script for the other rank, so the Trainer runs in a script of its own."""
    environment = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    environment["PYTHONPATH"] = os.pathsep.join([str(DDP_SCRIPT.parent), environment.get("PYTHONPATH", "")])
    completed = subprocess.run([sys.executable, str(DDP_SCRIPT), str(tmp_path)], env=environment,
                               capture_output=True, text=True, timeout=400)
    assert completed.returncode == 0, completed.stderr[-3000:]
    train, val = problem()
    module = Classifier(hidden=4).double()
    module.load_state_dict(torch.load(tmp_path / "weights.pt"))
    assert_equals_one_process(module, tmp_path, train, val, world_size=2)


def test_single_process_trainer_takes_the_plain_path():
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    distribution = distribution_for(trainer)
    assert distribution.world_size == 1 and distribution.group is None
    assert distribution.shard(range(5)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "strategy",
    [FSDPStrategy(), DeepSpeedStrategy.__new__(DeepSpeedStrategy), ModelParallelStrategy()],
    ids=["fsdp", "deepspeed", "model_parallel"],
)
def test_parameter_sharding_strategies_are_refused_before_training(strategy):
    trainer = SimpleNamespace(strategy=strategy, world_size=2)
    with pytest.raises(NotImplementedError, match=r"shards the model's parameters.*Supported:.*'ddp_spawn'"):
        distribution_for(trainer)
    with pytest.raises(NotImplementedError, match=type(strategy).__name__):
        InfluenceCallback(method="direct").setup(trainer, Classifier(), "fit")
