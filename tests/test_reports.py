"""Reports: tables, grids and per-example facts on disk, each logger getting what it supports without ever failing
the run, and every promised tag visible through TensorBoard's own data providers."""

from __future__ import annotations

import csv
import io
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import ConcatDataset, Subset, TensorDataset

from lightning_influence import InfluenceResult, TwiceDifferentiable
from lightning_influence.engine.predictions import example_losses, predicted_classes
from lightning_influence.model.data import IndexedData
from lightning_influence.reports import ExampleStore, as_image, label_text, save_examples, write_reports
from lightning_influence.reports import examples as examples_module
from lightning_influence.reports.examples import feature_text
from lightning_influence.reports.images import COLOURS, GRID_WIDTH

TRAIN_LABELS = [3, 1, 4, 1, 5]
TRAIN_PREDICTED = [3, 2, 4, 1, 0]  # examples 1 and 4 disagree with their labels
QUERY_LABELS, QUERY_PREDICTED = [7, 8, 9], [7, 8, 2]


def _result(self_influence: bool = True) -> InfluenceResult:
    scores = torch.tensor([[0.5, -2.0, 3.0, 0.1, -0.3], [1.0, 4.0, 0.5, 2.0, 0.2]])
    return InfluenceResult(
        scores=scores, query_indices=torch.tensor([2, 0]), train_indices=torch.arange(5),
        factors=torch.zeros(2, 4), self_influence=torch.tensor([1.0, 9.0, 4.0, 0.0, 2.0]) if self_influence else None,
        metadata={"timings": {"total_seconds": 1.5}, "hessian_regularization": 0.5,
                  "convergence": {"max_relative_residual": 1e-7, "iterations": 12, "min_eigenvalue": -1e-9}},
    )


def _inputs(predicted: list[int], images: bool) -> torch.Tensor:
    """Inputs whose first value is the class `Oracle` predicts; images are 1×6×6."""
    shape = (1, 6, 6) if images else (5,)
    x = torch.rand(len(predicted), *shape)
    x.view(len(predicted), -1)[:, 0] = torch.tensor(predicted, dtype=torch.float32)
    return x


class Oracle(nn.Module):
    """Predicts the class written in an input's first value, with confidence `scale`."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(x.flatten(1)[:, 0].long(), 10).float() * self.scale


def _data(images: bool) -> tuple[IndexedData, IndexedData]:
    train = TensorDataset(_inputs(TRAIN_PREDICTED, images), torch.tensor(TRAIN_LABELS))
    queries = TensorDataset(_inputs(QUERY_PREDICTED, images), torch.tensor(QUERY_LABELS))
    return IndexedData(train, name="training_data"), IndexedData(queries, name="query_data")


def _model() -> TwiceDifferentiable:
    return TwiceDifferentiable(Oracle(), F.cross_entropy)


def _rows(path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


class MetricsOnly:
    """A logger with scalars only (like CSVLogger)."""

    def __init__(self) -> None:
        self.logged: list[tuple[dict, int]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.logged.append((metrics, step))


class Writer:
    """Records SummaryWriter calls."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = fail

    def add_text(self, tag, text, step):
        if self.fail:
            raise OSError("writer closed")
        self.calls.append(("text", tag))

    def add_image(self, tag, image, step, dataformats):
        assert dataformats == "HWC" and image.dtype == np.uint8 and image.shape[2] == 3
        self.calls.append(("image", tag))

    def add_histogram(self, tag, values, step):
        self.calls.append(("histogram", tag))

    def add_scalar(self, tag, value, step):
        self.calls.append(("scalar", f"{tag}@{step}"))

    def flush(self):
        self.calls.append(("flush", ""))


class WithWriter(MetricsOnly):
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.experiment = Writer(fail)


