"""The callback hands the report its model and `describe`: predictions, losses and suspect marks of the trained
module, and descriptions from a callable named by its dotted path (as a LightningCLI config would)."""

from __future__ import annotations

from pathlib import Path

from lit_helpers import Classifier, blobs, loaders, make_trainer

from lightning_influence import InfluenceCallback
from lightning_influence.reports import ExampleStore


def first_feature(x) -> str:
    """A module-level `describe`, importable by its dotted path."""
    return f"first feature {float(x[0]):+.2f}"


def test_the_callback_reports_predictions_and_descriptions(tmp_path):
    x, y = blobs(40)
    train_loader, val_loader = loaders(x, y, *blobs(6, seed=1))
    callback = InfluenceCallback(method="direct", hessian_regularization=0.3, num_queries=2, top_k=3,
                                 describe="test_report_callback.first_feature")
    trainer = make_trainer(tmp_path, callbacks=[callback], epochs=2)
    module = Classifier()
    trainer.fit(module, train_loader, val_loader)
    store = ExampleStore(Path(trainer.log_dir) / "influence" / "report" / "examples")
    predicted = module.eval()(x).argmax(1)
    assert store.train.predictions is not None
    assert [store.train.example(i).prediction for i in range(40)] == [str(int(p)) for p in predicted]
    assert [store.train.example(i).suspect for i in range(40)] == (predicted != y).tolist()
    assert store.train.example(7).description == first_feature(x[7])
    assert store.query.example(1).loss > 0
