"""End-to-end searches with `search/run.py` on a local Ray runtime and a slice of Weeplaces."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
import yaml

from search.run import main
from search.checkpoints import load_checkpoint_model
from search.trainable import ATTEMPTS_FOLDER, PRETRAINING_FOLDER

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOKE_YAML = REPO_ROOT / "experiments" / "smoke.yaml"

pytestmark = pytest.mark.slow


def smoke_variant(folder: Path, name: str, train=None, axes=None, scheduler=None) -> Path:
    """Write smoke.yaml with another name and the given blocks replaced; return its path."""
    values = yaml.safe_load(SMOKE_YAML.read_text())
    values.update(name=name, base=str(REPO_ROOT / "experiments" / "default.yaml"))
    if train is not None:
        values["train"] = {**values["train"], **train}
    if axes is not None:
        values["search"]["axes"] = axes
    if scheduler is not None:
        values["scheduler"] = scheduler
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def run_search(experiment: Path, data: Path, storage: Path, *extra: str) -> int:
    return main(["--experiment", str(experiment), "--data", str(data), "--storage-path", str(storage), *extra])


def read_attempts(experiment_dir: Path) -> dict[str, list[dict]]:
    return {
        path.stem: [json.loads(line) for line in path.read_text().splitlines()]
        for path in sorted((experiment_dir / ATTEMPTS_FOLDER).glob("*.jsonl"))
    }


def test_smoke_search_completes(ray_address, slice_dir, tmp_path, capsys):
    code = run_search(SMOKE_YAML, slice_dir, tmp_path)

    experiment_dir = tmp_path / "smoke"
    trials = pd.read_csv(experiment_dir / "trials.csv")
    best = json.loads((experiment_dir / "best.json").read_text())
    output = capsys.readouterr().out
    assert code == 0
    assert len(trials) == 6
    assert not trials.duplicated(["embedding_size", "aggregator"]).any()
    assert set(trials["status"]) <= {"completed", "stopped_early"}
    assert (trials["status"] == "stopped_early").sum() >= 1
    assert (trials.loc[trials["status"] == "completed", "epochs_trained"] == 3).all()
    assert best["metrics"]["val/ndcg@100"] == pytest.approx(trials["val_ndcg@100"].max())
    best_row = trials.loc[trials["val_ndcg@100"].idxmax()]
    for name in ("recall@20", "recall@50", "ndcg@20", "ndcg@50"):
        assert best_row[f"val_{name}"] == pytest.approx(best["metrics"][f"val/{name}"])
    assert str(experiment_dir / "trials.csv") in output
    assert str(experiment_dir / "best.json") in output

    model, config, details = load_checkpoint_model(best["checkpoint"])
    assert details["epoch"] == best["epoch"]
    assert config.aggregator == best["config"]["aggregator"]
    assert config.embedding_size == best["config"]["embedding_size"]


def test_diverging_trial_fails_and_best_is_valid(ray_address, slice_dir, tmp_path):
    # lr 1e30 overflows the weights to inf within the first Adam steps, so the loss and
    # the scores become NaN: a real divergence, not an injected fault.
    experiment = smoke_variant(
        tmp_path, "diverging", axes={"lr": {"grid": [5.0e-3, 1.0e30]}, "aggregator": {"grid": ["meanpool"]}}
    )

    code = run_search(experiment, slice_dir, tmp_path)

    trials = pd.read_csv(tmp_path / "diverging" / "trials.csv").set_index("lr")
    best = json.loads((tmp_path / "diverging" / "best.json").read_text())
    assert code == 0
    assert trials.loc[1.0e30, "status"] == "failed"
    assert "diverged" in trials.loc[1.0e30, "error"]
    assert trials.loc[1.0e30, "attempts"] == 2  # max_failures 1: one retry
    assert trials.loc[5.0e-3, "status"] in ("completed", "stopped_early")
    assert best["config"]["lr"] == 5.0e-3


def test_tpe_search_samples_in_ranges(ray_address, slice_dir, tmp_path):
    experiment = smoke_variant(tmp_path, "tpe", axes={
        "lambda_mi": {"loguniform": [0.0625, 64.0]},
        "dropout": {"quniform": [0.0, 0.6, 0.1]},
        "aggregator": {"choice": ["meanpool", "attention"]},
    })
    values = yaml.safe_load(experiment.read_text())
    values["search"].update(algorithm="tpe", num_samples=3, seed=0)
    experiment.write_text(yaml.safe_dump(values))

    code = run_search(experiment, slice_dir, tmp_path)

    trials = pd.read_csv(tmp_path / "tpe" / "trials.csv")
    assert code == 0
    assert len(trials) == 3
    assert trials["lambda_mi"].between(0.0625, 64.0).all()
    assert trials["dropout"].between(0.0, 0.6).all()
    assert set(trials["aggregator"]) <= {"meanpool", "attention"}
    assert set(trials["status"]) <= {"completed", "stopped_early"}


def test_all_trials_failing_is_an_error(ray_address, slice_dir, tmp_path, capsys):
    experiment = smoke_variant(tmp_path, "all-diverging", axes={"lr": {"grid": [1.0e30]}})

    code = run_search(experiment, slice_dir, tmp_path)

    assert code == 1
    assert "all 1 trials failed" in capsys.readouterr().err
    assert not (tmp_path / "all-diverging" / "best.json").exists()


def test_trials_started_together_share_pretraining(ray_address, slice_dir, tmp_path):
    experiment = smoke_variant(
        tmp_path, "shared",
        train={"pretrain_user_epochs": 6, "aggregator": "meanpool"},
        axes={"lambda_mi": {"grid": [0.5, 2.0]}},
        scheduler={"grace_period": 1, "reduction_factor": 3, "max_epochs": 1},
    )

    code = run_search(experiment, slice_dir, tmp_path)

    experiment_dir = tmp_path / "shared"
    trials = pd.read_csv(experiment_dir / "trials.csv")
    stored = sorted(path.name.split("-")[0] for path in (experiment_dir / PRETRAINING_FOLDER).glob("*.pt"))
    starts = sorted(attempts[0]["time"] for attempts in read_attempts(experiment_dir).values())
    user_seconds = json.loads((experiment_dir / "best.json").read_text())["pretraining"]["pretrain_user_compute_seconds"]
    assert code == 0
    assert stored == ["mi", "user"]
    assert sorted(trials["pretrain_user_reused"]) == [False, True]
    assert sorted(trials["pretrain_mi_reused"]) == [False, True]
    # Both trials started before the first one had finished user pre-training.
    assert starts[1] - starts[0] < user_seconds


def start_driver(experiment: Path, data: Path, storage: Path, address: str, log: Path) -> subprocess.Popen:
    """Run `python search/run.py` as its own process, joined to the test's Ray runtime."""
    return subprocess.Popen(
        [sys.executable, "search/run.py", "--experiment", str(experiment), "--data", str(data),
         "--storage-path", str(storage), "--address", address],
        cwd=REPO_ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )


