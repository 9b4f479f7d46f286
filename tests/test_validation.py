"""`validate`: attribution scores judged by retraining through `pl.Trainer` (LDS, leave-one-out, noise ceiling).

The reference problem is binary L2-regularised logistic regression in float64, trained by full-batch L-BFGS
through a real Trainer to a gradient norm far below the effects measured: convex, so the exact (`direct`)
influence should predict retraining well and the two-seed ceiling is 1.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lit_helpers import Classifier, blobs, loaders, make_trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import (
    IndexedData,
    InfluenceArguments,
    InfluenceCallback,
    InfluenceResult,
    ResultMismatchError,
    TwiceDifferentiable,
    compute_influence,
    validate,
)
from lightning_influence.lightning.validation import Reinitialised, _pil_scatter, scatter_image
from lightning_influence.storage.validation import ranks, spearman, subset_positions

LAMBDA = 0.01
N, QUERIES = 80, 8
QUIET = {"max_epochs": 2, "accelerator": "cpu"}


class LogisticRegression(pl.LightningModule):
    """(1/|S|) Σ ℓᵢ + (λ/2)‖θ‖² on its training batch, by full-batch L-BFGS (one step = up to 100 iterations)."""

    def __init__(self, features: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 1).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).squeeze(-1)

    def loss_fn(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(outputs, targets)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return self.loss_fn(self(x), y) + LAMBDA / 2 * sum((p**2).sum() for p in self.parameters())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.LBFGS(self.parameters(), max_iter=100, tolerance_grad=1e-12, tolerance_change=0,
                                 line_search_fn="strong_wolfe")


def not_a_module() -> nn.Module:
    return nn.Linear(4, 1)


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """Training and query data, and the exact influence of the model trained on all of it (saved)."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(N + QUERIES, 4, generator=generator, dtype=torch.float64)
    y = torch.bernoulli(torch.sigmoid(x @ torch.tensor([1.5, -2.0, 0.5, 1.0], dtype=torch.float64) + 0.3),
                        generator=generator)
    train, queries = TensorDataset(x[:N], y[:N]), TensorDataset(x[N:], y[N:])
    pl.seed_everything(0, verbose=False)
    module = LogisticRegression()
    make_trainer(tmp_path_factory.mktemp("fit"), logger=False, **QUIET).fit(module, DataLoader(train, batch_size=N))
    folder = tmp_path_factory.mktemp("influence")
    compute_influence(TwiceDifferentiable(module, module.loss_fn), IndexedData(train), IndexedData(queries),
                      InfluenceArguments(method="direct", hessian_regularization=LAMBDA), save_dir=folder)
    return {"train": DataLoader(train, batch_size=N, shuffle=True), "queries": queries, "folder": folder}


def _validate(problem, scores, **options):
    return validate(scores, LogisticRegression, problem["train"], problem["queries"], trainer_kwargs=QUIET, **options)


