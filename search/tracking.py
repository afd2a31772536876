"""MLflow tracking of a search: where runs go, the parent run and one nested run per trial.

A search logs one parent run to the MLflow experiment named after the search experiment.
Each Ray trial logs a nested run (tag mlflow.parentRunId) that it finds again by its trial
id, so a retried or resumed trial continues its run instead of starting a second one.
Trials log while they train (see search/trial_logger.py). At the end of the search the
driver sets every trial run's final status and logs any reported result that a trial
could not send, from Ray Tune's own record of the results (`reconcile_trial_runs`).

The tracking URI is `--tracking-uri`, else $MLFLOW_TRACKING_URI, else a SQLite database
`mlflow.db` in the working folder with artifacts under `./mlartifacts`. Local stores are
turned into absolute URIs on the driver, because Ray trials run in other folders.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar
from urllib.parse import urlparse

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_SOURCE_NAME

logger = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # relative to the working folder
ARTIFACT_FOLDER = "mlartifacts"  # beside a SQLite database file
PARENT_RUN_FILE = "mlflow_run.json"  # in the experiment folder: the parent run that --resume continues

# Tags of the parent run.
TAG_EXPERIMENT_FILE = "experiment_file"
TAG_EXPERIMENT_FOLDER = "experiment_folder"
TAG_DATA_CHECKSUM = "data_checksum"
TAG_DATA_SOURCE = "data_source"
# Tags of a trial run.
TAG_TRIAL_ID = "trial_id"  # Ray Tune's trial id, stable across retries and --resume
TAG_EARLY_STOPPED = "early_stopped"  # "true" when ASHA stopped the trial at a rung
TAG_ERROR = "error"  # last line of a failed trial's error; the whole text is ERROR_ARTIFACT
ERROR_ARTIFACT = "error.txt"
TAG_VALUE_LIMIT = 5000  # characters; MLflow 3 rejects longer tag values

STEP_KEY = "epoch"  # the reported group epoch, used as the MLflow step
PRETRAINING_PREFIX = "pretrain_"
# Entries of a Ray Tune result that Ray fills in itself; they are not trial metrics.
RAY_RESULT_KEYS = frozenset({
    "training_iteration", "time_total_s", "time_this_iter_s", "time_since_restore", "timestamp",
    "iterations_since_restore", "timesteps_total", "timesteps_since_restore", "episodes_total",
    "pid", "node_ip", "hostname", "date", "done", "trial_id", "checkpoint_dir_name", "config",
    "should_checkpoint",
})

# Trial outcomes as search/results.py names them, and the run status each one ends in.
TRIAL_STATUS = {
    "completed": RunStatus.to_string(RunStatus.FINISHED),
    "stopped_early": RunStatus.to_string(RunStatus.FINISHED),
    "failed": RunStatus.to_string(RunStatus.FAILED),
    "unfinished": RunStatus.to_string(RunStatus.KILLED),
}
RUNNING = RunStatus.to_string(RunStatus.RUNNING)

# MLflow error codes that a retry cannot fix: the request itself is invalid.
PERMANENT_ERRORS = frozenset({
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
    "BAD_REQUEST", "MALFORMED_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED", "ENDPOINT_NOT_FOUND",
})

T = TypeVar("T")


class TrackingError(RuntimeError):
    """The MLflow tracking store could not be reached or set up."""


# ---------------------------------------------------------------------------
# Where runs go
# ---------------------------------------------------------------------------

def resolve_tracking_uri(uri: str | None = None, cwd: str | Path | None = None) -> str:
    """Return the tracking URI to use: `uri`, else $MLFLOW_TRACKING_URI, else the SQLite default.

    A local store (a SQLite database, a `file:` URI or a plain path) becomes absolute,
    relative to `cwd` (default: the working folder), so that every process opens the same one.
    """
    chosen = uri or os.environ.get(TRACKING_URI_ENV) or DEFAULT_TRACKING_URI
    return absolute_store_uri(chosen, Path(cwd) if cwd is not None else Path.cwd())


def absolute_store_uri(uri: str, cwd: Path) -> str:
    if uri.startswith("sqlite:///"):
        database = uri[len("sqlite:///"):]
        if database in ("", ":memory:"):
            raise TrackingError(f"invalid tracking URI {uri!r}: an in-memory database is visible to one process only")
        return "sqlite:///" + str((cwd / database).resolve())
    scheme = urlparse(uri).scheme
    if scheme == "file":
        return Path(urlparse(uri).path).resolve().as_uri()
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        return (cwd / uri).resolve().as_uri()
    return uri


def is_local_store(uri: str) -> bool:
    """Tell whether the store is a file on this machine (SQLite or a file store), not a server."""
    return uri.startswith("sqlite:") or urlparse(uri).scheme in ("", "file")


def artifact_location(uri: str, experiment_name: str) -> str | None:
    """Return the artifact root for a new experiment: `mlartifacts/<name>` beside a SQLite database.

    Other stores get None, which leaves the choice to MLflow (a tracking server uses its
    --artifacts-destination). Without an explicit root, MLflow 3.17 puts a SQLite store's
    artifacts under ./mlruns of whichever folder the creating process runs in.
    """
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri[len("sqlite:///"):])
    folder = re.sub(r"[^A-Za-z0-9._-]", "_", experiment_name)
    return (database.parent / ARTIFACT_FOLDER / folder).as_uri()


def new_client(uri: str) -> MlflowClient:
    """Create a client bound to `uri` for runs and the model registry, whatever the global MLflow settings."""
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def is_permanent(error: Exception) -> bool:
    """Tell whether a retry cannot succeed, because the store rejected the request itself."""
    return isinstance(error, MlflowException) and error.error_code in PERMANENT_ERRORS


def call_with_retry(action: Callable[[], T], what: str, attempts: int = 4, first_delay_s: float = 1.0) -> T:
    """Run `action` and retry transient failures with exponential backoff, re-raising the last one.

    MLflow's HTTP client already retries each request to a server (7 times with backoff by
    default in MLflow 3.17). This loop also covers SQLite's "database is locked".
    """
    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as err:  # noqa: BLE001 - any store error may be transient
            if is_permanent(err) or attempt == attempts:
                raise
            logger.warning("MLflow: %s failed (attempt %d of %d), retrying in %.0f s: %s", what, attempt, attempts, delay, err)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class TrackingTarget:
    """The store and parent run that the trials of one search log to, passed to every trial."""

    tracking_uri: str  # absolute for local stores
    experiment_id: str
    parent_run_id: str
    driver_host: str = field(default_factory=socket.gethostname)

    def reachable_from_here(self) -> bool:
        """Tell whether this process may log; not on another machine than the driver's with a local store.

        A trial there would otherwise create a second, stray store at the same path.
        NOTE: a SQLite file on a file system that all nodes share would work, but it is not
        detected here. Multi-node searches need a tracking server.
        """
        return not is_local_store(self.tracking_uri) or socket.gethostname() == self.driver_host


# ---------------------------------------------------------------------------
# The parent run of a search (on the driver)
# ---------------------------------------------------------------------------

def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """Return the id of the MLflow experiment `name`, created with its artifact root when missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore "
                f"--experiment-id {experiment.experiment_id}) or remove it with `mlflow gc`"
            )
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri, name))
    except MlflowException as err:
        # Another process created it in the meantime.
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def git_commit(folder: Path) -> str | None:
    """Return the commit checked out in `folder`, or None outside a git work tree or without git."""
    try:
        output = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return output.stdout.strip() or None


