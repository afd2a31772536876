"""The final test report (`search/report.py`) after a real smoke search, and its building blocks.

The end-to-end tests share one smoke search on a slice of Weeplaces with a local Ray
runtime and a SQLite MLflow store in a temporary folder, and one report on its champion
with 2 seeds and 2 group epochs.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import torch
from matplotlib import image
from scipy import stats

from groupim.checkpoint import load_checkpoint
from groupim.config import ConfigError, TrainConfig
from groupim.data import load_dataset, write_slice
from groupim.metrics import METRICS
from search.checkpoints import load_checkpoint_model
from search.report import check_options, build_parser, main as report_main
from search.report_plots import plot_search_landscape
from search.report_seeds import evaluate_test_splits
from search.report_source import ReportError, config_from_params, parse_model_uri
from search.report_tracking import TAG_REPORT_RUN, TAG_SEARCH_PARENT_RUN, trial_runs
from search.report_writer import PUBLISHED, build_report, render_markdown, summarize
from search.run import main as search_main, ray_runtime_env
from search.tracking import TAG_TRIAL_ID, config_params, new_client, resolve_tracking_uri

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOKE_YAML = REPO_ROOT / "experiments" / "smoke.yaml"
MODEL_NAME = "groupim-smoke"  # search.registry.registered_model_name("smoke")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHORT_SCHEDULE = ["epochs=2"]


# ---------------------------------------------------------------------------
# Statistics, configuration and rendering, without Ray or MLflow
# ---------------------------------------------------------------------------

def test_summarize_hand_computed():
    summary = summarize([0.1, 0.2, 0.3])

    # mean 0.2, sample std 0.1, t(0.975, df=2) = 4.302652729911275, half width t * 0.1 / sqrt(3)
    half_width = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert summary.n == 3
    assert summary.mean == pytest.approx(0.2)
    assert summary.std == pytest.approx(0.1)
    assert summary.ci_low == pytest.approx(0.2 - half_width)
    assert summary.ci_high == pytest.approx(0.2 + half_width)


def test_summarize_skips_failed_seeds():
    summary = summarize([0.4, math.nan, 0.6, None])

    assert summary.n == 2
    assert summary.mean == pytest.approx(0.5)
    assert summary.std == pytest.approx(math.sqrt(0.02))


def test_summarize_one_seed_has_no_spread():
    summary = summarize([0.3])

    assert summary.mean == 0.3
    assert math.isnan(summary.std)
    assert math.isnan(summary.ci_low)
    assert math.isnan(summary.ci_high)


def test_config_from_params_round_trip():
    config = TrainConfig(lr=5e-5, lambda_mi=0.0625, aggregator="maxpool", num_threads=None, shuffle=False)
    params = {param.key: param.value for param in config_params(config.to_dict())}

    assert config_from_params(params, "params") == config


def test_config_from_params_names_missing_settings():
    params = {param.key: param.value for param in config_params(TrainConfig().to_dict())}
    del params["lambda_mi"]

    with pytest.raises(ReportError, match="lambda_mi"):
        config_from_params(params, "params")


@pytest.mark.parametrize("uri, expected", [
    ("models:/groupim-smoke@champion", ("groupim-smoke", "champion", None)),
    ("models:/groupim-smoke/3", ("groupim-smoke", None, "3")),
])
def test_parse_model_uri_valid(uri, expected):
    assert parse_model_uri(uri) == expected


@pytest.mark.parametrize("uri", ["groupim-smoke@champion", "models:/groupim-smoke", "runs:/abc/model", "models:/a/b/c"])
def test_parse_model_uri_invalid(uri):
    with pytest.raises(ReportError, match="models:/NAME@ALIAS"):
        parse_model_uri(uri)


@pytest.mark.parametrize("option, message", [
    (["--set", "num_threads=2"], "num_threads"),
    (["--set", "no_such_setting=1"], "no_such_setting"),
    (["--seeds", "0"], "--seeds"),
])
def test_report_options_rejected(option, message):
    args = build_parser().parse_args(option)

    with pytest.raises((ConfigError, ReportError), match=message):
        check_options(args)


def test_markdown_lists_failed_seed():
    seeds = [
        {"seed": 1, "error": None, "best_epoch": 2, "seconds": 60.0, "validation": {"ndcg@100": 0.5},
         "test_groups": dict.fromkeys(METRICS, 0.5), "test_users": dict.fromkeys(METRICS, 0.25), "history": []},
        {"seed": 2, "error": "TrainingDiverged: group training diverged in epoch 1", "best_epoch": None,
         "seconds": None, "validation": {}, "test_groups": {}, "test_users": {}, "history": []},
    ]
    report = build_report(
        source={"description": "models:/m/1", "experiment": "smoke"}, config=TrainConfig().to_dict(), overrides={},
        seeds=seeds, registered=None, data={"source": "d", "checksum": "c", "n_users": 3, "n_items": 4,
                                           "test_groups": 1, "test_users": 1},
        versions={"python": "3"}, wall_time={"report_seconds": 1.0, "seeds_seconds": 1.0}, plots={},
    )
    text = render_markdown(report)

    assert report["summary"]["test_groups"]["ndcg@20"]["n"] == 1
    assert report["summary"]["test_groups"]["ndcg@20"]["std"] is None  # NaN becomes null in JSON
    assert "| 2 | failed |" in text
    assert "seed 2: TrainingDiverged" in text
    assert "| mean ± std over 1 seeds | 0.5000 |" in text
    json.dumps(report, allow_nan=False)


def test_landscape_without_positive_lambda_raises(tmp_path):
    trials = pd.DataFrame({
        "aggregator": ["maxpool"], "embedding_size": [32], "lambda_mi": [0.0],
        "best_val_ndcg@100": [0.4], "stopped_early": [False],
    })

    with pytest.raises(ValueError, match="lambda_mi > 0"):
        plot_search_landscape(trials, tmp_path / "landscape.png")


# ---------------------------------------------------------------------------
# End to end: smoke search, report, recommend
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_runtime():
    """A local Ray runtime with 2 CPUs, shared by the search and the report's seeds."""
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=ray_runtime_env())
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def slice_dir(weeplaces_dir, tmp_path_factory):
    """200 training and 60 validation and test groups: a seed trains in a few seconds."""
    return write_slice(weeplaces_dir, tmp_path_factory.mktemp("data") / "weeplaces", (200, 60, 60))


