"""ASHA that rebuilds its rungs from the trials' saved results when a search resumes."""

from __future__ import annotations

import json
import logging
from typing import Any

from ray.air.constants import EXPR_RESULT_FILE
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler

logger = logging.getLogger(__name__)


class ResumableASHA(ASHAScheduler):
    """ASHA whose rung records survive `--resume`.

    Ray Tune restores the searcher's state but not the scheduler's: a restored Tuner gets
    the scheduler as it was built at the start, with empty rungs, so after a resume ASHA
    would compare new results only with those reported since. Tune adds every restored
    trial to the scheduler again, and this class then replays the trial's saved results
    (result.json in its folder) into its bracket, so each rung contains every earlier result.
    """

    # NOTE: this reads private fields of Ray's AsyncHyperBandScheduler (as of Ray 2.60), which
    # a Ray upgrade may rename. tests/test_search_asha.py then fails.
    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        bracket = self._trial_info[trial.trial_id]
        for result in saved_results(trial):
            if self._time_attr not in result or self._metric not in result:
                continue
            # A result at max_t stops the trial without touching the rungs (as in on_trial_result).
            if result[self._time_attr] >= self._max_t and self._stop_last_trials:
                continue
            bracket.on_result(trial, result[self._time_attr], self._metric_op * result[self._metric])


def saved_results(trial: Trial) -> list[dict[str, Any]]:
    """Return the results in the trial's result.json, oldest first, or [] for a new trial.

    A driver killed while writing can leave a cut last line, which is skipped.
    """
    # A new trial gets its folder name only when it first starts.
    if trial.storage is None or trial.storage.trial_dir_name is None:
        return []
    path = f"{trial.path}/{EXPR_RESULT_FILE}"
    try:
        with trial.storage.storage_filesystem.open_input_stream(path) as stream:
            text = stream.readall().decode("utf-8")
    except FileNotFoundError:
        return []
    results = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s, line %d: invalid JSON, left out of ASHA's rungs", path, number)
    return results