def test_tables_on_disk_list_positive_helpful_and_negative_harmful(tmp_path):
    train, queries = _data(images=False)
    write_reports(_result(), train_data=train, query_data=queries, top_k=3, folder=tmp_path)
    rows = _rows(tmp_path / "top_influence.csv")
    query0 = [(r["kind"], int(r["train_index"]), r["train_label"]) for r in rows if r["query"] == "0"]
    assert query0 == [("helpful", 2, "4"), ("helpful", 0, "3"), ("helpful", 3, "1"),
                      ("harmful", 1, "1"), ("harmful", 4, "5")]
    assert all(r["query_index"] == "2" and r["query_label"] == "9" for r in rows if r["query"] == "0")
    assert all(float(r["score"]) > 0 for r in rows if r["kind"] == "helpful")
    assert all(float(r["score"]) < 0 for r in rows if r["kind"] == "harmful")
    assert {r["suspect_label"] for r in rows} == {""}  # no model: nothing to compare the labels with
    markdown = (tmp_path / "influence.md").read_text()
    assert "| harmful | – | none with a negative score | | | | |" in markdown  # query 1 has no negative score
    assert "| helpful | 1 | 1 | 1 | – | – | 4.0000e+00 |" in markdown
    assert [int(r["train_index"]) for r in _rows(tmp_path / "self_influence.csv")] == [1, 2, 4]
    assert not list(tmp_path.glob("*.png"))  # feature vectors are not images


def test_predictions_losses_and_suspect_labels(tmp_path):
    train, queries = _data(images=False)
    write_reports(_result(), train_data=train, query_data=queries, top_k=3, folder=tmp_path, model=_model())
    rows = _rows(tmp_path / "top_influence.csv")
    for row in rows:
        index = int(row["train_index"])
        assert row["train_prediction"] == str(TRAIN_PREDICTED[index])
        assert row["suspect_label"] == ("true" if index in (1, 4) else "false")
    query0 = [r for r in rows if r["query"] == "0"][0]  # dataset index 2: label 9, predicted 2
    assert query0["query_prediction"] == "2"
    logits = Oracle()(_inputs(QUERY_PREDICTED, images=False))
    expected = F.cross_entropy(logits, torch.tensor(QUERY_LABELS), reduction="none")[2].item()
    assert float(query0["query_loss"]) == pytest.approx(expected, rel=1e-6)
    markdown = (tmp_path / "influence.md").read_text()
    assert "**Query 0** (dataset index 2, label 9, predicted 2, loss" in markdown
    assert "| harmful | 1 | 1 | 1 | 2 | ⚠ yes | -2.0000e+00 |" in markdown
    assert "| training labels the model disagrees with (⚠ suspect) | 2 of 5 (40.0%) |" in markdown
    self_rows = _rows(tmp_path / "self_influence.csv")
    assert [(r["train_index"], r["suspect_label"]) for r in self_rows] == [("1", "true"), ("2", "false"),
                                                                           ("4", "true")]


class Named(TensorDataset):
    """A dataset that names its examples."""

    def influence_id(self, position: int) -> str:
        return f"img{position:03d}.png"


