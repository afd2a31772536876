"""Trial checkpoints: their files, the model in them, and keeping only the best few per trial.

A checkpoint folder contains training_state.pt (what train_group needs to resume, plus the
trial's TrainConfig) and checkpoint.json (its epoch and validation metrics).

Ray Tune is not asked to delete checkpoints (no CheckpointConfig.num_to_keep), because in
Ray 2.60 that races with the experiment state: when a trial reports a new checkpoint, Ray
deletes the previous latest one at once if its metric is not among the best, but the
experiment state that a killed driver leaves behind can still name it, and --resume then
fails with "Could not recover from checkpoint as it does not exist on storage anymore".
CheckpointPruner instead deletes a trial's surplus checkpoints once the trial has ended,
always keeping its latest one, so every checkpoint a resume can ask for still exists.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from ray import tune

from groupim.config import TrainConfig
from groupim.model import GroupIM
from search.storage import RemotePath, location_on, remove_tree, storage_location

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "training_state.pt"
SUMMARY_FILE = "checkpoint.json"
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Tune names checkpoint folders checkpoint_000000, ...


def write_checkpoint(folder: Path, payload: dict[str, Any], summary: dict[str, Any]) -> None:
    """Write a checkpoint's files into `folder`, which Ray Tune then copies to storage."""
    torch.save(payload, folder / CHECKPOINT_FILE)
    (folder / SUMMARY_FILE).write_text(json.dumps(summary))


def read_training_state(folder: str | Path | RemotePath) -> dict[str, Any]:
    """Load training_state.pt from a checkpoint folder given as a local path or a URI such as s3://..."""
    state_file = storage_location(folder) / CHECKPOINT_FILE
    if isinstance(state_file, RemotePath):
        return torch.load(io.BytesIO(state_file.read_bytes()), map_location="cpu", weights_only=True)
    return torch.load(state_file, map_location="cpu", weights_only=True)


def load_checkpoint_model(folder: str | Path | RemotePath) -> tuple[GroupIM, TrainConfig, dict[str, Any]]:
    """Rebuild the model saved in a trial checkpoint folder, in eval mode on the CPU.

    Returns the model at that checkpoint's epoch (for the best checkpoint of a trial, its
    best epoch), the trial's TrainConfig and the checkpoint's epoch, metrics, pre-training
    summary and data checksum.
    """
    saved = read_training_state(folder)
    config = TrainConfig.from_dict(saved["config"], source=f"{folder}/{CHECKPOINT_FILE}")
    model = GroupIM.from_config(int(saved["n_items"]), config)
    model.load_state_dict(saved["model"])
    details = {key: saved[key] for key in ("epoch", "metrics", "pretraining", "data_checksum")}
    return model.eval(), config, details


def prune_checkpoints(
    trial_dir: str | Path | RemotePath, latest: str | Path | None, keep: int, metric: str
) -> list[Path | RemotePath]:
    """Delete the checkpoints of an ended trial except its `keep` best by `metric` and `latest`.

    Folders written after `latest` (the last checkpoint Ray Tune registered) and folders
    without a summary are left alone. Returns the deleted folders.
    """
    folders = sorted(storage_location(trial_dir).glob(CHECKPOINT_PREFIX + "*"))
    latest_name = Path(latest).name if latest is not None else None
    scored = []
    for folder in folders:
        if latest_name is not None and folder.name > latest_name:
            continue
        summary_path = folder / SUMMARY_FILE
        if not summary_path.is_file():
            continue
        value = json.loads(summary_path.read_text()).get(metric)
        scored.append((value if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf, folder))

    # Highest metric first; of equal values the earlier checkpoint wins.
    scored.sort(key=lambda item: (-item[0], item[1].name))
    kept = {folder for _, folder in scored[:keep]}
    deleted = []
    for _, folder in scored:
        if folder in kept or folder.name == latest_name:
            continue
        remove_tree(folder)
        deleted.append(folder)
    return deleted


# Seconds between a trial's end and the pruning of its checkpoints. Ray saves the experiment
# state periodically. A driver killed before that save still lists the ended trial as running
# with an older latest checkpoint, so --resume must find that checkpoint on storage.
PRUNE_DELAY_S = 30.0


class CheckpointPruner(tune.Callback):
    """Keeps each ended trial's `keep` best checkpoints by `metric` and its latest one.

    A trial is pruned PRUNE_DELAY_S after it ends, once the experiment state has recorded
    its end. Trials still pending when the search ends are pruned then, or after a killed
    driver by the resumed search's final `prune_all_trials`.
    """

    def __init__(self, keep: int, metric: str, delay_s: float = PRUNE_DELAY_S) -> None:
        self.keep = keep
        self.metric = metric
        self.delay_s = delay_s
        self.pending: list[tuple[float, Any]] = []  # (end time, trial)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.pending.append((time.monotonic(), trial))

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        self._prune(older_than=time.monotonic() - self.delay_s)

    def on_experiment_end(self, trials: list, **info) -> None:
        self._prune(older_than=math.inf)

    def _prune(self, older_than: float) -> None:
        due = [trial for ended, trial in self.pending if ended <= older_than]
        self.pending = [(ended, trial) for ended, trial in self.pending if ended > older_than]
        for trial in due:
            latest = trial.checkpoint.path if trial.checkpoint is not None else None
            trial_dir = location_on(trial.storage.storage_filesystem, trial.path)
            deleted = prune_checkpoints(trial_dir, latest, self.keep, self.metric)
            logger.debug("trial %s: deleted %d checkpoints", trial.trial_id, len(deleted))


def prune_all_trials(result_grid: tune.ResultGrid, keep: int, metric: str) -> None:
    """Prune every trial of a search whose trials have all ended (see prune_checkpoints)."""
    for result in result_grid:
        latest = result.checkpoint.path if result.checkpoint is not None else None
        prune_checkpoints(location_on(result.filesystem, result.path), latest, keep, metric)