def start_search_run(
    uri: str,
    experiment_name: str,
    experiment_folder: Path,
    *,
    resume: bool,
    tags: Mapping[str, str | None],
    run_name: str | None = None,
) -> TrackingTarget:
    """Create the parent run of a search, or with `resume` continue the one it started.

    The run's ids are saved to PARENT_RUN_FILE in the experiment folder. A resumed search
    continues that run when the tracking URI is the same and the run still exists.
    Otherwise it starts a new parent run and warns. `tags` with value None are left out.
    Raises TrackingError when the store cannot be reached.
    """
    client = new_client(uri)
    try:
        experiment_id = call_with_retry(lambda: ensure_experiment(client, experiment_name, uri), "experiment setup")
        target = _resumable_target(client, uri, experiment_folder) if resume else None
        if target is None:
            run_tags = {key: str(value) for key, value in tags.items() if value is not None}
            run_tags[TAG_EXPERIMENT_FOLDER] = str(experiment_folder.resolve())
            run = call_with_retry(
                lambda: client.create_run(experiment_id, tags=run_tags, run_name=run_name or experiment_name),
                "creating the parent run",
            )
            target = TrackingTarget(uri, experiment_id, run.info.run_id)
        else:
            call_with_retry(lambda: client.update_run(target.parent_run_id, status=RUNNING), "reopening the parent run")
    except MlflowException as err:
        raise TrackingError(
            f"MLflow tracking at {uri} failed: {err}; start the tracking server or pass another --tracking-uri"
        ) from err

    experiment_folder.mkdir(parents=True, exist_ok=True)
    (experiment_folder / PARENT_RUN_FILE).write_text(json.dumps(asdict(target), indent=2) + "\n")
    logger.info("MLflow: parent run %s in experiment %r at %s", target.parent_run_id, experiment_name, uri)
    return target


