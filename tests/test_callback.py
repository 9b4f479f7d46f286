"""InfluenceCallback through a real Trainer: TensorBoard event files read back, other loggers, dict batches,
parameter subsets, dropout/BatchNorm, shuffled loaders, on-demand computation, failures and bad input."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lit_helpers import Classifier, DictDataset, blobs, loaders, make_trainer, tiny_images
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_influence import (
    ConvergenceError,
    InfluenceCallback,
    InfluenceResult,
    TwiceDifferentiable,
    compute_influence_factors,
    compute_influences_up,
)

LAMBDA = 0.05


def functional_scores(module, train_set, query_set, params=None, batch_size=64):
    """The same influence by the functional API, on sequential loaders in dataset order."""
    model = TwiceDifferentiable(module, F.cross_entropy, params=params)
    train = DataLoader(train_set, batch_size=batch_size)
    factors = compute_influence_factors(model, train, DataLoader(query_set, batch_size=batch_size), "direct",
                                        hessian_perturbation=LAMBDA)
    return compute_influences_up(model, train, factors)


def events(log_dir: str) -> EventAccumulator:
    accumulator = EventAccumulator(log_dir, size_guidance={"tensors": 0, "images": 0, "histograms": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def table_indices(markdown: str, kind: str) -> list[int]:
    return [int(m) for m in re.findall(rf"^\| {kind} \| \d+ \| (\d+) \|", markdown, flags=re.M)]


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """Images, a shuffled training loader, TensorBoard, self-influence; trained once for several tests."""
    root = tmp_path_factory.mktemp("image_run")
    x, y = tiny_images(80)
    x_val, y_val = tiny_images(12, seed=1)
    train_loader, val_loader = loaders(x, y, x_val, y_val, shuffle=True)
    callback = InfluenceCallback(method="direct", hessian_regularization=LAMBDA, num_queries=3, top_k=4,
                                 self_influence=True, batch_size=32)
    module = Classifier(features=36, classes=2, flatten=True)
    trainer = make_trainer(root, callbacks=[callback])
    trainer.fit(module, train_loader, val_loader)
    return trainer, module, callback, TensorDataset(x, y), TensorDataset(x_val[:3], y_val[:3])


def test_tensorboard_tables_name_the_functional_api_top_indices(image_run):
    trainer, module, callback, train_set, query_set = image_run
    result = callback.result
    assert result.train_indices.tolist() == list(range(80))  # dataset order, not the shuffled loader's
    assert result.query_indices.tolist() == [0, 1, 2]
    expected = functional_scores(module, train_set, query_set)
    torch.testing.assert_close(result.scores, expected, rtol=1e-5, atol=1e-7)

    accumulator = events(trainer.logger.log_dir)
    for query in range(3):
        (event,) = accumulator.Tensors(f"influence/text/query_{query:03d}/text_summary")
        markdown = event.tensor_proto.string_val[0].decode()
        top = expected[query].topk(4)
        helpful = [int(i) for i, s in zip(top.indices, top.values) if s > 0]
        bottom = expected[query].topk(4, largest=False)
        harmful = [int(i) for i, s in zip(bottom.indices, bottom.values) if s < 0]
        assert helpful and table_indices(markdown, "helpful") == helpful
        assert table_indices(markdown, "harmful") == harmful
        labels = re.findall(r"^\| helpful \| \d+ \| (\d+) \| (\d+) \|", markdown, flags=re.M)
        assert all(int(label) == int(train_set[int(i)][1]) for i, label in labels)
    (event,) = accumulator.Tensors("influence/text/self_influence/text_summary")
    self_markdown = event.tensor_proto.string_val[0].decode()
    ranked = [int(m) for m in re.findall(r"^\| \d+ \| (\d+) \|", self_markdown, flags=re.M)]
    assert ranked == result.self_influence.topk(4).indices.tolist()


def test_tensorboard_images_histograms_and_scalars(image_run):
    trainer, _, callback, _, _ = image_run
    tags = events(trainer.logger.log_dir).Tags()
    assert tags["images"] == [f"influence/images/query_{q:03d}" for q in range(3)] + ["influence/images/self_influence"]
    assert {"influence/histograms/scores", "influence/histograms/self_influence"} <= set(tags["histograms"])
    assert {"influence/total_seconds", "influence/num_train", "influence/self_influence_max"} <= set(tags["scalars"])
    assert {"train_loss", "val_loss"} <= set(tags["scalars"])  # training's own logs are still there
    accumulator = events(trainer.logger.log_dir)
    (image,) = accumulator.Images("influence/images/query_000")
    assert image.width == 600  # sized for TensorBoard's image cards (reports/images.py)


def test_files_on_disk_beside_the_tensors(image_run):
    trainer, _, callback, _, _ = image_run
    folder = Path(trainer.log_dir) / "influence"
    loaded = InfluenceResult.load(folder / "result")
    assert torch.equal(loaded.scores, callback.result.scores)
    assert torch.equal(loaded.self_influence, callback.result.self_influence)
    report = folder / "report"
    assert sorted(p.name for p in report.glob("*.png")) == ["query_000.png", "query_001.png", "query_002.png",
                                                             "self_influence.png"]
    rows = (report / "top_influence.csv").read_text().splitlines()
    assert rows[0].startswith("query,query_index,query_label,kind,rank,train_index,train_label,score,")
    first_helpful = [r for r in rows[1:] if r.startswith("0,0,") and ",helpful,1," in r][0]
    assert int(first_helpful.split(",")[5]) == loaded.top_helpful(0, 1).indices.item()
    assert "Highest self-influence" in (report / "influence.md").read_text()


def test_several_loggers_dict_batches_and_a_parameter_subset(tmp_path):
    x, y = blobs(64)
    x_val, y_val = blobs(10, seed=1)
    train_set, val_set = DictDataset(x, y), DictDataset(x_val, y_val)
    callback = InfluenceCallback(method="direct", hessian_regularization=LAMBDA, params="net.2.*", query_indices=[4, 1],
                                 top_k=3)
    tensorboard = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    csv = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    trainer = make_trainer(tmp_path, logger=[tensorboard, csv], callbacks=[callback], epochs=2)
    module = Classifier()
    trainer.fit(module, DataLoader(train_set, batch_size=16, shuffle=True), DataLoader(val_set, batch_size=16))
    result = callback.result
    assert result.metadata["parameter_names"] == ["net.2.weight", "net.2.bias"]
    assert result.factors.shape == (2, 8 * 3 + 3)
    assert result.query_indices.tolist() == [4, 1]
    queries = torch.utils.data.Subset(val_set, [4, 1])
    expected = functional_scores(module, train_set, queries, params=["net.2.weight", "net.2.bias"])
    torch.testing.assert_close(result.scores, expected, rtol=1e-5, atol=1e-7)
    metrics = (Path(csv.log_dir) / "metrics.csv").read_text()
    assert "influence/total_seconds" in metrics.splitlines()[0] and "train_loss" in metrics.splitlines()[0]
    assert "influence/text/query_000/text_summary" in events(tensorboard.log_dir).Tags()["tensors"]
    assert events(tensorboard.log_dir).Tags()["images"] == []  # feature vectors are not images
    assert (Path(tensorboard.log_dir) / "influence" / "report" / "influence.md").is_file()


def test_without_logger_on_demand_and_rerun(tmp_path):
    x, y = blobs(48)
    train_loader, val_loader = loaders(x, y, *blobs(8, seed=1))
    callback = InfluenceCallback(method="direct", hessian_regularization=LAMBDA, compute_on_fit_end=False, top_k=2)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[callback], epochs=1)
    module = Classifier()
    trainer.fit(module, train_loader, val_loader)
    assert callback.result is None
    result = callback.compute(trainer, module)
    assert result.scores.shape == (8, 48)
    assert (tmp_path / "influence" / "version_0" / "result" / "metadata.json").is_file()
    assert (tmp_path / "influence" / "version_0" / "report" / "top_influence.csv").is_file()
    again = callback.compute(trainer, module)  # same weights and arguments: the stored result is reused
    assert torch.equal(again.scores, result.scores) and again.metadata == result.metadata


def test_dropout_and_batchnorm_modes_and_state_are_restored(tmp_path):
    x, y = blobs(64)
    train_loader, val_loader = loaders(x, y, *blobs(8, seed=1))
    callback = InfluenceCallback(method="direct", hessian_regularization=LAMBDA, curvature="hessian",
                                 compute_on_fit_end=False, save_dir=tmp_path / "first")
    module = Classifier(dropout=0.5, batchnorm=True)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[callback], epochs=2)
    trainer.fit(module, train_loader, val_loader)
    module.train()
    module.net[1].eval()  # a mixed state, as a user might leave it
    modes = [m.training for m in module.modules()]
    state = {k: v.clone() for k, v in module.state_dict().items()}
    rng = torch.get_rng_state()
    first = callback.compute(trainer, module)
    assert [m.training for m in module.modules()] == modes
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())  # BatchNorm statistics too
    assert torch.equal(torch.get_rng_state(), rng)
    # eval mode during the computation: dropout off, so it is deterministic and matches the functional API
    second = InfluenceCallback(method="direct", hessian_regularization=LAMBDA, curvature="hessian",
                               compute_on_fit_end=False, save_dir=tmp_path / "second").compute(trainer, module)
    assert torch.equal(first.scores, second.scores)
    expected = functional_scores(module, train_loader.dataset, torch.utils.data.Subset(val_loader.dataset, range(8)))
    torch.testing.assert_close(first.scores, expected, rtol=1e-5, atol=1e-7)


def test_on_error_warn_keeps_checkpoints_and_logs(tmp_path):
    x, y = blobs(32)
    train_loader, val_loader = loaders(x, y, *blobs(8, seed=1))

    def broken_loss(outputs, targets):
        raise RuntimeError("loss exploded")

    callback = InfluenceCallback(loss_fn=broken_loss, on_error="warn")
    trainer = make_trainer(tmp_path, callbacks=[callback], epochs=1, enable_checkpointing=True)
    with pytest.warns(RuntimeWarning, match="influence computation failed its dry run.*loss exploded.*unaffected"):
        trainer.fit(Classifier(), train_loader, val_loader)
    assert callback.result is None and trainer.global_step > 0  # trained all the same
    assert list(Path(trainer.log_dir).glob("checkpoints/*.ckpt"))
    assert "train_loss" in events(trainer.log_dir).Tags()["scalars"]
    assert trainer.state.finished

    # a failure no dry run can foresee (cg stopping short, refused by on_unconverged="raise") comes after training,
    # whose checkpoints stay
    raising = InfluenceCallback(method="cg", method_kwargs={"maxiter": 1}, hessian_regularization=LAMBDA,
                                on_unconverged="raise", on_error="raise")
    trainer = make_trainer(tmp_path / "raise", callbacks=[raising], epochs=1, enable_checkpointing=True)
    with pytest.raises(ConvergenceError, match="influence factors did not converge"):
        trainer.fit(Classifier(), train_loader, val_loader)
    assert list(Path(trainer.log_dir).glob("checkpoints/*.ckpt"))


class _Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(5), 0


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(method="newton"), ValueError, "Unknown inversion method 'newton'"),
        (dict(method="cg", method_kwargs={"rank": 3}), TypeError, r"Unknown option\(s\) \['rank'\]"),
        (dict(method_kwargs=[("rtol", 1)]), TypeError, "method_kwargs must be a dict"),
        (dict(hessian_regularization=-1.0), ValueError, "hessian_regularization must be finite and ≥ 0"),
        (dict(influence_type="down"), ValueError, "Unknown influence type 'down'"),
        (dict(top_k=0), ValueError, "top_k must be a positive integer"),
        (dict(batch_size=2.5), ValueError, "batch_size must be a positive integer"),
        (dict(num_queries=0), ValueError, "num_queries must be a positive integer"),
        (dict(query_indices=[1, -2]), ValueError, "query_indices must be a non-empty list"),
        (dict(on_error="ignore"), ValueError, r"on_error must be one of \['raise', 'warn'\]"),
        (dict(on_unconverged="skip"), ValueError, r"on_unconverged must be one of \['raise', 'warn', 'ignore'\]"),
        (dict(index_fn=3), TypeError, "index_fn must be callable"),
        (dict(self_influence="yes"), TypeError, "self_influence must be True or False"),
        (dict(progress=1), TypeError, "progress must be True, False or None"),
        (dict(params=[1]), TypeError, "params must be a name"),
        (dict(loss_fn="no_such_loss"), ValueError, "not a function of torch.nn.functional"),
        (dict(loss_fn=3), TypeError, "loss_fn must be callable"),
        (dict(training_data=_Stream()), TypeError, "IterableDataset"),
        (dict(query_data=torch.zeros(0, 5)), ValueError, "query_data is empty"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        InfluenceCallback(**kwargs)


def test_save_dir_that_is_a_file_fails_at_construction(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        InfluenceCallback(save_dir=tmp_path / "file")


def test_loss_fn_by_name_and_cli_friendly_arguments():
    callback = InfluenceCallback(loss_fn="cross_entropy", method="ARNOLDI", method_kwargs={"rank": 3},
                                 influence_type="perturbation", params=["net.*"])
    assert callback.loss_fn is F.cross_entropy and callback.arguments.method.value == "arnoldi"
    assert callback.arguments.influence_type.value == "perturbation"
    assert InfluenceCallback(loss_fn="torch.nn.functional.nll_loss").loss_fn is F.nll_loss


class _NoForward(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(5, 3)
        self.loss_fn = F.cross_entropy


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fitted")
    x, y = blobs(40)
    train_loader, val_loader = loaders(x, y, *blobs(8, seed=1))
    trainer = make_trainer(root, logger=False, epochs=1)
    module = Classifier()
    trainer.fit(module, train_loader, val_loader)
    return trainer, module, root


def _compute(fitted_run, module=None, **kwargs):
    trainer, trained, root = fitted_run
    options = dict(method="direct", hessian_regularization=LAMBDA, compute_on_fit_end=False)
    options.update(kwargs)
    return InfluenceCallback(**options).compute(trainer, module if module is not None else trained)


class _Unbatchable(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.zeros(5)


def test_bad_input_at_compute_time_is_named(fitted_run, tmp_path):
    with pytest.raises(TypeError, match="does not define forward"):
        _compute(fitted_run, module=_NoForward(), save_dir=tmp_path / "a")
    no_loss = Classifier()
    del no_loss.loss_fn
    with pytest.raises(AttributeError, match="no callable `loss_fn` or `criterion`"):
        _compute(fitted_run, module=no_loss, save_dir=tmp_path / "b")
    with pytest.raises(ValueError, match="Cannot split a batch of type Tensor"):
        _compute(fitted_run, training_data=_Unbatchable(), save_dir=tmp_path / "c")
    wrong_width = TensorDataset(torch.zeros(4, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"could not be applied to a batch with \(inputs, targets\) shapes"):
        _compute(fitted_run, query_data=wrong_width, save_dir=tmp_path / "d")
    with pytest.raises(ValueError, match="top_k=41 is larger than the number of training examples N=40"):
        _compute(fitted_run, top_k=41, save_dir=tmp_path / "e")
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match="cannot be written"):
        _compute(fitted_run, save_dir=tmp_path / "file" / "inside")
    with pytest.raises(ValueError, match=r"query_indices must be integers in \[0, 8\)"):
        _compute(fitted_run, query_indices=[3, 9], save_dir=tmp_path / "f")
    with pytest.raises(ValueError, match="batch_transform failed on a batch of query_data"):
        _compute(fitted_run, batch_transform=lambda batch: batch["x"], save_dir=tmp_path / "g")


def test_batch_transform_maps_other_batch_shapes(fitted_run, tmp_path):
    trainer, module, _ = fitted_run
    train_set = trainer.train_dataloader.dataset
    nest = lambda dataset: [((x,), {"label": y}) for x, y in dataset]  # noqa: E731
    # the hook applies to every batch: training and query data alike
    result = _compute(fitted_run, training_data=nest(train_set), query_data=nest(trainer.val_dataloaders.dataset),
                      batch_transform=lambda b: (b[0][0], b[1]["label"]), save_dir=tmp_path)
    plain = _compute(fitted_run, save_dir=tmp_path / "plain")
    torch.testing.assert_close(result.scores, plain.scores, rtol=0, atol=0)


def test_configured_from_a_lightning_cli_yaml(tmp_path):
    from pytorch_lightning.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  accelerator: cpu\n  max_epochs: 1\n  logger: false\n  enable_checkpointing: false\n"
        f"  default_root_dir: {tmp_path}\n"
        "  callbacks:\n"
        "    - class_path: lightning_influence.InfluenceCallback\n"
        "      init_args:\n"
        "        loss_fn: cross_entropy\n        method: arnoldi\n        method_kwargs: {rank: 3, refine: 2, complement: trace}\n"
        "        hessian_regularization: 0.1\n        num_queries: 2\n        params: ['net.*']\n"
        "        self_influence: true\n        on_error: warn\n        top_k: 2\n"
        "        curvature: ggn\n        block_diagonal: true\n        max_memory: 1MB\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = LightningCLI(Classifier, run=False, args=["--config", str(config)], save_config_callback=None)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, InfluenceCallback)]
    arguments = callback.arguments
    assert callback.loss_fn is F.cross_entropy and arguments.method.value == "arnoldi"
    assert {k: arguments.method_kwargs[k] for k in ("rank", "refine", "complement")} == {
        "rank": 3, "refine": 2, "complement": "trace"}
    assert callback.params == ["net.*"]
    assert (arguments.hessian_regularization, callback.num_queries, arguments.self_influence) == (0.1, 2, True)
    x, y = blobs(32)
    cli.trainer.fit(cli.model, *loaders(x, y, *blobs(6, seed=1)))
    assert callback.result.scores.shape == (2, 32) and callback.result.self_influence.shape == (32,)
    metadata = callback.result.metadata
    assert metadata["method_kwargs"]["rank"] == 3 and metadata["method_kwargs"]["refine"] == 2
    assert metadata["convergence"]["refine_iterations"] == 2
    assert (metadata["curvature"], metadata["block_diagonal"], metadata["max_memory"]) == ("ggn", True, 10**6)


def test_lightning_cli_saved_config_reruns_as_it_is(tmp_path):
    """LightningCLI's own saved config.yaml re-runs to the same callback settings and saves the same config again:
    loss_fn by name (not 'Unable to serialize instance ...'), hessian_regularization: auto, sizes, globs, options."""
    import inspect

    import yaml
    from pytorch_lightning.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  accelerator: cpu\n  max_epochs: 1\n  enable_checkpointing: false\n  enable_progress_bar: false\n"
        f"  enable_model_summary: false\n  num_sanity_val_steps: 0\n  default_root_dir: {tmp_path}\n"
        f"  logger:\n    class_path: pytorch_lightning.loggers.CSVLogger\n    init_args: {{save_dir: {tmp_path}}}\n"
        "  callbacks:\n"
        "    - class_path: lightning_influence.InfluenceCallback\n"
        "      init_args:\n"
        "        loss_fn: cross_entropy\n        hessian_regularization: auto\n        max_memory: 2GB\n"
        "        params: ['net.*']\n        method: arnoldi\n        method_kwargs: {rank: 3}\n"
        "        on_error: warn\n        num_queries: 2\n        top_k: 2\n"
    )
    data = loaders(*blobs(32), *blobs(6, seed=1))

    def run(path: Path) -> tuple[dict, Path]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cli = LightningCLI(Classifier, run=False, args=["--config", str(path)])
            (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, InfluenceCallback)]
            cli.trainer.fit(cli.model, *data)
        assert callback.result is not None and callback.result.scores.shape == (2, 32)  # computed, not warned away
        settings = {k: v for k, v in vars(callback).items() if k != "result" and not k.startswith("_")
                    and not inspect.ismethod(v)}
        return settings, Path(cli.trainer.log_dir) / "config.yaml"

    first, saved = run(config)  # SaveConfigCallback writes <log_dir>/config.yaml
    text = saved.read_text()
    assert "Unable to serialize" not in text
    assert "loss_fn: cross_entropy" in text and "hessian_regularization: auto" in text and "max_memory: 2GB" in text
    assert first["loss_fn"] is F.cross_entropy
    second, saved_again = run(saved)  # re-run the saved file as it is
    assert saved_again != saved and second == first
    assert yaml.safe_load(saved_again.read_text()) == yaml.safe_load(text)


def test_loss_classes_are_instantiated_and_unsaveable_losses_named():
    assert isinstance(InfluenceCallback(loss_fn="torch.nn.CrossEntropyLoss").loss_fn, torch.nn.CrossEntropyLoss)
    with pytest.raises(ValueError, match="cannot be imported by name .*a lambda"):
        InfluenceCallback(loss_fn="Unable to serialize instance <function <lambda> at 0x7f>")

