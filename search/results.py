"""The outcome of a search: one row per trial (trials.csv) and the best trial (best.json)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune

from groupim.metrics import METRICS, SELECTION_METRIC
from groupim.train import is_eval_epoch
from search.experiment import Experiment
from search.storage import RemotePath, location_on
from search.trainable import ATTEMPTS_FOLDER, TIME_ATTR, TUNE_METRIC, VALIDATION_PREFIX

TRIALS_CSV = "trials.csv"
BEST_JSON = "best.json"

# Trial statuses in trials.csv.
COMPLETED = "completed"  # trained until the last evaluation epoch
STOPPED_EARLY = "stopped_early"  # ASHA stopped it at a rung
FAILED = "failed"  # raised (NaN metrics, a crash) on every allowed attempt
UNFINISHED = "unfinished"  # pending or running when the driver stopped

# Metrics of each trial's best epoch written to trials.csv; the column is "val_" + name.
TRIAL_METRICS = (SELECTION_METRIC, "ndcg@20", "ndcg@50", "recall@20", "recall@50")


@dataclass(frozen=True)
class SearchSummary:
    rows: list[dict[str, Any]]  # one per trial, the columns of trials.csv
    best: dict[str, Any] | None  # the content of best.json, None when no trial succeeded
    pretraining: dict[str, dict[str, float]]  # per phase: computed, reused, compute_seconds, saved_seconds

    @property
    def interrupted(self) -> bool:
        """Some trial is pending or running: the driver stopped before the search ended."""
        return any(row["status"] == UNFINISHED for row in self.rows)


def summarize(experiment: Experiment, result_grid: tune.ResultGrid) -> SearchSummary:
    """Collect every trial of a finished or interrupted search; Ray must be initialised."""
    # The analysis has every trial with its status and configuration; the result grid has
    # each trial's kept checkpoints and error.
    analysis = tune.ExperimentAnalysis(str(experiment.path), default_metric=TUNE_METRIC, default_mode="max")
    results = {result.path: result for result in result_grid}
    last_epoch = last_evaluation_epoch(experiment)
    rows, details = [], {}
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        result = results.get(trial.path)
        history = result.metrics_dataframe if result is not None else None
        row, detail = _trial_row(experiment, trial, result, history, last_epoch)
        rows.append(row)
        details[row["trial_id"]] = detail
    pretraining = pretraining_totals([detail["pretraining"] for detail in details.values()])
    best = _best(experiment, rows, details)
    if best is not None:
        best["pretraining_totals"] = pretraining
    return SearchSummary(rows, best, pretraining)


def pretraining_totals(trial_pretraining: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Count how often each pre-training phase was computed and reused, and the trial time reuse saved.

    A reusing trial saves the seconds the computing trial spent, less its own wait and load.
    """
    totals = {}
    for phase in ("user", "mi"):
        entries = [info for info in trial_pretraining if f"pretrain_{phase}_reused" in info]
        computed = [info for info in entries if not info[f"pretrain_{phase}_reused"]]
        reused = [info for info in entries if info[f"pretrain_{phase}_reused"]]
        totals[phase] = {
            "computed": len(computed),
            "reused": len(reused),
            "compute_seconds": sum(info[f"pretrain_{phase}_seconds"] for info in computed),
            "saved_seconds": sum(
                info[f"pretrain_{phase}_compute_seconds"] - info[f"pretrain_{phase}_seconds"] for info in reused
            ),
        }
    return totals


def last_evaluation_epoch(experiment: Experiment) -> int:
    """Return the last group epoch that reports, which a completed trial reaches."""
    epochs = experiment.scheduler.max_epochs
    return max((e + 1 for e in range(epochs) if is_eval_epoch(e, epochs, experiment.train)), default=0)