def _resumable_target(client: MlflowClient, uri: str, experiment_folder: Path) -> TrackingTarget | None:
    path = experiment_folder / PARENT_RUN_FILE
    if not path.is_file():
        logger.warning("MLflow: %s not found; the resumed search logs to a new parent run", path)
        return None
    saved = saved_target(experiment_folder)
    if saved.tracking_uri != uri:
        logger.warning(
            "MLflow: the search started logging to %s; it now logs to %s under a new parent run", saved.tracking_uri, uri
        )
        return None
    try:
        run = client.get_run(saved.parent_run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        logger.warning("MLflow: parent run %s no longer exists; the resumed search logs to a new one", saved.parent_run_id)
        return None
    if run.info.lifecycle_stage == "deleted":
        logger.warning("MLflow: parent run %s is deleted; the resumed search logs to a new one", saved.parent_run_id)
        return None
    return TrackingTarget(uri, saved.experiment_id, saved.parent_run_id)


def saved_target(experiment_folder: Path) -> TrackingTarget | None:
    """Read the parent run that start_search_run saved in the experiment folder; None when there is none."""
    path = experiment_folder / PARENT_RUN_FILE
    return TrackingTarget(**json.loads(path.read_text())) if path.is_file() else None


def end_search_run(target: TrackingTarget, status: str) -> None:
    """Set the parent run's final status (FINISHED, FAILED or KILLED); a failure is logged as a warning."""
    client = new_client(target.tracking_uri)
    try:
        call_with_retry(lambda: client.set_terminated(target.parent_run_id, status), "ending the parent run")
    except Exception as err:  # noqa: BLE001 - the search's results are already written
        logger.warning("MLflow: could not set parent run %s to %s: %s", target.parent_run_id, status, err)


# ---------------------------------------------------------------------------
# Trial runs: names, parameters, metrics, lookup (driver and trials)
# ---------------------------------------------------------------------------

# Short labels of searched settings in run names; other settings use their own name.
NAME_LABELS = {"embedding_size": "d", "lambda_mi": "lambda", "lr": "lr", "dropout": "dropout"}
NAME_ORDER = ("aggregator", "embedding_size", "lambda_mi")


def trial_run_name(config: Mapping[str, Any]) -> str:
    """Build a run name from a trial's searched settings, for example `attention-d64-lambda0.5`.

    The aggregator comes first as its bare name, then the embedding size and lambda, then
    any other setting in alphabetical order. Names need not be unique, but TAG_TRIAL_ID is.
    """
    keys = [key for key in NAME_ORDER if key in config]
    keys += sorted(key for key in config if key not in NAME_ORDER)
    parts = []
    for key in keys:
        value = config[key]
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(text if key == "aggregator" else NAME_LABELS.get(key, key) + text)
    return "-".join(parts) or "trial"


def metric_key(name: str) -> str:
    """Turn `name` into an MLflow metric key, which may not contain '@': `val/ndcg@100` -> `val/ndcg_at_100`."""
    return name.replace("@", "_at_")


def config_params(train_config: Mapping[str, Any]) -> list[Param]:
    """Convert every training setting of a trial to an MLflow parameter."""
    return [Param(key, str(value)) for key, value in sorted(train_config.items())]


def result_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """Select the metrics of one reported result, keyed for MLflow; the epoch is the step, not a metric.

    Pre-training entries, Ray's own entries (`config/...`, time, pid) and values that are
    not numbers are left out, so a Ray Tune result row and a trial's report give the same
    metrics. NaN and infinite values stay in; the loggers decide what to do with them.
    """
    metrics = {}
    for name, value in result.items():
        if name == STEP_KEY or name in RAY_RESULT_KEYS or name.startswith(PRETRAINING_PREFIX) or name.startswith("config/"):
            continue
        if isinstance(value, (bool, np.bool_)) or not _is_number(value):
            continue
        metrics[metric_key(name)] = float(value)
    return metrics


def pretraining_metrics_and_tags(summary: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """Split a trial's pre-training summary into MLflow metrics (logged at step 0) and tags.

    Whether a phase was reused (`pretrain_user_reused`) and the stored state's key are tags,
    because a retried trial can reuse a state that its first attempt computed.
    """
    metrics, tags = {}, {}
    for name, value in summary.items():
        if isinstance(value, (bool, np.bool_)):
            tags[name] = str(bool(value)).lower()
        elif _is_number(value):
            metrics[metric_key(name)] = float(value)
        elif value is not None:
            tags[name] = str(value)[:TAG_VALUE_LIMIT]
    return metrics, tags


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, str)


def find_trial_run(client: MlflowClient, target: TrackingTarget, trial_id: str) -> Run | None:
    """Find the nested run of `trial_id` under the target's parent run; None when there is none.

    When several match (created by two attempts at once), the oldest is the trial's run.
    """
    query = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{target.parent_run_id}' and tags.`{TAG_TRIAL_ID}` = '{trial_id}'"
    runs = client.search_runs([target.experiment_id], query, order_by=["attributes.start_time ASC"], max_results=10)
    return runs[0] if runs else None


def find_or_create_trial_run(client: MlflowClient, target: TrackingTarget, trial_id: str, run_name: str) -> tuple[Run, bool]:
    """Find or create the nested run of `trial_id`; the flag is True when it was created."""
    run = find_trial_run(client, target, trial_id)
    if run is not None:
        return run, False
    tags = {MLFLOW_PARENT_RUN_ID: target.parent_run_id, TAG_TRIAL_ID: trial_id, MLFLOW_SOURCE_NAME: "search/run.py"}
    return client.create_run(target.experiment_id, tags=tags, run_name=run_name), True


def logged_steps(client: MlflowClient, run_id: str, key: str) -> set[int]:
    """Return the steps at which metric `key` of the run has a value."""
    return {metric.step for metric in client.get_metric_history(run_id, key)}


def finite_metrics(metrics: Mapping[str, float], timestamp_ms: int, step: int) -> tuple[list[Metric], list[str]]:
    """Build MLflow metrics of the finite values, and list the keys left out as NaN or infinite."""
    kept = [Metric(key, value, timestamp_ms, step) for key, value in metrics.items() if math.isfinite(value)]
    dropped = [key for key, value in metrics.items() if not math.isfinite(value)]
    return kept, dropped


def status_tags(outcome: str) -> list[RunTag]:
    """Return the tags that go with a trial's final outcome."""
    return [RunTag(TAG_EARLY_STOPPED, "true" if outcome == "stopped_early" else "false")]


def error_tag(error: str) -> RunTag:
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    return RunTag(TAG_ERROR, (lines[-1] if lines else "failed")[:TAG_VALUE_LIMIT])


# ---------------------------------------------------------------------------
# End of a search: every trial run in its final state (on the driver)
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TrialOutcome:
    """Ray Tune's record of one trial, in the terms of search/results.py."""

    trial_id: str
    config: Mapping[str, Any]  # the searched settings, which name the run
    train_config: Mapping[str, Any]  # every training setting, logged as parameters
    status: str  # a key of TRIAL_STATUS
    results: list[Mapping[str, Any]]  # every reported result, in order
    error: str | None = None  # the whole error text of a failed trial


def reconcile_trial_runs(target: TrackingTarget, outcomes: Iterable[TrialOutcome], step_metric: str) -> int:
    """Bring every trial's run to its final state; return the number of runs that failed to update.

    A missing trial run is created, and missing parameters and reported results are logged,
    because a trial that ASHA stops can be killed before its logger sent its last results.
    The status follows the outcome: FINISHED (tagged early_stopped=true when ASHA stopped
    the trial), FAILED with its error, or KILLED for an unfinished trial, which a resumed
    search continues. Nested runs that no trial claims and that are still RUNNING become
    KILLED. Each failure is logged as a warning. `step_metric` is a reported metric that
    every result has, as for TrialRunLogger.
    """
    client = new_client(target.tracking_uri)
    failures = 0
    claimed = set()
    for outcome in outcomes:
        try:
            run_id = call_with_retry(
                lambda: reconcile_trial_run(client, target, outcome, step_metric), f"trial {outcome.trial_id}"
            )
            claimed.add(run_id)
        except Exception as err:  # noqa: BLE001 - one run's failure must not stop the others
            failures += 1
            logger.warning("MLflow: could not update the run of trial %s: %s", outcome.trial_id, err)
    try:
        _kill_unclaimed_runs(client, target, claimed)
    except Exception as err:  # noqa: BLE001
        failures += 1
        logger.warning("MLflow: could not list the nested runs of parent run %s: %s", target.parent_run_id, err)
    return failures


def reconcile_trial_run(client: MlflowClient, target: TrackingTarget, outcome: TrialOutcome, step_metric: str) -> str:
    """Bring one trial's run to its final state (see reconcile_trial_runs) and return its run id.

    NOTE: when a trial and this function create the trial's run at the same moment, two runs
    with one trial id can remain. Later lookups use the older one.
    """
    run, created = find_or_create_trial_run(client, target, outcome.trial_id, trial_run_name(outcome.config))
    run_id = run.info.run_id
    if created:
        client.log_batch(run_id, params=config_params(outcome.train_config))
        logger.info("MLflow: created the missing run %s of trial %s", run_id, outcome.trial_id)

    done = set() if created else logged_steps(client, run_id, metric_key(step_metric))
    missing = [result for result in outcome.results if STEP_KEY in result and int(result[STEP_KEY]) not in done]
    now_ms = int(time.time() * 1000)
    metrics = []
    for result in missing:
        kept, _ = finite_metrics(result_metrics(result), now_ms, int(result[STEP_KEY]))
        metrics.extend(kept)
    if outcome.results and (created or PRETRAINING_PREFIX + "user_reused" not in run.data.tags):
        pretraining = {k: v for k, v in outcome.results[-1].items() if k.startswith(PRETRAINING_PREFIX)}
        pretraining_metrics, pretraining_tags = pretraining_metrics_and_tags(pretraining)
        metrics.extend(finite_metrics(pretraining_metrics, now_ms, 0)[0])
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in pretraining_tags.items()])
    for begin in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=metrics[begin : begin + 1000])
    if missing:
        logger.info("MLflow: logged %d missing results of trial %s", len(missing), outcome.trial_id)

    tags = status_tags(outcome.status)
    if outcome.status == "failed":
        error = outcome.error or "failed (no error recorded)"
        tags.append(error_tag(error))
        client.log_text(run_id, error, ERROR_ARTIFACT)
    elif TAG_ERROR in run.data.tags:
        # An earlier attempt failed and a retry succeeded; its error.txt stays as a record.
        client.delete_tag(run_id, TAG_ERROR)
    client.log_batch(run_id, tags=tags)
    if created or run.info.status != TRIAL_STATUS[outcome.status]:
        # A run that already has its final status keeps the end time it got then.
        client.set_terminated(run_id, TRIAL_STATUS[outcome.status])
    return run_id


def _kill_unclaimed_runs(client: MlflowClient, target: TrackingTarget, claimed: set[str]) -> None:
    query = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{target.parent_run_id}' and attributes.status = '{RUNNING}'"
    leftover = [run for run in client.search_runs([target.experiment_id], query) if run.info.run_id not in claimed]
    for run in leftover:
        logger.warning("MLflow: run %s (%s) belongs to no trial of the search; setting it to KILLED", run.info.run_id, run.info.run_name)
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