def test_own_ids_come_from_index_fn_or_a_dataset_hook_through_wrappers(tmp_path):
    base = Named(torch.randn(8, 5), torch.arange(8) % 3)
    train = IndexedData(Subset(base, [7, 6, 5, 4, 3]), name="training_data")  # the hook is found through the Subset
    assert train.ids([0, 4]) == ["img007.png", "img003.png"]
    assert IndexedData(ConcatDataset([TensorDataset(torch.zeros(3, 5)), base])).ids([0, 3]) == ["", "img000.png"]
    assert IndexedData(base, index_fn=lambda position: position * 10).ids([2]) == ["20"]
    assert IndexedData(TensorDataset(torch.zeros(3, 5))).ids([0]) is None
    with pytest.raises(ValueError, match=r"index_fn failed on a position of data \(ZeroDivisionError"):
        IndexedData(base, index_fn=lambda position: 1 / 0).ids([0])
    _, queries = _data(images=False)
    write_reports(_result(), train_data=train, query_data=queries, top_k=2, folder=tmp_path)
    assert "| | rank | train index | id | label | predicted | suspect label | score |" in (
        tmp_path / "influence.md").read_text()
    rows = list(csv.reader(io.StringIO((tmp_path / "top_influence.csv").read_text())))
    assert rows[0] == ["query", "query_index", "query_label", "kind", "rank", "train_index", "train_id", "train_label",
                       "score", "train_prediction", "suspect_label", "train_loss", "query_prediction", "query_loss"]
    assert all(row[6] == f"img{7 - int(row[5]):03d}.png" for row in rows[1:])
    self_rows = list(csv.reader(io.StringIO((tmp_path / "self_influence.csv").read_text())))
    assert self_rows[0] == ["rank", "train_index", "train_id", "train_label", "self_influence", "train_prediction",
                            "suspect_label", "train_loss"]