def _trial_row(experiment: Experiment, trial, result, history: pd.DataFrame | None, last_epoch: int):
    row: dict[str, Any] = {"trial_id": trial.trial_id}
    row.update({axis.name: trial.config.get(axis.name) for axis in experiment.axes})

    reported = history is not None and TUNE_METRIC in getattr(history, "columns", ())
    epochs = int(history[TIME_ATTR].max()) if reported else 0
    if trial.status == "ERROR":
        status = FAILED
    elif trial.status != "TERMINATED":
        status = UNFINISHED
    else:
        status = COMPLETED if epochs >= last_epoch else STOPPED_EARLY
    row.update(status=status, epochs_trained=epochs)

    best_row = None
    if reported and history[TUNE_METRIC].notna().any():
        best_row = history.loc[history[TUNE_METRIC].idxmax()]
    row["best_epoch"] = int(best_row[TIME_ATTR]) if best_row is not None else None
    for name in TRIAL_METRICS:
        row[f"val_{name}"] = float(best_row[VALIDATION_PREFIX + name]) if best_row is not None else None

    last = history.iloc[-1] if reported else None
    for phase in ("user", "mi"):
        column = f"pretrain_{phase}_reused"
        row[column] = bool(last[column]) if last is not None and column in last else None
    # Seconds this trial spent in pre-training: computing, or waiting for and loading a shared state.
    seconds = [last[f"pretrain_{phase}_seconds"] for phase in ("user", "mi") if last is not None and f"pretrain_{phase}_seconds" in last]
    row["pretrain_seconds"] = float(sum(seconds)) if seconds else None
    attempts = _read_attempts(experiment, trial.trial_id)
    row["attempts"] = len(attempts)
    # The Ray node of the trial's last start; on a cluster, retries may run elsewhere.
    row["node_id"] = attempts[-1].get("node_id", "") if attempts else ""
    row["failures"] = trial.num_failures
    row["error"] = _error_line(result) if status == FAILED else ""
    row["checkpoint"] = _best_checkpoint(result, best_row)

    detail = {
        "config": dict(trial.config),
        "metrics": {name: float(best_row[VALIDATION_PREFIX + name]) for name in METRICS} if best_row is not None else {},
        "pretraining": _pretraining(last),
    }
    return row, detail


def _best_checkpoint(result, best_row) -> str | None:
    """Path or URI of the checkpoint saved at the trial's best epoch, if it is still kept."""
    if result is None or best_row is None:
        return None
    for checkpoint, metrics in result.best_checkpoints:
        if metrics.get(TIME_ATTR) == best_row[TIME_ATTR]:
            # checkpoint.path has no scheme: for S3 it is bucket/key on checkpoint.filesystem.
            return str(location_on(checkpoint.filesystem, checkpoint.path))
    return None


def _pretraining(last) -> dict[str, Any]:
    if last is None:
        return {}
    return {key: _plain(last[key]) for key in last.index if str(key).startswith("pretrain_")}


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _read_attempts(experiment: Experiment, trial_id: str) -> list[dict[str, Any]]:
    """Return the trial's starts recorded by search.trainable.record_attempt, oldest first."""
    path = experiment.path / ATTEMPTS_FOLDER / f"{trial_id}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _error_line(result) -> str:
    """Return the last line of the trial's error, which names the exception and its message."""
    if result is None or result.error is None:
        return "failed (no error recorded)"
    lines = [line.strip() for line in str(result.error).splitlines() if line.strip()]
    return lines[-1] if lines else type(result.error).__name__


def _best(experiment: Experiment, rows: list[dict[str, Any]], details: dict[str, dict]) -> dict[str, Any] | None:
    """Build best.json: the trial with the highest validation NDCG@100 among those that did not fail."""
    candidates = [
        row for row in rows
        if row["status"] in (COMPLETED, STOPPED_EARLY) and row[f"val_{SELECTION_METRIC}"] is not None
        and math.isfinite(row[f"val_{SELECTION_METRIC}"])
    ]
    if not candidates:
        return None
    best = max(candidates, key=lambda row: row[f"val_{SELECTION_METRIC}"])
    detail = details[best["trial_id"]]
    return {
        "experiment": experiment.name,
        "trial_id": best["trial_id"],
        "config": {axis.name: best[axis.name] for axis in experiment.axes},
        "train_config": experiment.trial_config(detail["config"]).to_dict(),
        "epoch": best["best_epoch"],
        "metrics": {VALIDATION_PREFIX + name: value for name, value in detail["metrics"].items()},
        "checkpoint": best["checkpoint"],
        "pretraining": detail["pretraining"],
    }


def write_results(experiment: Experiment, summary: SearchSummary) -> tuple[Path | RemotePath, Path | RemotePath | None]:
    """Write trials.csv and, when a trial succeeded, best.json; return their paths."""
    trials_path = experiment.path / TRIALS_CSV
    trials_path.write_text(pd.DataFrame(summary.rows).to_csv(index=False))
    if summary.best is None:
        return trials_path, None
    best_path = experiment.path / BEST_JSON
    best_path.write_text(json.dumps(summary.best, indent=2) + "\n")
    return trials_path, best_path
