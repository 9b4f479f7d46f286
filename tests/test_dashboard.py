"""The INFLUENCE tab's routes, without a browser: what they answer for several runs, a run still computing, a
run rewritten, bad requests (4xx with a message), memory-mapped reads of large results, and the entry point."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import tomllib
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from dashboard_helpers import feature_run, image_run
from PIL import Image
from tensorboard.plugins import base_plugin
from werkzeug.test import Client

from lightning_influence import InfluenceResult
from lightning_influence.reports.dashboard import InfluencePlugin
from lightning_influence.reports.logdir import find_runs, histogram_edges

ROOT = Path(__file__).resolve().parents[1]


class Dashboard:
    """The plugin's WSGI apps, called as TensorBoard routes them."""

    def __init__(self, logdir: Path | str) -> None:
        self.plugin = InfluencePlugin(base_plugin.TBContext(logdir=str(logdir)))
        self.apps = self.plugin.get_plugin_apps()

    def get(self, route: str, **params):
        response = Client(self.apps[route]).get("/", query_string=params)
        body = response.get_data()
        if response.mimetype == "application/json":
            body = json.loads(body)
        return response.status_code, body, response


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("logdir")
    result, flipped = image_run(root / "images")
    feature_run(root / "features")
    return root, result, flipped


def test_runs_are_found_with_what_was_saved(logdir):
    root, result, _ = logdir
    status, runs, _ = Dashboard(root).get("/runs")
    assert status == 200
    assert [(r["name"], r["state"]) for r in runs] == [("features/influence", "complete"),
                                                        ("images/influence", "complete")]
    images = runs[1]
    assert (images["num_queries"], images["num_train"]) == (result.num_queries, result.num_train)
    assert images["self_influence"] and images["predictions"] and images["thumbnails"] and not images["descriptions"]
    assert runs[0]["descriptions"] and not runs[0]["thumbnails"] and not runs[0]["self_influence"]
    assert all(r["trustworthy"] and r["warnings"] == [] for r in runs)


def test_an_untrustworthy_run_says_so_and_why(tmp_path):
    image_run(tmp_path / "run")
    folder = tmp_path / "run" / "influence" / "result"
    result = InfluenceResult.load(folder, mmap=False)
    result.metadata.update(trustworthy=False, warnings=["The influence factors did not converge."])
    result.save(folder)
    status, runs, _ = Dashboard(tmp_path).get("/runs")
    assert status == 200 and (runs[0]["trustworthy"], runs[0]["warnings"]) == (
        False, ["The influence factors did not converge."])


def test_a_query_names_the_results_top_examples_with_labels_and_suspect_marks(logdir):
    root, result, flipped = logdir
    for query in range(result.num_queries):
        status, answer, _ = Dashboard(root).get("/query", run="images/influence", query=query, k=10)
        assert status == 200
        helpful, harmful = result.top_helpful(query, 10), result.top_harmful(query, 10)
        assert [e["index"] for e in answer["helpful"]] == [int(i) for i, s in zip(*helpful) if s > 0]
        assert [e["index"] for e in answer["harmful"]] == [int(i) for i, s in zip(*harmful) if s < 0]
        assert all(e["suspect"] == (e["index"] in flipped.tolist()) for e in answer["helpful"] + answer["harmful"])
        assert sum(answer["histogram"]["counts"]) == result.num_train
        assert answer["query"]["index"] == int(result.query_indices[query]) and answer["query"]["thumbnail"]
    first = answer["harmful"][0]
    assert first["label"] is not None and first["prediction"] is not None and first["loss"] > 0


def test_a_training_example_lists_the_queries_it_helps_and_hurts(logdir):
    root, result, _ = logdir
    index = 12
    status, answer, _ = Dashboard(root).get("/train", run="images/influence", index=index, k=3)
    assert status == 200
    column = result.scores[:, index]
    assert [q["position"] for q in answer["helps"]] == [int(q) for q in column.topk(3).indices if column[q] > 0]
    assert [q["position"] for q in answer["hurts"]] == [int(q) for q in (-column).topk(3).indices if column[q] < 0]
    ranking = result.self_influence.argsort(descending=True).tolist()
    assert answer["self_rank"] == ranking.index(index) + 1
    assert answer["example"]["suspect"] is True


def test_self_influence_ranking_and_export_of_the_suspects(logdir):
    root, result, flipped = logdir
    dashboard = Dashboard(root)
    status, rows, _ = dashboard.get("/self_influence", run="images/influence", k=20)
    assert status == 200 and [r["index"] for r in rows] == result.top_self_influence(20).indices.tolist()
    suspects = [r["index"] for r in rows if r["suspect"]]
    assert sorted(suspects) == flipped.tolist()  # the flipped labels, all of them in the top 20
    status, body, response = dashboard.get("/export", run="images/influence", indices=",".join(map(str, suspects)))
    assert status == 200 and response.mimetype == "text/csv"
    assert "attachment" in response.headers["Content-Disposition"]
    exported = list(csv.DictReader(io.StringIO(body.decode())))
    assert [int(r["train_index"]) for r in exported] == suspects
    assert all(r["suspect_label"] == "true" and r["label"] != r["prediction"] for r in exported)
    assert float(exported[0]["self_influence"]) == pytest.approx(float(result.self_influence[suspects[0]]))