def _pixels(image: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int(np.all(image == np.array(colour, dtype=np.uint8), axis=2).sum())


def test_image_grids_are_legible_at_card_size_with_legend_and_marks(tmp_path):
    train, queries = _data(images=True)
    write_reports(_result(), train_data=train, query_data=queries, top_k=2, folder=tmp_path, model=_model())
    grids = {name: np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("query_000", "query_001",
                                                                                  "self_influence")}
    assert {image.shape[1] for image in grids.values()} == {GRID_WIDTH}
    assert all(image.shape[0] > GRID_WIDTH // 2 for image in grids.values())  # not a thin strip
    query0, self_grid = grids["query_000"], grids["self_influence"]
    for kind in ("query", "helpful", "harmful", "suspect"):  # frames, legend and badges
        assert _pixels(query0, COLOURS[kind]) > 100, kind
    assert _pixels(self_grid, COLOURS["self"]) > 100  # self-influence: neutral frames
    assert _pixels(self_grid, COLOURS["harmful"]) == _pixels(self_grid, COLOURS["helpful"]) == 0
    assert _pixels(self_grid, COLOURS["suspect"]) > 100  # examples 1 and 4 are suspect
    assert _pixels(grids["query_001"], COLOURS["harmful"]) > 0  # the legend, although no harmful example


def test_each_logger_gets_what_it_supports(tmp_path):
    train, queries = _data(images=True)
    plain, rich = MetricsOnly(), WithWriter()
    write_reports(_result(), train_data=train, query_data=queries, top_k=2, folder=tmp_path, loggers=[plain, rich],
                  step=7)
    (metrics, step), = plain.logged
    assert step == 7
    assert metrics == pytest.approx({"influence/num_train": 5.0, "influence/num_queries": 2.0,
                                     "influence/total_seconds": 1.5, "influence/max_relative_residual": 1e-7,
                                     "influence/iterations": 12.0, "influence/min_damped_eigenvalue": 0.5 - 1e-9,
                                     "influence/self_influence_max": 9.0, "influence/trustworthy": 1.0})
    assert rich.logged == plain.logged
    assert rich.experiment.calls == [
        ("text", "influence/text/summary"), ("text", "influence/text/query_000"),
        ("text", "influence/text/query_001"), ("text", "influence/text/self_influence"),
        ("image", "influence/images/query_000"), ("image", "influence/images/query_001"),
        ("image", "influence/images/self_influence"),
        ("histogram", "influence/histograms/scores"), ("histogram", "influence/histograms/self_influence"),
        ("scalar", "influence/self_influence_by_rank@1"), ("scalar", "influence/self_influence_by_rank@2"),
        ("scalar", "influence/self_influence_by_rank@3"), ("scalar", "influence/self_influence_by_rank@4"),
        ("scalar", "influence/self_influence_by_rank@5"), ("flush", ""),
    ]


def test_a_failing_logger_warns_and_the_others_still_get_the_report(tmp_path):
    train, queries = _data(images=False)
    broken, fine = WithWriter(fail=True), WithWriter()
    with pytest.warns(RuntimeWarning, match="Could not write the influence report to the WithWriter: OSError"):
        write_reports(_result(self_influence=False), train_data=train, query_data=queries, top_k=2,
                      folder=tmp_path, loggers=[broken, fine, object()])
    assert ("text", "influence/text/query_001") in fine.experiment.calls
    assert ("histogram", "influence/histograms/self_influence") not in fine.experiment.calls
    assert (tmp_path / "influence.md").is_file() and not (tmp_path / "self_influence.csv").exists()


PROMISED = {
    "scalars": {"influence/num_train", "influence/num_queries", "influence/total_seconds",
                "influence/self_influence_max", "influence/max_relative_residual", "influence/iterations",
                "influence/min_damped_eigenvalue", "influence/self_influence_by_rank", "influence/trustworthy"},
    # PyTorch's SummaryWriter.add_text appends "/text_summary" to the tag
    "text": {"influence/text/summary/text_summary", "influence/text/query_000/text_summary",
             "influence/text/query_001/text_summary", "influence/text/self_influence/text_summary"},
    "images": {"influence/images/query_000", "influence/images/query_001", "influence/images/self_influence"},
    "histograms": {"influence/histograms/scores", "influence/histograms/self_influence"},
}


def _listed(provider, plugin: str) -> set[str]:
    from tensorboard import context

    listing = {"scalars": provider.list_scalars, "images": provider.list_blob_sequences}.get(plugin,
                                                                                            provider.list_tensors)
    runs = listing(context.RequestContext(), experiment_id="", plugin_name=plugin)
    return {tag for tags in runs.values() for tag in tags}


@pytest.mark.parametrize("load_fast", ["false", "true"])
def test_every_promised_tag_reaches_tensorboards_data_provider(tmp_path, load_fast):
    """Loaded as TensorBoard's UI loads a log dir: `--load_fast=false` (the Python multiplexer) and `true` (the
    Rust data server, the default when installed), with their default sampling. A tag shared by two kinds of
    summary shows one of them only, which these checks would catch."""
    from tensorboard import program
    from tensorboard.data import server_ingester

    if load_fast == "true":
        try:
            server_ingester.get_server_binary()
        except server_ingester.NoDataServerError as error:
            pytest.skip(f"no TensorBoard data server binary: {error}")
    train, queries = _data(images=True)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    write_reports(_result(), train_data=train, query_data=queries, top_k=2, folder=tmp_path / "report",
                  loggers=[logger], model=_model())
    logger.finalize("success")
    tensorboard = program.TensorBoard()
    tensorboard.configure(argv=[None, "--logdir", str(tmp_path), "--load_fast", load_fast, "--reload_interval", "1"])
    ingester = tensorboard._make_data_ingester()  # noqa: SLF001 (TensorBoard's own choice of provider)
    try:
        deadline, found = time.monotonic() + 30, {}
        while time.monotonic() < deadline and found != PROMISED:
            time.sleep(0.5)
            found = {plugin: _listed(ingester.data_provider, plugin) & tags for plugin, tags in PROMISED.items()}
        assert found == PROMISED
    finally:
        stdin = getattr(ingester, "_stdin_handle", None)  # the data server exits when its stdin closes
        if stdin is not None:
            stdin.close()


def test_per_example_facts_round_trip_and_partial_thumbnails(tmp_path, monkeypatch):
    train, queries = _data(images=True)
    result = _result()
    store = save_examples(tmp_path / "all", result, train, queries, model=_model())
    assert store.train.kept is None and store.train.thumbnails.shape == (5, 6, 6, 3)
    assert [store.train.example(p).suspect for p in range(5)] == [False, True, False, False, True]
    assert store.query.example(0).index == 2 and store.query.example(0).prediction == "2"
    monkeypatch.setattr(examples_module, "ALL_EXAMPLES_BUDGET", 0)  # too many to keep every thumbnail
    monkeypatch.setattr(examples_module, "DASHBOARD_TOP", 1)
    monkeypatch.setattr(examples_module, "SELF_RANKING", 1)
    partial = save_examples(tmp_path / "some", result, train, queries, model=_model())
    named = {2, 1, 4}  # the largest and smallest score of each query, and the top self-influence
    assert partial.train.kept.tolist() == sorted(named)
    assert [partial.train.example(p).thumbnail for p in range(5)] == [p in named for p in range(5)]
    assert partial.train.thumbnail(0) is None and partial.train.example(0).label == "3"
    assert ExampleStore(tmp_path / "some").query.kept is None  # queries: always all


def test_descriptions_from_describe_and_raw_features(tmp_path):
    train, queries = _data(images=False)
    store = save_examples(tmp_path / "raw", _result(), train, queries)
    assert store.train.example(0).description.startswith("[3, ")
    described = save_examples(tmp_path / "text", _result(), train, queries, describe=lambda x: f"naïve {x[0]:.0f} ✓")
    assert described.train.example(4).description == "naïve 0 ✓"
    with pytest.raises(ValueError, match="describe failed on example 0 of training_data .ZeroDivisionError"):
        save_examples(tmp_path / "bad", _result(), train, queries, describe=lambda x: 1 / 0)
    assert not (tmp_path / "bad").exists()


def test_unsorted_dataset_indices_are_found_by_position(tmp_path):
    train, queries = _data(images=False)
    result = _result()
    result.train_indices = torch.tensor([4, 0, 3, 1, 2])
    store = save_examples(tmp_path, result, train, queries)
    assert [store.train.position_of(i) for i in (0, 1, 2, 3, 4, 5)] == [1, 3, 4, 2, 0, None]
    assert store.train.example(0).label == "5"  # dataset index 4


def test_per_example_losses_and_predictions():
    model = _model()
    x = _inputs([1, 2, 3], images=False)
    outputs, targets = model.module(x), torch.tensor([1, 0, 3])
    expected = F.cross_entropy(outputs, targets, reduction="none")
    torch.testing.assert_close(example_losses(model, outputs, targets), expected)
    stubborn = TwiceDifferentiable(Oracle(), lambda o, t: F.cross_entropy(o, t) * (1.0 if t.sum().item() >= 0 else 2))
    torch.testing.assert_close(example_losses(stubborn, outputs, targets), expected)  # vmap fails; looped
    assert predicted_classes(outputs, targets).tolist() == [1, 2, 3]
    assert predicted_classes(outputs, targets.float()) is None  # not class indices
    assert predicted_classes(outputs[:, :1], targets) is None


def test_what_counts_as_an_image_and_a_label():
    assert as_image(torch.rand(1, 8, 8)).shape == (8, 8, 3)
    assert as_image(torch.rand(3, 5, 4)).shape == (5, 4, 3)
    assert as_image(torch.rand(8, 8)).shape == (8, 8, 3)
    image = as_image(torch.tensor([[[0.0, 2.0, 4.0, 4.0]] * 4]))
    assert image.min() == 0.0 and image.max() == 1.0  # scaled to [0, 1]
    for not_image in (torch.rand(64), torch.rand(2, 8, 8), torch.rand(1, 2, 2), torch.arange(16).view(1, 4, 4), "x"):
        assert as_image(not_image) is None
    assert label_text(torch.tensor(3)) == "3"
    assert label_text(torch.tensor([0.25])) == "0.25"
    assert label_text(torch.zeros(2, 3)) == "tensor(2, 3)"
    assert feature_text(torch.arange(3)) == "[0, 1, 2]"
    assert feature_text(torch.zeros(10)) == "[0, 0, 0, 0, 0, 0, 0, 0, … 10 values]"
