"""W&B and MLflow get what they can show, through their own APIs (W&B offline, an MLflow file store). Skipped
unless `wandb` / `mlflow` are installed (pip install -e ".[wandb,mlflow]")."""

from __future__ import annotations

import json

import pytest
from test_reports import _data, _model, _result

from lightning_influence.reports import write_reports


def test_wandb_gets_tables_and_images(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="needs wandb (pip install -e '.[wandb]')")
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_SILENT", "true")
    train, queries = _data(images=True)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="influence-test")
    try:
        write_reports(_result(), train_data=train, query_data=queries, top_k=2, folder=tmp_path / "report",
                      loggers=[logger], model=_model())
        media = tmp_path / "wandb" / "latest-run" / "files" / "media"
        (table,) = (media / "table" / "influence" / "tables").glob("top_influence_*.table.json")
        content = json.loads(table.read_text())
        assert content["columns"][:4] == ["query", "query_index", "query_label", "kind"]
        assert "suspect_label" in content["columns"] and len(content["data"]) == 6  # query 1 has no harmful
        images = sorted(p.name.rsplit("_", 2)[0] for p in (media / "images" / "influence" / "images").glob("*.png"))
        assert images == ["query_000", "query_001", "self_influence"]
    finally:
        logger.experiment.finish()


@pytest.mark.filterwarnings("ignore:For backward compatibility, 'str' dtypes")  # inside mlflow's log_table
def test_mlflow_gets_the_report_files_and_tables(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="needs mlflow (pip install -e '.[mlflow]')")
    from pytorch_lightning.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store, kept by MLflow for local use
    train, queries = _data(images=True)
    logger = MLFlowLogger(experiment_name="influence", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    write_reports(_result(), train_data=train, query_data=queries, top_k=2, folder=tmp_path / "report",
                  loggers=[logger], model=_model())
    client, run = logger.experiment, logger.run_id
    files = {entry.path for entry in client.list_artifacts(run, "influence_report")}
    assert {"influence_report/influence.md", "influence_report/top_influence.csv",
            "influence_report/query_000.png", "influence_report/self_influence.png"} <= files
    assert not any("examples" in path for path in files)  # the dashboard's store stays on disk
    tables = {entry.path for entry in client.list_artifacts(run, "influence/tables")}
    assert tables == {"influence/tables/top_influence.json", "influence/tables/self_influence.json"}
    assert client.get_run(run).data.metrics["influence/num_train"] == 5.0