def test_thumbnails_and_descriptions(logdir):
    root, _, _ = logdir
    dashboard = Dashboard(root)
    status, body, response = dashboard.get("/thumbnail", run="images/influence", split="train", position=3)
    assert status == 200 and response.mimetype == "image/png"
    assert Image.open(io.BytesIO(body)).size == (8, 8)
    status, answer, _ = dashboard.get("/query", run="features/influence", query=0, k=2)
    assert answer["helpful"][0]["description"].startswith("features ")
    assert not answer["helpful"][0]["thumbnail"]


@pytest.mark.parametrize("route, params, status, message", [
    ("/query", {"run": "nope", "query": 0}, 404, "Unknown run 'nope'"),
    ("/query", {"query": 0}, 400, "Missing parameter 'run'"),
    ("/query", {"run": "images/influence", "query": 6}, 400, "query=6 is out of range: it must be in [0, 6)"),
    ("/query", {"run": "images/influence", "query": "x"}, 400, "query must be an integer"),
    ("/query", {"run": "images/influence"}, 400, "Missing parameter 'query'"),
    ("/query", {"run": "images/influence", "query": 0, "k": 0}, 400, "k=0 is out of range"),
    ("/train", {"run": "images/influence", "index": 60}, 404, "Training example 60 is not in run"),
    ("/train", {"run": "images/influence", "index": -1}, 400, "index=-1 is out of range"),
    ("/self_influence", {"run": "features/influence"}, 404, "has no self-influence"),
    ("/self_influence", {"run": "images/influence", "k": 501}, 400, "k=501 is out of range"),
    ("/export", {"run": "images/influence", "indices": "1,a"}, 400, "indices must be integers"),
    ("/export", {"run": "images/influence", "indices": ""}, 400, "indices must be 1 to"),
    ("/export", {"run": "images/influence", "indices": "3,999"}, 404, "Training example 999 is not in run"),
    ("/thumbnail", {"run": "images/influence", "split": "test", "position": 0}, 400, "split must be one of"),
    ("/thumbnail", {"run": "images/influence", "split": "train", "position": 60}, 400, "position=60 is out of"),
    ("/thumbnail", {"run": "features/influence", "split": "train", "position": 0}, 404, "No thumbnail was saved"),
])
def test_bad_requests_get_a_4xx_and_a_message(logdir, route, params, status, message):
    got, body, _ = Dashboard(logdir[0]).get(route, **params)
    assert got == status
    assert message in body["error"] and "Traceback" not in body["error"]


def test_a_run_still_computing_then_complete_then_recomputed(tmp_path):
    run = tmp_path / "run" / "influence"
    (run / "partial").mkdir(parents=True)
    dashboard = Dashboard(tmp_path)
    assert dashboard.plugin.is_active()
    status, runs, _ = dashboard.get("/runs")
    assert runs == [{"name": "run/influence", "state": "computing"}]
    status, body, _ = dashboard.get("/query", run="run/influence", query=0)
    assert status == 409 and "still computing" in body["error"]

    image_run(tmp_path / "source")
    shutil.copytree(tmp_path / "source" / "influence" / "result", run / "result")  # the result lands first
    shutil.rmtree(run / "partial")
    status, answer, _ = dashboard.get("/query", run="run/influence", query=0, k=3)
    assert status == 200 and answer["helpful"][0]["label"] is None  # no report yet: indices and scores only
    shutil.copytree(tmp_path / "source" / "influence" / "report", run / "report")
    status, answer, _ = dashboard.get("/query", run="run/influence", query=0, k=3)
    assert answer["helpful"][0]["label"] is not None

    result = InfluenceResult.load(run / "result", mmap=False)
    result.scores = -result.scores  # recomputed: a new folder swapped in
    result.save(run / "result")
    status, again, _ = dashboard.get("/query", run="run/influence", query=0, k=3)
    assert [e["index"] for e in again["helpful"]] == [e["index"] for e in answer["harmful"]]


def test_an_empty_log_dir_or_none_is_inactive(tmp_path):
    assert not Dashboard(tmp_path).plugin.is_active()
    without = Dashboard("")  # e.g. TensorBoard started with --logdir_spec
    assert not without.plugin.is_active() and without.get("/runs")[1] == []
    status, body, _ = without.get("/query", run="x", query=0)
    assert status == 404 and "started without --logdir" in body["error"]