def test_exact_influence_predicts_retraining(problem, tmp_path):
    """LOO Pearson ≥ 0.95, LDS ≥ 0.7 against ≈ 0 for random scores on the same retrainings, ceiling 1; the
    report lands in the result's metadata (saved back to its folder) and in the validation folder."""
    exact = InfluenceResult.load(problem["folder"])
    random_scores = torch.randn(exact.scores.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    report = _validate(problem, {"direct": problem["folder"], "random": random_scores}, num_subsets=20,
                       leave_one_out=3, leave_one_out_queries=2, save_dir=tmp_path)
    assert report.leave_one_out["direct"]["pearson"] >= 0.95, report.leave_one_out
    assert report.leave_one_out["direct"]["sign_agreement"] == 1.0
    assert report.lds["direct"] >= 0.7, report.lds
    assert abs(report.lds["random"]) < 0.3, report.lds
    assert report.ceiling > 0.99  # convex: every seed retrains to the same optimum
    assert len(report.leave_one_out_pairs) == 2 * 2 * 3
    assert report.retrainings["count"] == 20 * 2 + 1 + len({p["train_index"] for p in report.leave_one_out_pairs})
    saved = InfluenceResult.load(problem["folder"]).metadata["validation"]
    assert saved["lds"] == pytest.approx(report.lds) and saved["output"] == "loss"
    assert json.loads((tmp_path / "validation.json").read_text())["lds"] == pytest.approx(report.lds)
    assert (tmp_path / "scatter.png").stat().st_size > 0
    # Another output, judged on the same stored retrainings: nothing is retrained.
    margin = _validate(problem, {"direct": exact}, num_subsets=20, output="margin", save_dir=tmp_path)
    assert margin.retrainings["run_now"] == 0 and margin.lds["direct"] >= 0.7


def test_resumed_validation_equals_uninterrupted(problem, tmp_path):
    """An interrupted validation resumes (here in two worker processes) to exactly the uninterrupted numbers,
    and the same subset with the same seed retrains to bit-identical outcomes; the caller's random state is
    left alone."""
    scores = InfluenceResult.load(problem["folder"])
    options = dict(num_subsets=6, ceiling=False, leave_one_out=1, leave_one_out_queries=1)
    state = torch.random.get_rng_state()
    whole = _validate(problem, scores, save_dir=tmp_path / "whole", **options)
    assert torch.equal(torch.random.get_rng_state(), state)

    def interrupt(record):
        if len(list((tmp_path / "resumed" / "retrain").glob("*.json"))) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _validate(problem, scores, save_dir=tmp_path / "resumed", on_retrain=interrupt, **options)
    resumed = _validate(problem, scores, save_dir=tmp_path / "resumed", num_workers=2, **options)
    assert resumed.retrainings["run_now"] == whole.retrainings["count"] - 3
    assert resumed.lds == whole.lds and resumed.leave_one_out == whole.leave_one_out
    for path in sorted((tmp_path / "whole" / "retrain").glob("*.json")):
        first, second = (json.loads(p.read_text()) for p in (path, tmp_path / "resumed" / "retrain" / path.name))
        assert (first["seed"], first["indices"], first["loss"]) == (second["seed"], second["indices"], second["loss"])
    with pytest.raises(ResultMismatchError, match="fraction"):
        _validate(problem, scores, save_dir=tmp_path / "whole", num_subsets=6, fraction=0.3)


@pytest.mark.parametrize("options, error, message", [
    ({"fraction": 0.0}, ValueError, "strictly between 0 and 1"),
    ({"fraction": 1.0}, ValueError, "strictly between 0 and 1"),
    ({"num_subsets": 1}, ValueError, "num_subsets must be an integer ≥ 2"),
    ({"output": "accuracy"}, ValueError, "output must be 'loss' or 'margin'"),
    ({"module": not_a_module}, TypeError, "returned a Linear, not a LightningModule"),
    ({"scores": torch.zeros(QUERIES, N - 1)}, ValueError, r"shape \(8, 79\).*N=80"),
    ({"scores": torch.zeros(QUERIES, N), "query_indices": [0, 1]}, ValueError, r"shape \(8, 80\).*M=2"),
    ({"num_workers": 1, "loss_fn": lambda outputs, targets: outputs.sum()}, TypeError, "cannot be pickled"),
])
def test_bad_input_is_refused_before_any_retraining(problem, options, error, message):
    options = {"scores": torch.zeros(QUERIES, N), "module": LogisticRegression, **options}
    retrained = []
    with pytest.raises(error, match=message):
        validate(options.pop("scores"), options.pop("module"), problem["train"], problem["queries"],
                 trainer_kwargs=QUIET, on_retrain=retrained.append, **options)
    assert not retrained


def test_callback_validates_after_fit(tmp_path):
    """`InfluenceCallback(validate=...)` retrains re-initialised copies of the fitted module with the trainer's
    settings, and records the report in the result (in memory and on disk) and in TensorBoard."""
    with pytest.raises(ValueError, match="fraction must be"):
        InfluenceCallback(validate={"fraction": 2})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['scores'\]"):
        InfluenceCallback(validate={"scores": torch.zeros(2, 2)})
    pl.seed_everything(0, verbose=False)
    callback = InfluenceCallback(method="direct", hessian_regularization=0.5, num_queries=3, save_dir=tmp_path / "inf",
                                 validate={"num_subsets": 4, "ceiling": False, "output": "margin"})
    trainer = make_trainer(tmp_path, callbacks=[callback], epochs=2)
    x, y = blobs(24)
    trainer.fit(Classifier(), *loaders(x, y, *blobs(6, seed=1)))
    found = callback.result.metadata["validation"]
    assert found["output"] == "margin" and found["settings"]["num_subsets"] == 4
    assert found["settings"]["trainer_kwargs"]["max_epochs"] == 2
    assert set(found["lds"]) == {"direct"}
    assert InfluenceResult.load(tmp_path / "inf").metadata["validation"]["lds"] == found["lds"]
    assert len(list((tmp_path / "inf" / "validation" / "retrain").glob("*.json"))) == 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trainer.logger.log_dir)).Reload()
    assert "validation/lds/direct" in events.Tags()["scalars"]
    assert "validation/scatter" in events.Tags()["images"]


def test_statistics():
    """Average-tie ranks and Spearman as scipy computes them; subsets are seeded and of size round(αN)."""
    assert ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    generator = np.random.default_rng(0)
    a, b = generator.integers(0, 4, (30, 3)).astype(float), generator.normal(size=(30, 3))
    scipy_stats = pytest.importorskip("scipy.stats")
    expected = [scipy_stats.spearmanr(a[:, j], b[:, j]).statistic for j in range(3)]
    assert spearman(a, b) == pytest.approx(expected, abs=1e-12)
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))
    assert len(subset_positions(9, 0.5, seed=0, subset=0)) == 4
    assert (subset_positions(9, 0.5, 0, 1) == subset_positions(9, 0.5, 0, 1)).all()


def test_scatter_without_matplotlib_and_modules_that_cannot_be_reset(monkeypatch):
    points = (np.arange(5.0), np.arange(5.0) ** 2, "title", "x", "y")
    assert scatter_image(points).shape[-1] == 3
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # as if matplotlib were missing
    assert scatter_image(points).shape == _pil_scatter(points).shape == (400, 400, 3)

    class Scaled(LogisticRegression):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

    with pytest.raises(TypeError, match="no reset_parameters"):
        Reinitialised(Scaled())