@pytest.fixture(scope="module")
def searched(ray_runtime, slice_dir, tmp_path_factory):
    """A finished smoke search logged to a SQLite store; returns its folder and the tracking URI."""
    folder = tmp_path_factory.mktemp("searched")
    tracking_uri = resolve_tracking_uri("sqlite:///mlflow.db", cwd=folder)
    code = search_main([
        "--experiment", str(SMOKE_YAML), "--data", str(slice_dir), "--storage-path", str(folder / "runs"),
        "--tracking-uri", tracking_uri,
    ])
    assert code == 0
    return {"experiment_dir": folder / "runs" / "smoke", "tracking_uri": tracking_uri}


@pytest.fixture(scope="module")
def reported(searched, tmp_path_factory):
    """The report on the smoke search's champion, with 2 seeds and a 2-epoch schedule."""
    output = tmp_path_factory.mktemp("report") / "smoke"
    code = report_main([
        "--experiment", str(SMOKE_YAML), "--tracking-uri", searched["tracking_uri"], "--seeds", "2",
        "--output", str(output), "--set", *SHORT_SCHEDULE,
    ])
    assert code == 0
    return {**searched, "output": output, "report": json.loads((output / "report.json").read_text())}


@pytest.fixture
def one_thread():
    """Evaluate with one torch thread, as the report's seed tasks do, so that scores match bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_report_files_exist(reported):
    output, report = reported["output"], reported["report"]

    for name in ("report.md", "report.json", "validation_ndcg100.png", "search_landscape.png"):
        assert (output / name).is_file(), name
    assert [seed["seed"] for seed in report["seeds"]] == [1111, 1112]
    assert all(seed["error"] is None for seed in report["seeds"])
    assert all((output / seed["checkpoint"]).is_file() for seed in report["seeds"])
    assert report["config"]["epochs"] == 2
    assert report["overrides"] == {"epochs": 2}
    assert report["source"]["model_uri"] == f"models:/{MODEL_NAME}/1"
    assert report["published"]["rows"] == PUBLISHED


@pytest.mark.slow
def test_report_numbers_match_direct_evaluation(reported, slice_dir, one_thread):
    output, report = reported["output"], reported["report"]
    data = load_dataset(slice_dir)

    for seed in report["seeds"]:
        model, config, _ = load_checkpoint(output / seed["checkpoint"])
        assert config.seed == seed["seed"]
        direct = evaluate_test_splits(model, data, config.member_norm)
        for split in ("test_groups", "test_users"):
            assert seed[split] == pytest.approx(direct[split], abs=1e-12), (seed["seed"], split)

    best = json.loads((reported["experiment_dir"] / "best.json").read_text())
    champion, config, _ = load_checkpoint_model(best["checkpoint"])
    direct = evaluate_test_splits(champion, data, config.member_norm)
    registered = report["registered_checkpoint"]
    assert registered["label"] == "registered version 1"
    for split in ("test_groups", "test_users"):
        assert registered[split] == pytest.approx(direct[split], abs=1e-12), split


@pytest.mark.slow
def test_report_summary_matches_seeds(reported):
    report = reported["report"]
    markdown = (reported["output"] / "report.md").read_text()

    for split in ("test_groups", "test_users"):
        for name in METRICS:
            values = np.array([seed[split][name] for seed in report["seeds"]])
            summary = report["summary"][split][name]
            half_width = stats.t.ppf(0.975, df=1) * values.std(ddof=1) / math.sqrt(2)
            assert summary["mean"] == pytest.approx(values.mean())
            assert summary["std"] == pytest.approx(values.std(ddof=1))
            assert summary["ci_low"] == pytest.approx(values.mean() - half_width)
            assert summary["ci_high"] == pytest.approx(values.mean() + half_width)
    ndcg = report["summary"]["test_groups"]["ndcg@20"]
    assert f"{ndcg['mean']:.4f} ± {ndcg['std']:.4f}" in markdown
    assert report["data"]["checksum"] in markdown


@pytest.mark.slow
def test_report_plots_are_png(reported):
    for name in ("validation_ndcg100.png", "search_landscape.png"):
        path = reported["output"] / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        pixels = image.imread(path)  # [height, width, RGBA]
        assert pixels.ndim == 3, name
        assert pixels.shape[0] > 100, name
        assert pixels.shape[1] > 100, name


@pytest.mark.slow
def test_report_logged_as_mlflow_run(reported):
    client = new_client(reported["tracking_uri"])
    report = reported["report"]
    run = client.get_run(report["source"]["report_run_id"])
    parent_id = report["source"]["search_parent_run_id"]

    assert run.info.status == "FINISHED"
    assert run.data.tags[TAG_SEARCH_PARENT_RUN] == parent_id
    assert client.get_run(parent_id).data.tags[TAG_REPORT_RUN] == run.info.run_id
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "report.json", "validation_ndcg100.png", "search_landscape.png"} <= artifacts
    mean = report["summary"]["test_groups"]["ndcg@20"]["mean"]
    assert run.data.metrics["test_groups/ndcg_at_20_mean"] == pytest.approx(mean)


@pytest.mark.slow
def test_no_trial_run_has_test_metric(reported):
    client = new_client(reported["tracking_uri"])
    parent = client.get_run(reported["report"]["source"]["search_parent_run_id"])
    runs = trial_runs(client, parent.info.experiment_id, parent.info.run_id)

    assert len(runs) == 6  # one per smoke configuration
    for run in runs:
        keys = set(run.data.metrics)
        assert keys, run.info.run_name
        assert not [key for key in keys if "test" in key.lower()], run.info.run_name
    assert not [key for key in parent.data.metrics if "test" in key.lower()]


@pytest.mark.slow
def test_report_on_trial_run(reported, tmp_path, slice_dir, one_thread):
    trials = pd.read_csv(reported["experiment_dir"] / "trials.csv", dtype={"trial_id": str})
    trial = trials[trials["checkpoint"].notna()].sort_values("val_ndcg@100").iloc[0]  # the worst kept one
    client = new_client(reported["tracking_uri"])
    parent_id = reported["report"]["source"]["search_parent_run_id"]
    run = [run for run in trial_runs(client, client.get_run(parent_id).info.experiment_id, parent_id)
           if run.data.tags[TAG_TRIAL_ID] == trial["trial_id"]][0]

    code = report_main([
        "--run-id", run.info.run_id, "--tracking-uri", reported["tracking_uri"], "--seeds", "1",
        "--output", str(tmp_path), "--set", "epochs=1",
    ])

    report = json.loads((tmp_path / "report.json").read_text())
    model, config, _ = load_checkpoint_model(trial["checkpoint"])
    direct = evaluate_test_splits(model, load_dataset(slice_dir), config.member_norm)
    assert code == 0
    assert report["source"]["run_id"] == run.info.run_id
    assert report["config"]["aggregator"] == trial["aggregator"]
    assert report["config"]["embedding_size"] == trial["embedding_size"]
    assert report["registered_checkpoint"]["label"] == f"best checkpoint of trial {trial['trial_id']}"
    assert report["registered_checkpoint"]["test_groups"] == pytest.approx(direct["test_groups"], abs=1e-12)


def run_recommend(tracking_uri: str, *options: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    return subprocess.run(
        [sys.executable, "-m", "groupim.cli", "recommend", "--model", f"models:/{MODEL_NAME}@champion", *options],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120,
    )


@pytest.mark.slow
def test_recommend_champion_returns_k_distinct_items(reported, slice_dir):
    data = load_dataset(slice_dir)
    members = data.test_groups.group_members[0].indices.tolist()  # the first test group's users

    result = run_recommend(reported["tracking_uri"], "--users", ",".join(map(str, members)), "--k", "10", "--json")

    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["users"] == members
    assert len(output["items"]) == 10
    assert len(set(output["items"])) == 10
    assert all(0 <= item < data.n_items for item in output["items"])
    assert output["scores"] == sorted(output["scores"], reverse=True)


@pytest.mark.slow
def test_recommend_champion_rejects_unknown_user(reported, slice_dir):
    n_users = load_dataset(slice_dir).n_users

    result = run_recommend(reported["tracking_uri"], "--users", f"1,{n_users + 5}", "--k", "5")

    assert result.returncode == 2
    assert f"unknown user id(s) {n_users + 5}" in result.stderr


@pytest.mark.slow
def test_recommend_champion_rejects_large_k(reported, slice_dir):
    n_items = load_dataset(slice_dir).n_items

    result = run_recommend(reported["tracking_uri"], "--users", "1,2", "--k", str(n_items + 1))

    assert result.returncode == 2
    assert f"invalid k={n_items + 1}" in result.stderr


@pytest.mark.slow
def test_report_unknown_model_is_usage_error(searched, tmp_path, capsys):
    code = report_main([
        "--model", "models:/no-such-model@champion", "--tracking-uri", searched["tracking_uri"],
        "--output", str(tmp_path),
    ])

    assert code == 2
    assert "models:/no-such-model@champion not found" in capsys.readouterr().err


@pytest.mark.slow
def test_report_rejects_other_data(searched, weeplaces_dir, tmp_path, capsys):
    other = write_slice(weeplaces_dir, tmp_path / "other", (100, 30, 30))

    code = report_main([
        "--model", f"models:/{MODEL_NAME}@champion", "--tracking-uri", searched["tracking_uri"],
        "--data", str(other), "--output", str(tmp_path / "report"),
    ])

    assert code == 2
    assert "pass --data DIR with the data the search used" in capsys.readouterr().err