def test_default_save_dirs_are_found(tmp_path):
    for folder in ("lightning_logs/version_0/influence", "influence/version_3", "custom"):
        (tmp_path / folder / "result").mkdir(parents=True)
        (tmp_path / folder / "result" / "metadata.json").write_text("{}")
    (tmp_path / "custom" / "report").mkdir()
    (tmp_path / ".hidden" / "result").mkdir(parents=True)
    (tmp_path / ".hidden" / "result" / "metadata.json").write_text("{}")
    assert sorted(find_runs(tmp_path)) == ["custom", "influence/version_3", "lightning_logs/version_0/influence"]
    status, runs, _ = Dashboard(tmp_path).get("/runs")
    assert {r["state"] for r in runs} == {"unreadable"}  # an empty metadata.json: named, not a traceback


def _large_result(folder: Path, queries: int, train: int) -> None:
    """A saved result of [queries, train] float32 scores, written row by row without holding the matrix."""
    folder.mkdir(parents=True)
    scores = np.lib.format.open_memmap(folder / "scores.npy", mode="w+", dtype=np.float32, shape=(queries, train))
    generator = np.random.default_rng(0)
    for row in range(queries):
        scores[row] = generator.standard_normal(train, dtype=np.float32)
    scores.flush()
    del scores
    np.save(folder / "query_indices.npy", np.arange(queries))
    np.save(folder / "train_indices.npy", np.arange(train))
    np.save(folder / "factors.npy", np.zeros((queries, 2), dtype=np.float32))
    np.save(folder / "self_influence.npy", generator.random(train, dtype=np.float32))
    (folder / "metadata.json").write_text(json.dumps({
        "format_version": 2, "complete": True,
        "arrays": ["scores", "query_indices", "train_indices", "factors", "self_influence"]}))


def _resident() -> dict[str, int]:
    """Resident memory of this process, anonymous (copies) and file-backed (mapped pages), in bytes."""
    lines = Path("/proc/self/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines if line.startswith(("RssAnon", "RssFile")))
    return {name: int(value.split()[0]) * 1024 for name, value in fields.items()}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to measure resident memory")
def test_large_results_are_read_one_row_or_column_at_a_time(tmp_path):
    queries, train = 64, 1_000_000  # 256 MB of scores
    _large_result(tmp_path / "big" / "result", queries, train)
    dashboard = Dashboard(tmp_path)
    before = _resident()
    status, answer, _ = dashboard.get("/query", run="big", query=17, k=5)
    assert status == 200 and len(answer["helpful"]) == 5 and answer["helpful"][0]["label"] is None
    status, column, _ = dashboard.get("/train", run="big", index=999_999, k=5)
    assert status == 200 and len(column["helps"]) + len(column["hurts"]) == 10
    status, ranking, _ = dashboard.get("/self_influence", run="big", k=50)
    assert status == 200 and len(ranking) == 50
    grown = {name: (_resident()[name] - value) / 2**20 for name, value in before.items()}
    assert grown["RssAnon"] < 48 and grown["RssFile"] < 64, f"MiB grown for 256 MiB of scores: {grown}"
    scores = np.load(tmp_path / "big" / "result" / "scores.npy", mmap_mode="r")
    assert answer["helpful"][0]["index"] == int(np.argmax(scores[17]))
    assert column["helps"][0]["position"] == int(np.argmax(scores[:, 999_999]))


def test_the_entry_point_names_the_plugin_and_the_static_files_ship():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["tensorboard_plugins"]
    entry = metadata.EntryPoint(name="influence", value=declared["influence"], group="tensorboard_plugins")
    assert entry.load() is InfluencePlugin
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert package_data["lightning_influence.reports"] == ["static/*"]
    dashboard = Dashboard(Path("/nonexistent"))
    for route, kind in (("/index.js", "text/javascript"), ("/style.css", "text/css")):
        status, body, response = dashboard.get(route)
        assert status == 200 and response.mimetype == kind and len(body) > 1000
    script = dashboard.get("/index.js")[1].decode()
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", script)  # no network: relative routes only
    assert InfluencePlugin.plugin_name == "influence"
    assert InfluencePlugin(base_plugin.TBContext(logdir="x")).frontend_metadata().tab_name == "Influence"


def test_installed_entry_point_when_installed_from_this_tree():
    """In CI the package is installed from this checkout, and TensorBoard finds the plugin by its entry point."""
    from tensorboard import default

    found = [ep for ep in metadata.entry_points(group="tensorboard_plugins") if ep.name == "influence"]
    if not found:
        pytest.skip("lightning_influence is installed from another checkout without this entry point")
    assert InfluencePlugin in default.get_dynamic_plugins()


def test_histogram_bins_never_mix_signs():
    edges = histogram_edges(-1.0, 3.0, bins=40)
    assert len(edges) == 41 and 0.0 in edges.tolist() and edges[0] == -1.0 and edges[-1] == 3.0
    assert np.all(np.diff(edges) > 0)
    assert histogram_edges(-5.0, -1.0, bins=4).tolist() == [-5.0, -4.0, -3.0, -2.0, -1.0]
    assert histogram_edges(2.0, 2.0).tolist() == [1.5, 2.5]  # a constant row still gets a bar
