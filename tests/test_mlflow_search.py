"""MLflow logging of a whole `search/run.py` search that is killed and resumed."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from search.registry import CHAMPION_ALIAS, registered_model_name
from search.run import main
from search.tracking import PARENT_RUN_FILE, TAG_TRIAL_ID, new_client

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOKE_YAML = REPO_ROOT / "experiments" / "smoke.yaml"
EPOCHS = 40  # a trial takes a few seconds on the slice, so one is still training when the driver dies
EVAL_EPOCHS = list(range(5, EPOCHS + 1, 5))


def write_experiment(folder: Path) -> Path:
    """Four trials of EPOCHS group epochs each, evaluated every 5 epochs, without early stopping."""
    values = yaml.safe_load(SMOKE_YAML.read_text())
    values.update(name="resumed", base=str(REPO_ROOT / "experiments" / "default.yaml"))
    values["train"] = {**values["train"], "eval_freq": 5}
    values["search"]["axes"] = {"embedding_size": {"grid": [16, 32]}, "aggregator": {"grid": ["maxpool", "meanpool"]}}
    values["scheduler"] = {"grace_period": EPOCHS, "reduction_factor": 3, "max_epochs": EPOCHS}
    path = folder / "resumed.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def nested_runs(client, parent: dict) -> list:
    query = f"tags.`mlflow.parentRunId` = '{parent['parent_run_id']}'"
    return client.search_runs([parent["experiment_id"]], query)


def wait_for_finished_and_running_trial(driver: subprocess.Popen, uri: str, parent_file: Path, log: Path) -> None:
    """Wait until one trial run has FINISHED and another is RUNNING with results logged."""
    client = new_client(uri)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and driver.poll() is None:
        try:
            runs = nested_runs(client, json.loads(parent_file.read_text())) if parent_file.is_file() else []
        except Exception:  # noqa: BLE001 - SQLite may be locked by a writer; poll again
            runs = []
        if runs:
            finished = [run for run in runs if run.info.status == "FINISHED"]
            running = [run for run in runs if run.info.status == "RUNNING" and run.data.metrics.get("val/ndcg_at_100")]
            if finished and running:
                break
        time.sleep(0.5)
    # Ray saves the experiment state every second (search/run.py); let it record the latest checkpoint.
    time.sleep(1.2)
    assert driver.poll() is None, f"the driver ended before it could be killed: {log.read_text()}"


def test_resumed_search_creates_no_duplicate_runs(ray_address, slice_dir, tmp_path):
    experiment = write_experiment(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    options = ["--experiment", str(experiment), "--data", str(slice_dir), "--storage-path", str(tmp_path), "--tracking-uri", uri]
    parent_file = tmp_path / "resumed" / PARENT_RUN_FILE
    log = tmp_path / "driver.log"
    driver = subprocess.Popen(
        [sys.executable, "search/run.py", *options, "--address", ray_address],
        cwd=REPO_ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    wait_for_finished_and_running_trial(driver, uri, parent_file, log)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    client = new_client(uri)
    parent = json.loads(parent_file.read_text())
    before = {run.data.tags[TAG_TRIAL_ID]: run.info.run_id for run in nested_runs(client, parent)}

    code = main([*options, "--resume"])

    trials = pd.read_csv(tmp_path / "resumed" / "trials.csv")
    runs = nested_runs(client, parent)
    trial_ids = [run.data.tags[TAG_TRIAL_ID] for run in runs]
    assert code == 0
    assert json.loads(parent_file.read_text())["parent_run_id"] == parent["parent_run_id"]
    assert client.get_run(parent["parent_run_id"]).info.status == "FINISHED"
    assert len(runs) == 4
    assert sorted(trial_ids) == sorted(trials["trial_id"])
    for trial_id, run_id in before.items():
        assert {run.info.run_id for run in runs if run.data.tags[TAG_TRIAL_ID] == trial_id} == {run_id}
    for run in runs:
        steps = [metric.step for metric in client.get_metric_history(run.info.run_id, "val/ndcg_at_100")]
        assert run.info.status == "FINISHED", run.info.run_name
        assert run.data.tags["early_stopped"] == "false"
        assert sorted(steps) == EVAL_EPOCHS, run.info.run_name
    champion = client.get_model_version_by_alias(registered_model_name("resumed"), CHAMPION_ALIAS)
    assert champion.run_id in {run.info.run_id for run in runs}

    # Resuming the finished search changes nothing and registers no second copy of the champion.
    assert main([*options, "--resume"]) == 0
    versions = client.search_model_versions(f"name = '{registered_model_name('resumed')}'")
    assert [version.version for version in versions] == [champion.version]
    assert len(nested_runs(client, parent)) == 4
