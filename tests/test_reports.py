"""Reports: tables and grids on disk, and each logger gets what it supports without ever failing the run."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Subset, TensorDataset

from lightning_influence import InfluenceResult
from lightning_influence.model.data import IndexedData
from lightning_influence.reports import as_image, label_text, write_reports


def _result(self_influence: bool = True) -> InfluenceResult:
    scores = torch.tensor([[0.5, -2.0, 3.0, 0.1, -0.3], [1.0, 4.0, 0.5, 2.0, 0.2]])
    return InfluenceResult(
        scores=scores, query_indices=torch.tensor([2, 0]), train_indices=torch.arange(5),
        factors=torch.zeros(2, 4), self_influence=torch.tensor([1.0, 9.0, 4.0, 0.0, 2.0]) if self_influence else None,
        metadata={"timings": {"total_seconds": 1.5}, "convergence": {"max_relative_residual": 1e-7, "iterations": 12}},
    )


def _data(images: bool) -> tuple[IndexedData, IndexedData]:
    shape = (1, 6, 6) if images else (5,)
    train = TensorDataset(torch.randn(5, *shape), torch.tensor([3, 1, 4, 1, 5]))
    queries = TensorDataset(torch.randn(3, *shape), torch.tensor([7, 8, 9]))
    return IndexedData(train, name="training_data"), IndexedData(queries, name="query_data")


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

    def flush(self):
        self.calls.append(("flush", ""))


class WithWriter(MetricsOnly):
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.experiment = Writer(fail)


def test_tables_on_disk_list_positive_helpful_and_negative_harmful(tmp_path):
    train, queries = _data(images=False)
    write_reports(_result(), train_data=train, query_data=queries, top_k=3, folder=tmp_path)
    with open(tmp_path / "top_influence.csv") as handle:
        rows = list(csv.DictReader(handle))
    query0 = [(r["kind"], int(r["train_index"]), r["train_label"]) for r in rows if r["query"] == "0"]
    assert query0 == [("helpful", 2, "4"), ("helpful", 0, "3"), ("helpful", 3, "1"),
                      ("harmful", 1, "1"), ("harmful", 4, "5")]
    assert all(r["query_index"] == "2" and r["query_label"] == "9" for r in rows if r["query"] == "0")
    assert all(float(r["score"]) > 0 for r in rows if r["kind"] == "helpful")
    assert all(float(r["score"]) < 0 for r in rows if r["kind"] == "harmful")
    markdown = (tmp_path / "influence.md").read_text()
    assert "| harmful | – | none with a negative score | | |" in markdown  # query 1 has no negative score
    assert "| helpful | 1 | 1 | 1 | 4.0000e+00 |" in markdown
    with open(tmp_path / "self_influence.csv") as handle:
        assert [int(r["train_index"]) for r in csv.DictReader(handle)] == [1, 2, 4]
    assert not list(tmp_path.glob("*.png"))  # feature vectors are not images


def test_image_grids_as_png(tmp_path):
    train, queries = _data(images=True)
    write_reports(_result(), train_data=train, query_data=queries, top_k=2, folder=tmp_path)
    tile = 96 + 4  # pixels per tile and gap
    widths = {name: Image.open(tmp_path / name).size[0] for name in ("query_000.png", "query_001.png",
                                                                      "self_influence.png")}
    # query 0: the query, 2 helpful and 2 harmful; query 1 has no harmful example; self-influence: the top 2
    assert widths == {"query_000.png": 5 * tile + 4, "query_001.png": 3 * tile + 4, "self_influence.png": 2 * tile + 4}
    assert Image.open(tmp_path / "query_000.png").mode == "RGB"


def test_each_logger_gets_what_it_supports(tmp_path):
    train, queries = _data(images=True)
    plain, rich = MetricsOnly(), WithWriter()
    write_reports(_result(), train_data=train, query_data=queries, top_k=2, folder=tmp_path, loggers=[plain, rich],
                  step=7)
    (metrics, step), = plain.logged
    assert step == 7
    assert metrics == pytest.approx({"influence/num_train": 5.0, "influence/num_queries": 2.0,
                                     "influence/total_seconds": 1.5, "influence/max_relative_residual": 1e-7,
                                     "influence/iterations": 12.0, "influence/self_influence_max": 9.0,
                                     "influence/trustworthy": 1.0})
    assert rich.logged == plain.logged
    assert rich.experiment.calls == [
        ("text", "influence/query_000"), ("text", "influence/query_001"), ("text", "influence/self_influence"),
        ("image", "influence/query_000"), ("image", "influence/query_001"), ("image", "influence/self_influence"),
        ("histogram", "influence/scores"), ("histogram", "influence/self_influence"), ("flush", ""),
    ]


def test_a_failing_logger_warns_and_the_others_still_get_the_report(tmp_path):
    train, queries = _data(images=False)
    broken, fine = WithWriter(fail=True), WithWriter()
    with pytest.warns(RuntimeWarning, match="Could not write the influence report to the WithWriter: OSError"):
        write_reports(_result(self_influence=False), train_data=train, query_data=queries, top_k=2,
                      folder=tmp_path, loggers=[broken, fine, object()])
    assert ("text", "influence/query_001") in fine.experiment.calls
    assert ("histogram", "influence/self_influence") not in fine.experiment.calls
    assert (tmp_path / "influence.md").is_file() and not (tmp_path / "self_influence.csv").exists()


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
    assert "| | rank | train index | id | label | score |" in (tmp_path / "influence.md").read_text()
    rows = list(csv.reader(io.StringIO((tmp_path / "top_influence.csv").read_text())))
    assert rows[0] == ["query", "query_index", "query_label", "kind", "rank", "train_index", "train_id", "train_label",
                       "score"]
    assert all(row[6] == f"img{7 - int(row[5]):03d}.png" for row in rows[1:])
    self_rows = list(csv.reader(io.StringIO((tmp_path / "self_influence.csv").read_text())))
    assert self_rows[0] == ["rank", "train_index", "train_id", "train_label", "self_influence"]
