"""The MLflow side of a final test report: the search's trials read back, and the report's own run.

The report run goes to the search's MLflow experiment as a top-level run, tagged with the
search's parent run id, and the parent run gets the report run's id as a tag. It is not
nested under the parent run, so the nested runs of a search remain its trials, and none of
them contains a test metric.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_SOURCE_NAME

from groupim.metrics import METRICS
from search.report_plots import AGGREGATOR, BEST_METRIC, EMBEDDING_SIZE, LAMBDA, STOPPED_EARLY
from search.report_source import ReportSource
from search.tracking import TAG_EARLY_STOPPED, TAG_TRIAL_ID, TAG_VALUE_LIMIT, call_with_retry, metric_key
from search.trainable import TUNE_METRIC

logger = logging.getLogger(__name__)

TAG_SEARCH_PARENT_RUN = "search_parent_run_id"  # on the report run: the search it reports on
TAG_REPORT_RUN = "report_run_id"  # on the search's parent run: its latest report run
TAG_REPORT_SOURCE = "report_source"  # on the report run: the model URI or run it retrained
PARAM_VALUE_LIMIT = 6000  # characters; MLflow 3 rejects longer parameter values


def trial_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list:
    """Return every trial run of a search: the nested runs of its parent run that carry a trial id."""
    query = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'"
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        runs.extend(run for run in page if TAG_TRIAL_ID in run.data.tags)
        token = page.token
        if not token:
            return runs


def search_landscape(client: MlflowClient, experiment_id: str, parent_run_id: str) -> pd.DataFrame:
    """Tabulate the search's trials: aggregator, embedding size, lambda and best validation NDCG@100.

    The best value is the maximum of the metric's history, so a trial that ASHA stopped
    early counts with the best epoch it reached. Failed trials and trials that never
    reported are left out.
    """
    key = metric_key(TUNE_METRIC)
    rows = []
    for run in trial_runs(client, experiment_id, parent_run_id):
        if run.info.status == RunStatus.to_string(RunStatus.FAILED):
            continue
        values = [metric.value for metric in client.get_metric_history(run.info.run_id, key) if math.isfinite(metric.value)]
        params = run.data.params
        if not values or not {AGGREGATOR, EMBEDDING_SIZE, LAMBDA} <= set(params):
            continue
        rows.append({
            "run_id": run.info.run_id,
            "trial_id": run.data.tags[TAG_TRIAL_ID],
            AGGREGATOR: params[AGGREGATOR],
            EMBEDDING_SIZE: int(params[EMBEDDING_SIZE]),
            LAMBDA: float(params[LAMBDA]),
            BEST_METRIC: max(values),
            STOPPED_EARLY: run.data.tags.get(TAG_EARLY_STOPPED) == "true",
        })
    return pd.DataFrame(rows, columns=["run_id", "trial_id", AGGREGATOR, EMBEDDING_SIZE, LAMBDA, BEST_METRIC, STOPPED_EARLY])


def start_report_run(client: MlflowClient, source: ReportSource, data_checksum: str, git_commit: str | None) -> str:
    """Create the report's run in the search's experiment, tagged with the search's parent run; return its id."""
    tags = {
        TAG_SEARCH_PARENT_RUN: source.parent_run_id,
        TAG_REPORT_SOURCE: source.model_uri or source.run_id,
        MLFLOW_SOURCE_NAME: "search/report.py",
        MLFLOW_GIT_COMMIT: git_commit,
        "data_checksum": data_checksum,
    }
    tags = {key: str(value)[:TAG_VALUE_LIMIT] for key, value in tags.items() if value is not None}
    if source.model_uri is not None:
        run_name = "report-" + source.model_uri.removeprefix("models:/").replace("/", "-v")
    else:
        run_name = f"report-run-{source.run_id[:8]}"
    run = call_with_retry(lambda: client.create_run(source.experiment_id, tags=tags, run_name=run_name), "creating the report run")
    return run.info.run_id


def finish_report_run(
    client: MlflowClient, run_id: str, source: ReportSource, report: Mapping[str, Any], files: Iterable[Path]
) -> None:
    """Log the report to its run, end the run as FINISHED and tag the search's parent run with it.

    Parameters: the retrained configuration and the seeds. Metrics: see report_metrics.
    Artifacts: `files`. Raises MlflowException when the store rejects a step after retries.
    """
    params = [Param(key, str(value)[:PARAM_VALUE_LIMIT]) for key, value in sorted(report["config"].items())]
    params.append(Param("seeds", ",".join(str(seed["seed"]) for seed in report["seeds"])))
    call_with_retry(lambda: client.log_batch(run_id, params=params), "logging the report's parameters")
    metrics = report_metrics(report)
    for begin in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
        call_with_retry(lambda: client.log_batch(run_id, metrics=metrics[begin : begin + 1000]), "logging the report's metrics")
    for path in files:
        call_with_retry(lambda: client.log_artifact(run_id, str(path)), f"uploading {path.name}")
    call_with_retry(lambda: client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED)), "ending the report run")
    if source.parent_run_id is not None:
        call_with_retry(lambda: client.set_tag(source.parent_run_id, TAG_REPORT_RUN, run_id), "tagging the parent run")
    logger.info("MLflow: report run %s in experiment %r, for parent run %s", run_id, source.experiment_name, source.parent_run_id)


def fail_report_run(client: MlflowClient, run_id: str) -> None:
    """End a report run that could not be completed as FAILED; a failure here is only logged."""
    try:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
    except Exception as err:  # noqa: BLE001 - the original error matters more
        logger.warning("MLflow: could not set report run %s to FAILED: %s", run_id, err)


def report_metrics(report: Mapping[str, Any]) -> list[Metric]:
    """Build the report run's metrics from report.json's content; values that are None are left out.

    Keys: `<split>/<metric>` per seed, `<split>/<metric>_mean`, `_std`, `_ci_low`,
    `_ci_high`, and `registered/<split>/<metric>`, with '@' written as '_at_'.
    """
    timestamp_ms = int(time.time() * 1000)
    metrics = []

    def add(key: str, value: float | None, step: int = 0) -> None:
        if value is not None:
            metrics.append(Metric(metric_key(key), float(value), timestamp_ms, step))

    for split, summary in report["summary"].items():
        for position, seed in enumerate(report["seeds"]):
            if seed["error"] is None:
                for name in METRICS:
                    add(f"{split}/{name}", seed[split][name], step=position)
        for name in METRICS:
            for statistic in ("mean", "std", "ci_low", "ci_high"):
                add(f"{split}/{name}_{statistic}", summary[name][statistic])
        registered = report["registered_checkpoint"]
        if registered is not None:
            for name in METRICS:
                add(f"registered/{split}/{name}", registered[split][name])
    return metrics
