"""MLflow tracking and the registered champion model against a real SQLite store in tmp_path."""

import math
import socket
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from groupim.recommend import UnknownUserError, recommend
from search.registry import CHAMPION_ALIAS, log_champion, registered_model_name
from search.tracking import (
    DEFAULT_TRACKING_URI,
    ERROR_ARTIFACT,
    TAG_EARLY_STOPPED,
    TAG_ERROR,
    TAG_TRIAL_ID,
    TrackingTarget,
    TrialOutcome,
    new_client,
    reconcile_trial_runs,
    resolve_tracking_uri,
    start_search_run,
    trial_run_name,
)
from search.trial_logger import TrialRunLogger

STEP_METRIC = "val/ndcg@100"
CONFIG = {"aggregator": "attention", "embedding_size": 64, "lambda_mi": 0.5}
TRAIN_CONFIG = {**CONFIG, "lr": 0.005, "epochs": 4, "pretrain_user": True}


def result(epoch: int, ndcg: float, loss: float = 1.0) -> dict:
    return {"epoch": epoch, "val/ndcg@100": ndcg, "val/recall@20": ndcg / 2, "train_loss": loss, "best_epoch": epoch}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating its tables takes seconds); tests use their own experiments."""
    return resolve_tracking_uri(DEFAULT_TRACKING_URI, cwd=tmp_path_factory.mktemp("store"))


@pytest.fixture
def target(store, tmp_path, request):
    return start_search_run(
        store, request.node.name, tmp_path / "runs" / "smoke", resume=False,
        tags={"experiment_file": "experiments/smoke.yaml", "data_checksum": "abc123", "mlflow.source.git.commit": None},
    )


def trial_runs(target):
    client = new_client(target.tracking_uri)
    query = f"tags.`mlflow.parentRunId` = '{target.parent_run_id}'"
    return client.search_runs([target.experiment_id], query)


def history(target, run_id: str, key: str) -> list[tuple[int, float]]:
    metrics = new_client(target.tracking_uri).get_metric_history(run_id, key)
    return sorted((metric.step, metric.value) for metric in metrics)


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri("sqlite:///other.db") == f"sqlite:///{tmp_path / 'other.db'}"
    assert resolve_tracking_uri() == "http://127.0.0.1:5999"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_tracking_uri("mlruns") == (tmp_path / "mlruns").as_uri()


def test_trial_run_name_from_config():
    assert trial_run_name(CONFIG) == "attention-d64-lambda0.5"
    assert trial_run_name({"lambda_mi": 0.0625, "aggregator": "maxpool", "embedding_size": 32, "lr": 0.00123456}) == (
        "maxpool-d32-lambda0.0625-lr0.00123"
    )


def test_parent_run_tags_and_artifact_root(target, store, tmp_path):
    client = new_client(target.tracking_uri)
    parent = client.get_run(target.parent_run_id)
    experiment = client.get_experiment(target.experiment_id)
    database = Path(store.removeprefix("sqlite:///"))

    assert experiment.name == "test_parent_run_tags_and_artifact_root"
    assert experiment.artifact_location == (database.parent / "mlartifacts" / experiment.name).as_uri()
    assert parent.info.status == "RUNNING"
    assert parent.data.tags["experiment_file"] == "experiments/smoke.yaml"
    assert parent.data.tags["data_checksum"] == "abc123"
    assert "mlflow.source.git.commit" not in parent.data.tags
    assert (tmp_path / "runs" / "smoke" / "mlflow_run.json").is_file()


def test_trial_run_params_metrics_and_status(target):
    logger = TrialRunLogger(target, "smoke_00000", CONFIG, TRAIN_CONFIG, STEP_METRIC)
    logger.log_pretraining({"pretrain_user_reused": True, "pretrain_user_seconds": 2.5, "pretrain_user_val_ndcg@100": 0.21})
    for epoch, ndcg in [(1, 0.1), (2, 0.15), (4, 0.2)]:
        logger.log_result(result(epoch, ndcg))
    assert logger.finish("completed", timeout_s=60)

    [run] = trial_runs(target)
    assert run.info.run_name == "attention-d64-lambda0.5"
    assert run.info.status == "FINISHED"
    assert run.data.tags[TAG_TRIAL_ID] == "smoke_00000"
    assert run.data.tags[TAG_EARLY_STOPPED] == "false"
    assert run.data.tags["pretrain_user_reused"] == "true"
    assert run.data.params == {key: str(value) for key, value in TRAIN_CONFIG.items()}
    assert run.data.metrics["pretrain_user_val_ndcg_at_100"] == pytest.approx(0.21)
    assert history(target, run.info.run_id, "val/ndcg_at_100") == [(1, 0.1), (2, 0.15), (4, 0.2)]
    assert [step for step, _ in history(target, run.info.run_id, "train_loss")] == [1, 2, 4]


def test_nan_metric_warns_and_is_left_out(target, caplog):
    logger = TrialRunLogger(target, "smoke_00001", CONFIG, TRAIN_CONFIG, STEP_METRIC)
    logger.log_result(result(1, 0.1, loss=math.nan))
    assert logger.finish("completed", timeout_s=60)

    [run] = trial_runs(target)
    assert "train_loss" not in run.data.metrics
    assert history(target, run.info.run_id, "val/ndcg_at_100") == [(1, 0.1)]
    assert any("NaN or infinite train_loss" in record.getMessage() for record in caplog.records)


def test_failed_trial_has_error_tag_and_artifact(target, tmp_path):
    logger = TrialRunLogger(target, "smoke_00002", CONFIG, TRAIN_CONFIG, STEP_METRIC)
    logger.log_result(result(1, 0.1))
    try:
        raise FloatingPointError("training diverged at group epoch 2")
    except FloatingPointError as err:
        assert logger.finish("failed", err, timeout_s=60)

    [run] = trial_runs(target)
    client = new_client(target.tracking_uri)
    assert run.info.status == "FAILED"
    assert run.data.tags[TAG_ERROR] == "FloatingPointError: training diverged at group epoch 2"
    error_text = Path(client.download_artifacts(run.info.run_id, ERROR_ARTIFACT, str(tmp_path)))
    assert "Traceback" in error_text.read_text()


def test_unreachable_server_never_fails_trial(monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once the socket is closed
    target = TrackingTarget(f"http://127.0.0.1:{port}", "0", "0123456789abcdef0123456789abcdef")
    logger = TrialRunLogger(target, "smoke_00005", CONFIG, TRAIN_CONFIG, STEP_METRIC, outage_limit_s=2)
    logger.log_result(result(1, 0.1))

    start = time.monotonic()
    assert not logger.finish("completed", timeout_s=30)
    assert time.monotonic() - start < 10
    assert any("gave up logging trial smoke_00005" in record.getMessage() for record in caplog.records)


def test_retried_trial_continues_its_run(target):
    first = TrialRunLogger(target, "smoke_00003", CONFIG, TRAIN_CONFIG, STEP_METRIC)
    first.log_result(result(1, 0.1))
    first.log_result(result(2, 0.15))
    assert first.close(timeout_s=60)  # the attempt dies without ending its run

    second = TrialRunLogger(target, "smoke_00003", CONFIG, TRAIN_CONFIG, STEP_METRIC)
    second.log_result(result(2, 0.15))  # the retry starts again from its checkpoint of epoch 1
    second.log_result(result(3, 0.18))
    assert second.finish("completed", timeout_s=60)

    [run] = trial_runs(target)
    assert run.info.status == "FINISHED"
    assert history(target, run.info.run_id, "val/ndcg_at_100") == [(1, 0.1), (2, 0.15), (3, 0.18)]


def test_reconcile_sets_final_statuses(target):
    # Trial 0 was stopped by ASHA before its logger sent epoch 2; trial 1 never reached MLflow.
    stopped = TrialRunLogger(target, "smoke_00000", CONFIG, TRAIN_CONFIG, STEP_METRIC)
    stopped.log_result(result(1, 0.1))
    assert stopped.close(timeout_s=60)
    finished = TrialRunLogger(target, "smoke_00003", CONFIG, TRAIN_CONFIG, STEP_METRIC)
    finished.log_result(result(4, 0.3))
    assert finished.finish("completed", timeout_s=60)
    client = new_client(target.tracking_uri)
    finished_at = client.get_run(finished.run_id).info.end_time
    stray = client.create_run(target.experiment_id, tags={"mlflow.parentRunId": target.parent_run_id}, run_name="stray")
    other = {"aggregator": "maxpool", "embedding_size": 32, "lambda_mi": 2.0}
    pretraining = {"pretrain_user_reused": False, "pretrain_user_seconds": 1.5}
    outcomes = [
        TrialOutcome("smoke_00000", CONFIG, TRAIN_CONFIG, "stopped_early", [result(1, 0.1), result(2, 0.12)]),
        TrialOutcome("smoke_00001", other, {**TRAIN_CONFIG, **other}, "failed", [{**result(1, 0.05), **pretraining}], "ValueError: boom"),
        TrialOutcome("smoke_00002", {**CONFIG, "embedding_size": 32}, TRAIN_CONFIG, "unfinished", []),
        TrialOutcome("smoke_00003", CONFIG, TRAIN_CONFIG, "completed", [result(4, 0.3)]),
    ]

    assert reconcile_trial_runs(target, outcomes, STEP_METRIC) == 0

    runs = {run.data.tags.get(TAG_TRIAL_ID, run.info.run_name): run for run in trial_runs(target)}
    assert set(runs) == {"smoke_00000", "smoke_00001", "smoke_00002", "smoke_00003", "stray"}
    assert runs["smoke_00000"].info.status == "FINISHED"
    assert runs["smoke_00000"].data.tags[TAG_EARLY_STOPPED] == "true"
    assert history(target, runs["smoke_00000"].info.run_id, "val/ndcg_at_100") == [(1, 0.1), (2, 0.12)]
    assert runs["smoke_00001"].info.status == "FAILED"
    assert runs["smoke_00001"].info.run_name == "maxpool-d32-lambda2"
    assert runs["smoke_00001"].data.tags[TAG_ERROR] == "ValueError: boom"
    assert runs["smoke_00001"].data.tags["pretrain_user_reused"] == "false"
    assert runs["smoke_00001"].data.params["aggregator"] == "maxpool"
    assert runs["smoke_00002"].info.status == "KILLED"
    assert runs["smoke_00003"].info.status == "FINISHED"
    assert runs["smoke_00003"].info.end_time == finished_at
    assert history(target, runs["smoke_00003"].info.run_id, "val/ndcg_at_100") == [(4, 0.3)]
    assert runs["stray"].info.status == "KILLED"
    assert stray.info.run_id == runs["stray"].info.run_id


def test_resumed_search_continues_parent_run(target, tmp_path):
    new_client(target.tracking_uri).set_terminated(target.parent_run_id, "KILLED")

    folder = tmp_path / "runs" / "smoke"
    resumed = start_search_run(target.tracking_uri, "test_resumed_search_continues_parent_run", folder, resume=True, tags={})

    assert resumed.parent_run_id == target.parent_run_id
    assert new_client(target.tracking_uri).get_run(target.parent_run_id).info.status == "RUNNING"


def test_champion_registered_and_recommends(target, trained, monkeypatch):
    data, config, fitted = trained
    name = registered_model_name(f"smoke-{target.experiment_id}")
    metrics = {f"val/{key}": value for key, value in fitted.group.best_metrics.items() if "@" in key}
    logger = TrialRunLogger(target, "smoke_00004", CONFIG, config.to_dict(), STEP_METRIC)
    assert logger.finish("completed", timeout_s=60)

    version = log_champion(target, name, fitted.model, config, data.member_items, metrics, "smoke_00004", data_checksum=data.checksum)

    client = new_client(target.tracking_uri)
    assert client.get_model_version_by_alias(name, CHAMPION_ALIAS).version == version.version
    assert version.run_id == trial_runs(target)[0].info.run_id
    assert version.tags["config.aggregator"] == "attention"
    assert float(version.tags["val/ndcg_at_100"]) == pytest.approx(metrics["val/ndcg@100"])

    monkeypatch.setenv("MLFLOW_TRACKING_URI", target.tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", target.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION_ALIAS}")
    groups = [[0, 5, 9], [42], [7, 7, 100]]
    output = model.predict(groups, params={"k": 15})
    expected = recommend(fitted.model, data.member_items, groups, 15, config.member_norm)
    assert len(output) == 3
    for row, direct in zip(output, expected):
        assert len(set(row["items"])) == 15
        assert row["items"] == direct.items
        assert row["scores"] == pytest.approx(direct.scores, rel=1e-5)
        assert row["scores"] == sorted(row["scores"], reverse=True)
    from_frame = model.predict(pd.DataFrame({"users": groups}), params={"k": 15})
    assert [row["items"] for row in from_frame] == [row["items"] for row in output]
    assert len(model.predict([[1, 2]])[0]["items"]) == 10  # the default k

    with pytest.raises(UnknownUserError, match=f"{data.n_users + 3}"):
        model.predict([[1, 2], [data.n_users + 3]])


def test_second_champion_moves_alias(target, trained):
    data, config, fitted = trained
    name = registered_model_name(f"smoke-{target.experiment_id}")
    first = log_champion(target, name, fitted.model, config, data.member_items, {"val/ndcg@100": 0.1})
    second = log_champion(target, name, fitted.model, config, data.member_items, {"val/ndcg@100": 0.2})

    alias_version = new_client(target.tracking_uri).get_model_version_by_alias(name, CHAMPION_ALIAS)
    assert int(second.version) == int(first.version) + 1
    assert alias_version.version == second.version