def wait_until_mid_search(driver: subprocess.Popen, experiment_dir: Path, log: Path) -> None:
    """Wait until a trial has ended and a later one has saved a checkpoint and is training on."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and driver.poll() is None:
        # With 2 CPUs, a third trial starts only after one of the first two has ended.
        attempts = read_attempts(experiment_dir)
        if len(attempts) >= 3:
            newest = max(attempts, key=lambda trial_id: attempts[trial_id][0]["time"])
            if len(list(experiment_dir.glob(f"*{newest}*/checkpoint_*"))) >= 2:
                break
        time.sleep(0.1)
    # Ray saves the experiment state every second (search/run.py); let it record a checkpoint.
    time.sleep(1.2)
    assert driver.poll() is None, f"the driver ended before it could be stopped: {log.read_text()}"


def ended_trials(experiment_dir: Path) -> set[str]:
    return {
        trial.trial_id for trial in ray.tune.ExperimentAnalysis(str(experiment_dir)).trials
        if trial.status in ("TERMINATED", "ERROR")
    }


# Trials of 40 epochs (a few seconds each on the slice) without early stopping, so that
# one is still training when the driver stops.
LONG_EPOCHS = 40
LONG_TRIALS = {
    "train": {"eval_freq": 5},
    "axes": {"embedding_size": {"grid": [16, 32]}, "aggregator": {"grid": ["maxpool", "meanpool"]}},
    "scheduler": {"grace_period": LONG_EPOCHS, "reduction_factor": 3, "max_epochs": LONG_EPOCHS},
}


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGINT], ids=["killed", "ctrl-c"])
def test_stopped_search_resumes_without_rerunning_trials(ray_address, slice_dir, tmp_path, stop_signal):
    experiment = smoke_variant(tmp_path, "stopped", **LONG_TRIALS)
    experiment_dir = tmp_path / "stopped"
    log = tmp_path / "driver.log"
    driver = start_driver(experiment, slice_dir, tmp_path, ray_address, log)
    wait_until_mid_search(driver, experiment_dir, log)

    driver.send_signal(stop_signal)
    driver_code = driver.wait(timeout=120)
    stopped_at = time.time()
    ended_before = ended_trials(experiment_dir)

    code = run_search(experiment, slice_dir, tmp_path, "--resume")

    trials = pd.read_csv(experiment_dir / "trials.csv")
    attempts = read_attempts(experiment_dir)
    resumed_from = [attempt["start_epoch"] for runs in attempts.values() for attempt in runs if attempt["time"] > stopped_at]
    if stop_signal == signal.SIGINT:
        assert driver_code == 130
        assert "--resume" in log.read_text()
    # The driver's output is the progress table, not one TensorBoard renaming line per result.
    assert "is illegal" not in log.read_text()
    assert code == 0
    assert 0 < len(ended_before) < 4
    assert len(trials) == 4
    assert trials["trial_id"].is_unique
    assert not trials.duplicated(["embedding_size", "aggregator"]).any()
    assert (trials["status"] == "completed").all()
    assert (trials["epochs_trained"] == LONG_EPOCHS).all()
    for trial_id in ended_before:
        assert all(attempt["time"] < stopped_at for attempt in attempts[trial_id]), trial_id
    assert max(resumed_from) > 0, "no trial continued from a checkpoint"


def test_resume_without_search_is_an_error(ray_address, slice_dir, tmp_path, capsys):
    code = run_search(SMOKE_YAML, slice_dir, tmp_path, "--resume")

    assert code == 2
    assert "no search to resume" in capsys.readouterr().err


def test_storage_path_file_is_an_error(slice_dir, tmp_path, capsys):
    experiment = smoke_variant(tmp_path, "on-a-file")
    not_a_folder = tmp_path / "results.txt"
    not_a_folder.write_text("kept\n")

    code = run_search(experiment, slice_dir, not_a_folder)

    assert code == 2
    assert f"cannot create the storage folder {not_a_folder}" in capsys.readouterr().err
    assert not_a_folder.read_text() == "kept\n"


def test_second_start_in_same_folder_is_an_error(ray_address, slice_dir, tmp_path, capsys):
    experiment = smoke_variant(tmp_path, "twice", axes={"aggregator": {"grid": ["meanpool"]}},
                               scheduler={"grace_period": 1, "reduction_factor": 3, "max_epochs": 1})
    assert run_search(experiment, slice_dir, tmp_path) == 0

    code = run_search(experiment, slice_dir, tmp_path)

    assert code == 2
    assert "--resume" in capsys.readouterr().err


def test_running_search_blocks_second_driver(slice_dir, tmp_path, capsys):
    from filelock import FileLock

    from search.run import main

    experiment = smoke_variant(tmp_path, "locked", axes={"aggregator": {"grid": ["meanpool"]}},
                               scheduler={"grace_period": 1, "reduction_factor": 3, "max_epochs": 1})
    storage = tmp_path / "storage"
    storage.mkdir()
    # A lock held by this process stands for a driver that is still running.
    with FileLock(storage / ".locked.lock"):
        for extra in ([], ["--resume"]):
            code = main(["--experiment", str(experiment), "--data", str(slice_dir),
                         "--storage-path", str(storage), *extra])
            assert code == 2
            assert "another search is running" in capsys.readouterr().err
