"""MLflow tracking and the champion model against a real `mlflow server` on 127.0.0.1.

The server runs as a subprocess on a free port with a SQLite backend and proxied artifacts
in tmp_path. Starting it takes 10 to 20 s, so the module shares one server.
"""

import time
from pathlib import Path

import mlflow
import pytest

from search.registry import CHAMPION_ALIAS, log_best_trial, log_champion, registered_model_name
from search.tracking import TAG_EARLY_STOPPED, TrialOutcome, new_client, reconcile_trial_runs, start_search_run
from search.trial_logger import TrialRunLogger

pytestmark = pytest.mark.slow

STEP_METRIC = "val/ndcg@100"
CONFIG = {"aggregator": "meanpool", "embedding_size": 32, "lambda_mi": 0.25}


@pytest.fixture(scope="module")
def server(mlflow_server):
    return mlflow_server


@pytest.fixture
def target(server, tmp_path, request):
    return start_search_run(server.uri, request.node.name, tmp_path / "experiment", resume=False, tags={"data_checksum": "abc"})


def result(epoch: int) -> dict:
    return {"epoch": epoch, "val/ndcg@100": 0.1 * epoch, "train_loss": 2.0 / epoch}


def steps(client, run_id: str, key: str) -> list[int]:
    return sorted(metric.step for metric in client.get_metric_history(run_id, key))


def test_parent_and_trial_runs_logged(server, target):
    logger = TrialRunLogger(target, "search_00000", CONFIG, {**CONFIG, "lr": 0.005}, STEP_METRIC)
    for epoch in (1, 2, 3):
        logger.log_result(result(epoch))
    assert logger.finish("completed", timeout_s=60)
    outcome = TrialOutcome("search_00000", CONFIG, {**CONFIG, "lr": 0.005}, "stopped_early", [result(e) for e in (1, 2, 3)])
    assert reconcile_trial_runs(target, [outcome], STEP_METRIC) == 0

    client = new_client(server.uri)
    parent = client.get_run(target.parent_run_id)
    [run] = client.search_runs([target.experiment_id], f"tags.`mlflow.parentRunId` = '{target.parent_run_id}'")
    assert parent.data.tags["data_checksum"] == "abc"
    assert run.info.run_name == "meanpool-d32-lambda0.25"
    assert run.info.status == "FINISHED"
    assert run.data.tags[TAG_EARLY_STOPPED] == "true"
    assert run.data.params["lr"] == "0.005"
    assert steps(client, run.info.run_id, "val/ndcg_at_100") == [1, 2, 3]


def test_stopped_server_loses_no_metric(server, target, monkeypatch, caplog):
    # With MLflow's own HTTP retries off, only the logger's queue and backoff can deliver.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    logger = TrialRunLogger(target, "search_00001", CONFIG, CONFIG, STEP_METRIC)
    logger.log_result(result(1))
    assert logger.flush(timeout_s=60)

    server.stop()
    for epoch in (2, 3, 4):
        logger.log_result(result(epoch))
    time.sleep(3)  # the logger fails and retries while the server is down
    server.start()
    assert logger.finish("completed", timeout_s=60)

    client = new_client(server.uri)
    run = client.get_run(logger.run_id)
    assert any("failed, retrying" in record.getMessage() for record in caplog.records)
    assert run.info.status == "FINISHED"
    assert steps(client, logger.run_id, "val/ndcg_at_100") == [1, 2, 3, 4]
    assert steps(client, logger.run_id, "train_loss") == [1, 2, 3, 4]


def test_champion_loads_from_server(server, target, trained, tmp_path, monkeypatch):
    data, config, fitted = trained
    name = registered_model_name("server")
    checkpoint = tmp_path / "checkpoint_000001"
    save_trial_checkpoint(checkpoint, fitted, config, data)
    best = {"trial_id": "search_00002", "epoch": 2, "checkpoint": str(checkpoint), "experiment": "server",
            "metrics": {f"val/{key}": value for key, value in fitted.group.best_metrics.items() if "@" in key}}
    version = log_best_trial(target, name, best, data.member_items, data.checksum)
    log_champion(target, name, fitted.model, config, data.member_items, best["metrics"])  # a later champion
    newest = log_best_trial(target, name, best, data.member_items, data.checksum)

    client = new_client(server.uri)
    assert client.get_model_version_by_alias(name, CHAMPION_ALIAS).version == newest.version
    assert int(newest.version) == int(version.version) + 2
    assert newest.tags["epoch"] == "2"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", server.uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION_ALIAS}")
    [row] = model.predict([[3, 4, 5]], params={"k": 20})
    assert len(set(row["items"])) == 20
    assert all(0 <= item < data.n_items for item in row["items"])
    with pytest.raises(Exception, match="unknown user id"):
        model.predict([[data.n_users]])


def save_trial_checkpoint(folder: Path, fitted, config, data) -> None:
    """A checkpoint folder as the search's trials write it."""
    from search.checkpoints import write_checkpoint

    folder.mkdir()
    payload = {
        "epoch": 2, "model": fitted.model.state_dict(), "config": config.to_dict(), "n_items": data.n_items,
        "data_checksum": data.checksum, "metrics": dict(fitted.group.best_metrics), "pretraining": {},
    }
    write_checkpoint(folder, payload, {"epoch": 2})
