"""The callback's dry run when fitting starts: every configuration error is raised before the first training step,
naming what was passed; the data given to `trainer.fit` is found even without a `validation_step`; and IDs from
`index_fn` reach the report."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lit_helpers import Classifier, blobs, loaders, make_trainer
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence import InfluenceCallback


class Counting(Classifier):
    """A Classifier that counts its training steps."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return super().training_step(batch, batch_idx)


class NoValidationStep(pl.LightningModule):
    """Trains, but defines no validation_step (so Lightning sets up no validation dataloader)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        self.loss_fn = F.cross_entropy

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self.loss_fn(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root: Path, module: pl.LightningModule, *, validation: bool = True, **options) -> InfluenceCallback:
    callback = InfluenceCallback(**{"method": "direct", "hessian_regularization": 0.1, "curvature": "ggn",
                                    "top_k": 3, **options})
    train_loader, val_loader = loaders(*blobs(40), *blobs(6, seed=1))
    make_trainer(root, logger=False, callbacks=[callback], epochs=1).fit(
        module, train_loader, val_loader if validation else None)
    return callback


WRONG_WIDTH = TensorDataset(torch.randn(4, 7), torch.zeros(4, dtype=torch.long))
FLOAT_LABELS = TensorDataset(torch.randn(4, 5), torch.tensor([0.0, 1.0, 2.0, 1.0]))


@pytest.mark.parametrize("options, message", [
    (dict(query_data=WRONG_WIDTH), r"could not be applied to a batch with \(inputs, targets\) shapes \(\(4, 7\), "),
    (dict(training_data=WRONG_WIDTH), r"could not be applied to a batch with \(inputs, targets\) shapes \(\(4, 7\), "),
    (dict(query_data=FLOAT_LABELS), r"dtypes \('float32', 'float32'\): expected target dtype to be Long"),
    (dict(top_k=41), r"top_k=41 is larger than the number of training examples N=40 of training_data \(the "
                     r"trainer's training data\); pass top_k ≤ 40"),
    (dict(query_indices=[2, 25]), r"query_indices must be integers in \[0, 6\): they are positions in query_data "
                                  r"\(the trainer's validation data\), a TensorDataset of 6 examples; got \[25\]"),
    (dict(params="head.*"), r"params \['head.\*'\] match no trainable parameter"),
    (dict(index_fn=lambda position: 1 / 0), "index_fn failed on a position of training_data"),
])
def test_configuration_errors_are_raised_before_the_first_training_step(tmp_path, options, message):
    module = Counting()
    with pytest.raises(ValueError, match=message):
        _fit(tmp_path, module, **options)
    assert module.steps == 0


def test_without_validation_data_the_message_says_what_to_pass(tmp_path):
    module = Counting()
    with pytest.raises(ValueError, match=r"Found no validation data to take the queries from: trainer.fit got no "
                                         r"val_dataloaders.*Pass InfluenceCallback\(query_data=...\)"):
        _fit(tmp_path, module, validation=False)
    assert module.steps == 0


def test_queries_from_a_val_loader_without_validation_step_clamped_and_ids_in_the_report(tmp_path):
    with pytest.warns(UserWarning, match=r"num_queries=50 is more than the 6 examples of query_data \(the trainer's "
                                         r"validation data\); the influence computation uses all 6 of them"):
        callback = _fit(tmp_path, NoValidationStep(), num_queries=50, index_fn=lambda position: f"row-{position}")
    assert callback.result.query_indices.tolist() == list(range(6))
    report = tmp_path / "influence" / "version_0" / "report"
    rows = (report / "top_influence.csv").read_text().splitlines()
    assert rows[0] == ("query,query_index,query_label,kind,rank,train_index,train_id,train_label,score,"
                       "train_prediction,suspect_label,train_loss,query_prediction,query_loss")
    assert all(cells[6] == f"row-{cells[5]}" for cells in (row.split(",") for row in rows[1:]))
    assert re.search(r"^\| helpful \| 1 \| (\d+) \| row-\1 \|", (report / "influence.md").read_text(), flags=re.M)
