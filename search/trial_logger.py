"""Log one Ray trial to its nested MLflow run without blocking or failing the trial.

Every logging call only appends an operation to an in-memory queue. A background thread
sends the operations in order and retries each one with exponential backoff while the
tracking store is unreachable, so results reported during an outage arrive once the
store responds again. `finish` waits for the queue to drain, but gives up once the store
has been unreachable for OUTAGE_LIMIT_S, so a store that stays down delays the end of a
trial by at most about that long. The driver logs what a trial could not send at the end
of the search, from Ray Tune's record (search.tracking.reconcile_trial_runs).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from mlflow.entities import RunTag

from search.tracking import (
    ERROR_ARTIFACT,
    RUNNING,
    STEP_KEY,
    TAG_ERROR,
    TRIAL_STATUS,
    TrackingTarget,
    config_params,
    error_tag,
    finite_metrics,
    find_or_create_trial_run,
    is_permanent,
    logged_steps,
    metric_key,
    new_client,
    pretraining_metrics_and_tags,
    result_metrics,
    status_tags,
    trial_run_name,
)

logger = logging.getLogger(__name__)

# Seconds an operation may keep failing (or hang inside MLflow's own HTTP retries) before
# `finish` stops waiting for it. With MLflow 3.17's defaults (7 retries, backoff factor 2)
# urllib3 retries a request about 4, 12, 28, 60 and 124 s after its first attempt, so an
# outage of under 60 s ends well within this limit.
OUTAGE_LIMIT_S = 150.0
FINISH_TIMEOUT_S = 180.0  # the longest `finish` waits in any case
FIRST_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 5.0
OUTAGE_WARNING_PERIOD_S = 60.0  # while an outage lasts, a warning at most this often


@dataclass
class _Operation:
    description: str  # for warnings: "metrics of epoch 5"
    action: Callable[[], None]
    opens_run: bool = False  # every later operation needs the run this one opens


class TrialRunLogger:
    """The nested MLflow run of one trial, found again by its trial id or created.

    `config` contains the trial's searched settings, which name the run. `train_config`
    contains every training setting, logged as parameters. `step_metric` is a reported metric
    that every result has (such as `val/ndcg@100`); the steps of its history in the run tell
    which results an earlier attempt of the trial already logged. The run is set to RUNNING
    when the logger opens it, also when an earlier attempt of the trial had ended it.
    """

    def __init__(
        self,
        target: TrackingTarget,
        trial_id: str,
        config: Mapping[str, Any],
        train_config: Mapping[str, Any],
        step_metric: str,
        outage_limit_s: float = OUTAGE_LIMIT_S,
    ) -> None:
        self.target = target
        self.trial_id = trial_id
        self.run_name = trial_run_name(config)
        self.run_id: str | None = None
        self.outage_limit_s = outage_limit_s
        self._step_key = metric_key(step_metric)
        self._client = None
        self._logged_steps: set[int] = set()
        self._queue: deque[_Operation] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self._abandoned = threading.Event()
        self._pending_since: float | None = None  # when the operation at the head was first tried
        self._warned_non_finite: set[str] = set()
        self._open_failed = False
        self.enabled = target.reachable_from_here()
        if not self.enabled:
            logger.warning(
                "MLflow: trial %s runs on another machine than the driver and the store %s is a local file; "
                "this trial is not logged live (pass --tracking-uri http://HOST:PORT of a tracking server)",
                trial_id, target.tracking_uri,
            )
            return

        self._enqueue(f"opening the run of trial {trial_id}", self._open_run, opens_run=True)
        params = config_params(train_config)
        self._enqueue("parameters", lambda: self._client.log_batch(self.run_id, params=params))
        self._thread = threading.Thread(target=self._work, name=f"mlflow-trial-{trial_id}", daemon=True)
        self._thread.start()

    # -- what a trial calls ------------------------------------------------

    def log_pretraining(self, summary: Mapping[str, Any]) -> None:
        """Log a pre-training summary: its numbers as metrics at step 0, whether it was reused as tags."""
        metrics, tags = pretraining_metrics_and_tags(summary)
        timestamp_ms = _now_ms()

        def send() -> None:
            kept, _ = finite_metrics(metrics, timestamp_ms, 0)
            self._client.log_batch(self.run_id, metrics=kept, tags=[RunTag(k, v) for k, v in tags.items()])

        self._warn_non_finite(metrics)
        self._enqueue("pre-training summary", send)

    def log_result(self, result: Mapping[str, Any]) -> None:
        """Log the metrics of one reported result at step = its group epoch.

        NaN and infinite values are left out with a warning. A step that the run already
        has (logged by an earlier attempt of the trial) is not logged again.
        """
        step = int(result[STEP_KEY])
        metrics = result_metrics(result)
        timestamp_ms = _now_ms()

        def send() -> None:
            if step in self._logged_steps:
                return
            kept, _ = finite_metrics(metrics, timestamp_ms, step)
            self._client.log_batch(self.run_id, metrics=kept)
            self._logged_steps.add(step)

        self._warn_non_finite(metrics)
        self._enqueue(f"metrics of epoch {step}", send)

    def finish(self, outcome: str, error: BaseException | str | None = None, timeout_s: float = FINISH_TIMEOUT_S) -> bool:
        """End the run as `outcome` ("completed" or "failed", with the error) and wait for the queue.

        Returns whether everything queued reached the store. No later call logs anything.
        """
        if outcome not in TRIAL_STATUS:
            raise ValueError(f"unknown trial outcome {outcome!r}; expected one of {', '.join(TRIAL_STATUS)}")
        text = _error_text(error) if error is not None else None

        def send() -> None:
            tags = status_tags(outcome)
            if text is not None:
                tags.append(error_tag(text))
                self._client.log_text(self.run_id, text, ERROR_ARTIFACT)
            self._client.log_batch(self.run_id, tags=tags)
            self._client.set_terminated(self.run_id, TRIAL_STATUS[outcome])

        self._enqueue(f"ending the run as {TRIAL_STATUS[outcome]}", send)
        return self.close(timeout_s)

    def close(self, timeout_s: float = FINISH_TIMEOUT_S) -> bool:
        """Stop accepting operations and wait until the queue drains, the timeout passes or the
        store has been unreachable for `outage_limit_s`. Returns whether the queue drained."""
        if not self.enabled:
            return True
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        drained = self.flush(timeout_s)
        if not drained:
            self._abandoned.set()
            with self._condition:
                left = len(self._queue)
            logger.warning(
                "MLflow: gave up logging trial %s to %s with %d operations unsent; the driver logs the missing "
                "results at the end of the search", self.trial_id, self.target.tracking_uri, left,
            )
        return drained

    def flush(self, timeout_s: float = FINISH_TIMEOUT_S) -> bool:
        """Wait until every queued operation was sent; False after the timeout or a long outage."""
        if not self.enabled:
            return True
        deadline = time.monotonic() + timeout_s
        with self._condition:
            while self._queue:
                now = time.monotonic()
                outage = self._pending_since is not None and now - self._pending_since > self.outage_limit_s
                if now >= deadline or outage or not self._thread.is_alive():
                    return False
                self._condition.wait(min(0.2, deadline - now))
        return True

    # -- the background thread ---------------------------------------------

    def _enqueue(self, description: str, action: Callable[[], None], opens_run: bool = False) -> None:
        if not self.enabled or self._open_failed:
            return
        with self._condition:
            if self._closed:
                logger.warning("MLflow: the run of trial %s is closed; %s is not logged", self.trial_id, description)
                return
            self._queue.append(_Operation(description, action, opens_run))
            self._condition.notify_all()

    def _open_run(self) -> None:
        if self._client is None:
            self._client = new_client(self.target.tracking_uri)
        run, created = find_or_create_trial_run(self._client, self.target, self.trial_id, self.run_name)
        self.run_id = run.info.run_id
        if not created:
            if run.info.status != RUNNING:
                self._client.update_run(self.run_id, status=RUNNING)
            if TAG_ERROR in run.data.tags:
                self._client.delete_tag(self.run_id, TAG_ERROR)
            self._logged_steps = logged_steps(self._client, self.run_id, self._step_key)
        logger.info("MLflow: trial %s logs to run %s (%s)", self.trial_id, self.run_id, "new" if created else "continued")

    def _work(self) -> None:
        failures, outage_start, last_warning = 0, 0.0, 0.0
        delay = FIRST_RETRY_DELAY_S
        while not self._abandoned.is_set():
            with self._condition:
                while not self._queue and not self._closed:
                    self._condition.wait()
                if not self._queue:
                    return
                operation = self._queue[0]
                if self._pending_since is None:
                    self._pending_since = time.monotonic()

            try:
                operation.action()
            except Exception as err:  # noqa: BLE001 - logging must never fail the trial
                if is_permanent(err):
                    self._drop(operation, err)
                    continue
                now = time.monotonic()
                if failures == 0:
                    outage_start = last_warning = now
                    logger.warning("MLflow: %s of trial %s failed, retrying: %s", operation.description, self.trial_id, err)
                elif now - last_warning >= OUTAGE_WARNING_PERIOD_S:
                    last_warning = now
                    logger.warning(
                        "MLflow: trial %s cannot reach %s for %.0f s; %d operations queued: %s",
                        self.trial_id, self.target.tracking_uri, now - outage_start, len(self._queue), err,
                    )
                failures += 1
                self._abandoned.wait(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY_S)
                continue

            if failures:
                logger.warning(
                    "MLflow: trial %s reached %s again after %.0f s and %d failed attempts",
                    self.trial_id, self.target.tracking_uri, time.monotonic() - outage_start, failures,
                )
            failures, delay = 0, FIRST_RETRY_DELAY_S
            self._pop()

    def _drop(self, operation: _Operation, error: Exception) -> None:
        """Drop an operation the store rejected; without an open run, drop everything."""
        if operation.opens_run:
            logger.warning("MLflow: could not open the run of trial %s, which is not logged live: %s", self.trial_id, error)
            self._open_failed = True
            with self._condition:
                self._queue.clear()
                self._pending_since = None
                self._condition.notify_all()
            return
        logger.warning("MLflow: %s of trial %s was rejected and is not logged: %s", operation.description, self.trial_id, error)
        self._pop()

    def _pop(self) -> None:
        with self._condition:
            self._queue.popleft()
            self._pending_since = None
            self._condition.notify_all()

    def _warn_non_finite(self, metrics: Mapping[str, float]) -> None:
        _, dropped = finite_metrics(metrics, 0, 0)
        new = [key for key in dropped if key not in self._warned_non_finite]
        if new:
            self._warned_non_finite.update(new)
            logger.warning("MLflow: trial %s reported NaN or infinite %s; those values are not logged", self.trial_id, ", ".join(new))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _error_text(error: BaseException | str) -> str:
    if isinstance(error, BaseException):
        return "".join(traceback.format_exception(error))
    return str(error)
