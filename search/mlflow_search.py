"""The MLflow side of `python search/run.py`, on the driver.

At the start: the parent run of the search (`start`). While the search runs: each trial's
run set to its final status as soon as Ray Tune ends the trial (`TrialRunStatus`). At the
end (`finish`): every trial run in its final state, the best trial's checkpoint registered
as the `champion` model, and the parent run's status.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from mlflow.entities import RunStatus
from ray import tune
from mlflow.entities.model_registry import ModelVersion
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME

from groupim.data import GroupIMData
from search.experiment import Experiment
from search.registry import log_best_trial, registered_model_name
from search.results import COMPLETED, FAILED, STOPPED_EARLY, UNFINISHED, SearchSummary, last_evaluation_epoch
from search.tracking import (
    TAG_DATA_CHECKSUM,
    TAG_DATA_SOURCE,
    TAG_EXPERIMENT_FILE,
    TrackingTarget,
    TrialOutcome,
    end_search_run,
    git_commit,
    new_client,
    reconcile_trial_run,
    reconcile_trial_runs,
    saved_target,
    start_search_run,
)
from search.trainable import TIME_ATTR, TUNE_METRIC

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT_ARTIFACT = "experiment.yaml"  # the search's settings, on the parent run


def start(tracking_uri: str, experiment: Experiment, data: GroupIMData, resume: bool) -> TrackingTarget:
    """Create (or with `resume` continue) the search's parent run; raises TrackingError when the store fails."""
    tags = {
        TAG_EXPERIMENT_FILE: str(experiment.source) if experiment.source is not None else None,
        TAG_DATA_CHECKSUM: data.checksum,
        TAG_DATA_SOURCE: data.source,
        MLFLOW_GIT_COMMIT: git_commit(REPO_ROOT),
        MLFLOW_SOURCE_NAME: "search/run.py",
    }
    target = start_search_run(tracking_uri, experiment.name, experiment.path, resume=resume, tags=tags)
    try:
        settings = yaml.safe_dump(experiment.to_dict(), sort_keys=False)
        new_client(tracking_uri).log_text(target.parent_run_id, settings, EXPERIMENT_ARTIFACT)
    except Exception as err:  # noqa: BLE001 - the settings are also in the experiment folder
        logger.warning("MLflow: could not log %s to the parent run: %s", EXPERIMENT_ARTIFACT, err)
    return target


def trial_outcomes(experiment: Experiment, summary: SearchSummary, result_grid) -> list[TrialOutcome]:
    """Collect the outcome of every trial in `summary`, with all its reported results from the result grid."""
    reported, errors = {}, {}
    for result in result_grid:
        history = result.metrics_dataframe
        trial_id = (result.metrics or {}).get("trial_id")
        if trial_id is None and history is not None and "trial_id" in history.columns and len(history):
            trial_id = history["trial_id"].iloc[-1]
        if trial_id is None:
            continue
        reported[trial_id] = _rows(history)
        if result.error is not None:
            errors[trial_id] = str(result.error)

    outcomes = []
    for row in summary.rows:
        config = {axis.name: row[axis.name] for axis in experiment.axes}
        outcomes.append(TrialOutcome(
            trial_id=row["trial_id"],
            config=config,
            train_config=experiment.trial_config(config).to_dict(),
            status=row["status"],
            results=reported.get(row["trial_id"], []),
            error=errors.get(row["trial_id"]) or row.get("error") or None,
        ))
    return outcomes


def _rows(history: pd.DataFrame | None) -> list[dict[str, Any]]:
    if history is None or history.empty:
        return []
    return [{key: value for key, value in row.items() if not pd.isna(value)} for row in history.to_dict("records")]


def finish(
    target: TrackingTarget,
    experiment: Experiment,
    summary: SearchSummary,
    result_grid,
    data: GroupIMData,
    exit_code: int,
) -> ModelVersion | None:
    """Bring the search's runs to their final state and register the champion; return its version.

    The champion is registered only when the search ended with exit code 0 and has a best
    trial. Failures are logged as warnings, because the search's own results are already written.
    """
    outcomes = trial_outcomes(experiment, summary, result_grid)
    failures = reconcile_trial_runs(target, outcomes, TUNE_METRIC)
    if failures:
        logger.warning("MLflow: %d trial runs could not be brought to their final state", failures)

    version = None
    if exit_code == 0 and summary.best is not None:
        try:
            version = log_best_trial(
                target, registered_model_name(experiment.name), summary.best, data.member_items, data.checksum
            )
        except Exception as err:  # noqa: BLE001 - the checkpoint path is in best.json for a later try
            logger.warning("MLflow: could not register the best trial's model: %s", err)

    statuses = {outcome.status for outcome in outcomes}
    if UNFINISHED in statuses:
        status = RunStatus.KILLED
    elif exit_code == 0:
        status = RunStatus.FINISHED
    else:
        status = RunStatus.FAILED
    end_search_run(target, RunStatus.to_string(status))
    return version


class TrialRunStatus(tune.Callback):
    """A Ray Tune callback that ends each trial's MLflow run as soon as Ray Tune ends the trial.

    Ray Tune kills the actor of a trial that ASHA stops, and often that of a trial reporting
    its last epoch, before the trial ends its own run, so the driver ends it: FINISHED
    (early_stopped=true when the trial stopped before the last evaluation epoch) or FAILED
    with the error. The results
    seen here are logged too when the trial could not send them. MLflow calls run in a
    background thread, so a slow or unreachable store never stalls Ray Tune's event loop.

    Ray Tune pickles its callbacks with the experiment and restores them for --resume, so
    only the experiment is pickled. `setup` reads the parent run from the experiment
    folder, where `start` saved it for both a new and a resumed search.
    """

    def __init__(self, experiment: Experiment) -> None:
        self.experiment = experiment
        self._target: TrackingTarget | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._client = None  # created in the executor's thread
        self._results: dict[str, list[dict[str, Any]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"experiment": self.experiment}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["experiment"])

    def setup(self, **info: Any) -> None:
        self._target = saved_target(self.experiment.path)
        if self._target is None:
            logger.warning("MLflow: no parent run saved in %s; trial runs end only with the search", self.experiment.path)
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-status")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        self._results.setdefault(trial.trial_id, []).append(dict(result))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        results = self._results.pop(trial.trial_id, [])
        epochs = max((int(result[TIME_ATTR]) for result in results if TIME_ATTR in result), default=0)
        status = COMPLETED if epochs >= last_evaluation_epoch(self.experiment) else STOPPED_EARLY
        self._submit(trial, status, results, None)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        try:
            error = trial.get_error()
        except Exception as err:  # noqa: BLE001 - the error text is optional
            error = f"failed; its error could not be read: {err}"
        self._submit(trial, FAILED, self._results.pop(trial.trial_id, []), str(error) if error else None)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _submit(self, trial, status: str, results: list[dict[str, Any]], error: str | None) -> None:
        if self._executor is None:
            return
        config = {axis.name: trial.config.get(axis.name) for axis in self.experiment.axes}
        outcome = TrialOutcome(
            trial.trial_id, config, self.experiment.trial_config(config).to_dict(), status, results, error
        )
        self._executor.submit(self._end_run, outcome)

    def _end_run(self, outcome: TrialOutcome) -> None:
        try:
            if self._client is None:
                self._client = new_client(self._target.tracking_uri)
            reconcile_trial_run(self._client, self._target, outcome, TUNE_METRIC)
        except Exception as err:  # noqa: BLE001 - `finish` tries again at the end of the search
            logger.warning("MLflow: could not end the run of trial %s: %s", outcome.trial_id, err)
