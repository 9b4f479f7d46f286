"""Where the callback saves a run (one folder per run, never inside another tool's store), how a finished result
is found again, and the callback's Lightning conventions."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
from lit_helpers import Classifier, blobs, loaders, make_trainer
from pytorch_lightning.loggers import CSVLogger, Logger

from lightning_influence import InfluenceArguments, InfluenceCallback, InfluenceResult


def _fit(root: Path, *, seed: int, logger=False, **options) -> tuple[pl.Trainer, InfluenceCallback]:
    pl.seed_everything(seed, verbose=False)
    callback = InfluenceCallback(method="direct", hessian_regularization=0.1, curvature="ggn", num_queries=2,
                                 **options)
    trainer = make_trainer(root, logger=logger, callbacks=[callback], epochs=1)
    x, y = blobs(24, seed=seed)
    trainer.fit(Classifier(), *loaders(x, y, *blobs(6, seed=seed + 1)))
    return trainer, callback


class StoreLogger(Logger):
    """A logger that keeps its own store (as MLflow's `mlruns/` or W&B's folder), with no text or images."""

    def __init__(self, store: Path) -> None:
        super().__init__()
        self.store = store

    @property
    def name(self) -> str:
        return "store"

    @property
    def version(self) -> int:
        return 0

    @property
    def save_dir(self) -> str:
        return str(self.store)

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_without_a_logger_each_run_gets_a_version_folder(tmp_path):
    _fit(tmp_path, seed=0)
    first = tmp_path / "influence" / "version_0"
    assert InfluenceResult.load(first).num_queries == 2
    with pytest.warns(RuntimeWarning, match=r"different run.*goes to .*version_1"):
        _fit(tmp_path, seed=1)  # other weights: the first result stays as it was
    assert InfluenceResult.load(tmp_path / "influence" / "version_1").num_queries == 2
    assert InfluenceResult.load(first).metadata["fingerprint"] != InfluenceResult.load(
        tmp_path / "influence" / "version_1").metadata["fingerprint"]


def test_the_same_run_is_found_again_in_its_folder(tmp_path):
    trainer, callback = _fit(tmp_path, seed=0)
    first = callback.result
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "different run" warning
        again = callback.compute(trainer, trainer.lightning_module)
    assert again.metadata["timings"] == first.metadata["timings"]  # loaded, not recomputed
    assert not (tmp_path / "influence" / "version_1").exists()


def test_a_logger_with_its_own_store_is_left_alone(tmp_path):
    store = tmp_path / "mlruns"
    _fit(tmp_path, seed=0, logger=StoreLogger(store))
    assert not (store / "influence").exists()
    assert InfluenceResult.load(tmp_path / "influence" / "version_0").num_train == 24


def test_a_csv_logger_gets_the_result_in_its_versioned_log_dir(tmp_path):
    trainer, _ = _fit(tmp_path, seed=0, logger=CSVLogger(tmp_path, name="csv"))
    assert Path(trainer.log_dir).name == "version_0"
    assert InfluenceResult.load(Path(trainer.log_dir) / "influence").num_train == 24


def test_a_given_save_dir_taken_by_another_run_gets_a_sibling(tmp_path):
    _fit(tmp_path, seed=0, save_dir=tmp_path / "mine")
    with pytest.warns(RuntimeWarning, match="different run"):
        _fit(tmp_path, seed=1, save_dir=tmp_path / "mine")
    assert InfluenceResult.load(tmp_path / "mine_1").num_train == 24


def test_result_loads_from_the_save_dir_and_from_its_result_folder(tmp_path):
    _, callback = _fit(tmp_path, seed=0, save_dir=tmp_path / "run")
    for folder in (tmp_path / "run", tmp_path / "run" / "result"):
        assert InfluenceResult.load(folder).scores.equal(callback.result.scores)
    with pytest.raises(FileNotFoundError, match="No complete influence result"):
        InfluenceResult.load(tmp_path)


def test_arguments_are_checked_once_at_construction_and_frozen():
    callback = InfluenceCallback(method="arnoldi", method_kwargs={"rank": 4}, hessian_regularization="auto")
    arguments = callback.arguments
    assert isinstance(arguments, InfluenceArguments) and arguments.hessian_regularization == "auto"
    assert arguments.method_kwargs["rank"] == 4 and "complement" in arguments.method_kwargs  # defaults filled
    with pytest.raises(AttributeError):
        arguments.method = "cg"  # type: ignore[misc]
    assert InfluenceArguments(**{**arguments.to_dict(), "method": "arnoldi"}).to_dict() == arguments.to_dict()
    with pytest.raises(TypeError, match="Unknown option"):
        InfluenceArguments(method="cg", method_kwargs={"rank": 3})
    with pytest.raises(ValueError, match="chunk_batches must be a positive integer"):
        InfluenceArguments(chunk_batches=0)
    with pytest.raises(TypeError, match="block_diagonal must be True or False"):
        InfluenceArguments(block_diagonal="yes")


def test_state_key_tells_two_callbacks_apart():
    first = InfluenceCallback(method="direct", save_dir="a")
    second = InfluenceCallback(method="cg", save_dir="b")
    assert first.state_key != second.state_key and first.state_key.startswith("InfluenceCallback")
