"""The Ray Tune trainable: GroupIM's three phases for one configuration of the search.

Pre-training comes from the experiment's PretrainingStore, so trials that share the
settings it depends on compute it once. Group training reports the validation metrics on
every evaluation epoch together with a checkpoint, and a retried or resumed trial continues
from its latest checkpoint without pre-training again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from groupim.config import TrainConfig
from groupim.data import GroupIMData, cache_root, load_dataset
from groupim.metrics import METRICS, SELECTION_METRIC, SELECTION_MODE
from groupim.model import GroupIM
from groupim.train import Evaluation, build_model, pretrain_mi, pretrain_user, train_group
# load_checkpoint_model is re-exported for callers that import it from this module.
from search.checkpoints import load_checkpoint_model, read_training_state, write_checkpoint  # noqa: F401
from search.pretraining import MI_PHASE, USER_PHASE, PretrainingStore, StoredState, phase_key
from search.storage import RemotePath, append_line, storage_location
from search.tracking import TrackingTarget
from search.trial_logger import TrialRunLogger

# Names in the results that Ray Tune, the scheduler and trials.csv read.
TIME_ATTR = "epoch"  # group-training epochs completed, the scheduler's time unit
VALIDATION_PREFIX = "val/"
TUNE_METRIC = VALIDATION_PREFIX + SELECTION_METRIC
TUNE_MODE = SELECTION_MODE

PRETRAINING_FOLDER = "pretraining"  # inside the experiment folder
ATTEMPTS_FOLDER = "attempts"  # inside the experiment folder: one JSON line per start of a trial


class TrialDiverged(FloatingPointError):
    """Training produced a NaN or infinite loss, metric or weight, so the trial fails instead of reporting."""


@dataclass(frozen=True)
class TrialSettings:
    """Settings shared by every trial of one experiment, passed through tune.with_parameters."""

    train: dict[str, Any]  # TrainConfig values before the searched axes are applied
    data: str | None  # dataset folder, None for the downloaded Weeplaces
    experiment_path: str  # the experiment folder on storage every node can reach
    threads: int  # torch CPU threads, the trial's whole CPUs
    tracking: TrackingTarget | None = None  # the MLflow store and parent run; None logs nothing to MLflow


def train_trial(config: dict[str, Any], settings: TrialSettings) -> None:
    """Train one configuration, reporting to Ray Tune and MLflow on every evaluation epoch."""
    torch.set_num_threads(settings.threads)
    train_config = TrainConfig.from_dict({**settings.train, **config}, source="trial config")
    run_logger = None
    if settings.tracking is not None:
        trial_id = tune.get_context().get_trial_id()
        run_logger = TrialRunLogger(settings.tracking, trial_id, config, train_config.to_dict(), TUNE_METRIC)
    try:
        train_and_report(train_config, settings, run_logger)
    except Exception as err:
        if run_logger is not None:
            run_logger.finish("failed", err)
        raise
    if run_logger is not None:
        run_logger.finish("completed")


def train_and_report(train_config: TrainConfig, settings: TrialSettings, run_logger: TrialRunLogger | None) -> None:
    data = load_dataset(settings.data)
    experiment_path = storage_location(settings.experiment_path)

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = read_training_state(folder)
        resume = resume_state(saved)
        record_attempt(experiment_path, resume)
        model = build_model(train_config, data.n_items)
        pretraining = saved["pretraining"]
    else:
        resume = None
        record_attempt(experiment_path, resume)
        store = PretrainingStore(pretraining_folder(experiment_path))
        model, pretraining = pretrained_model(train_config, data, store)

    if run_logger is not None:
        run_logger.log_pretraining(pretraining)
    reporter = Reporter(train_config, data, pretraining, run_logger)
    train_group(model, data, train_config, callback=reporter, resume=resume, progress=False)


def pretrained_model(config: TrainConfig, data: GroupIMData, store: PretrainingStore) -> tuple[GroupIM, dict[str, Any]]:
    """Build the trial's model and bring it through user and MI pre-training via the store.

    Returns the model and a summary of both phases: whether each was reused, its seconds.
    """
    model = build_model(config, data.n_items)
    summary: dict[str, Any] = {}

    if config.pretrain_user:
        stored = store.get_or_compute(
            phase_key(USER_PHASE, config, data.checksum), lambda: _run_user_phase(model, data, config)
        )
        _load_phase_state(model, stored)
        summary.update(_phase_summary(USER_PHASE, stored))
        summary[f"pretrain_user_val_{SELECTION_METRIC}"] = stored.info[f"val_user_{SELECTION_METRIC}"]

    if config.pretrain_mi:
        stored = store.get_or_compute(
            phase_key(MI_PHASE, config, data.checksum), lambda: _run_mi_phase(model, data, config)
        )
        _load_phase_state(model, stored)
        summary.update(_phase_summary(MI_PHASE, stored))
        summary["pretrain_mi_final_loss"] = stored.info["history"][-1]["loss_mi"] if stored.info["history"] else math.nan
    return model, summary


def _run_user_phase(model: GroupIM, data: GroupIMData, config: TrainConfig):
    """User pre-training; stores only the entries it changed.

    User pre-training trains the encoder and copies its item embeddings into the group
    predictor, but never touches the aggregator or the discriminator. Storing only the
    changed entries lets a trial with another aggregator keep its own initial aggregator
    and discriminator, exactly as if it had pre-trained itself. This is exact because
    build_model creates the encoder first from the seed, so the encoder's initial weights
    do not depend on the aggregator.
    """
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    info = pretrain_user(model, data, config, progress=False)
    changed = {name: tensor for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    return changed, info


def _run_mi_phase(model: GroupIM, data: GroupIMData, config: TrainConfig):
    info = pretrain_mi(model, data, config, progress=False)
    return dict(model.state_dict()), info


def _load_phase_state(model: GroupIM, stored: StoredState) -> None:
    if not stored.reused:
        return  # the model itself computed the state
    missing_and_unexpected = model.load_state_dict(stored.state, strict=False)
    if missing_and_unexpected.unexpected_keys:
        raise RuntimeError(
            f"pre-trained state {stored.key.name} has entries the model lacks: {missing_and_unexpected.unexpected_keys}"
        )


def _phase_summary(phase: str, stored: StoredState) -> dict[str, Any]:
    return {
        f"pretrain_{phase}_reused": stored.reused,
        f"pretrain_{phase}_seconds": stored.seconds,
        f"pretrain_{phase}_compute_seconds": stored.compute_seconds,
        f"pretrain_{phase}_key": stored.key.name,
    }


class Reporter:
    """The train_group callback: reports each evaluation to Ray Tune with a checkpoint, and to MLflow."""

    def __init__(
        self, config: TrainConfig, data: GroupIMData, pretraining: dict[str, Any], run_logger: TrialRunLogger | None = None
    ) -> None:
        self.config = config
        self.data = data
        self.pretraining = pretraining
        self.run_logger = run_logger

    def __call__(self, evaluation: Evaluation) -> None:
        check_finite(evaluation)
        # Ray's progress table shows the first few metrics of a result, so the selection
        # metric and the recalls come first.
        names = [SELECTION_METRIC, "recall@20", "recall@50"]
        names += [name for name in METRICS if name not in names]
        metrics = {TIME_ATTR: evaluation.epoch}
        metrics.update({VALIDATION_PREFIX + name: evaluation.metrics[name] for name in names})
        metrics.update(
            train_loss=evaluation.train_loss,
            epoch_seconds=evaluation.seconds,
            best_epoch=evaluation.state.best_epoch,
            **self.pretraining,
        )
        if self.run_logger is not None:
            self.run_logger.log_result(metrics)  # only queues them, so a slow store never delays training
        summary = {TIME_ATTR: evaluation.epoch, **{VALIDATION_PREFIX + name: evaluation.metrics[name] for name in METRICS}}
        with tempfile.TemporaryDirectory(prefix="groupim-checkpoint-") as folder:
            write_checkpoint(Path(folder), self.checkpoint_payload(evaluation), summary)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    def checkpoint_payload(self, evaluation: Evaluation) -> dict[str, Any]:
        payload = evaluation.checkpoint()
        if evaluation.is_best:
            # The best state is the current model; storing it twice would double the file.
            payload["best_model"] = None
        payload.update(
            config=self.config.to_dict(),
            n_items=self.data.n_items,
            data_checksum=self.data.checksum,
            metrics={name: evaluation.metrics[name] for name in METRICS},
            pretraining=self.pretraining,
        )
        return payload


def check_finite(evaluation: Evaluation) -> None:
    """Raise TrialDiverged when the loss, a validation metric or a model weight is NaN or infinite.

    The weights are checked too because the ranking metrics rank NaN scores as -inf and
    stay finite, and the loss can still be finite in the epoch the weights overflow.
    """
    values = {"train_loss": evaluation.train_loss, **{name: evaluation.metrics[name] for name in METRICS}}
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    bad_weights = [name for name, weight in evaluation.model.named_parameters() if not torch.isfinite(weight).all()]
    if bad_weights:
        bad["non-finite weights"] = bad_weights
    if bad:
        raise TrialDiverged(f"training diverged at group epoch {evaluation.epoch}: {bad}")


def resume_state(saved: dict[str, Any]) -> dict[str, Any]:
    """Build the `resume` argument of train_group from a checkpoint written by Reporter."""
    resume = dict(saved)
    if resume["best_model"] is None and resume["best_epoch"] == resume["epoch"]:
        resume["best_model"] = resume["model"]
    return resume


def pretraining_folder(experiment_path: Path | RemotePath) -> Path:
    """Return the folder of the shared pre-trained states of an experiment.

    PretrainingStore needs file locks, which object stores lack. With the experiment on a
    URI, each node keeps the states in its own cache folder, so trials share a pre-trained
    state only with trials on the same node.
    """
    if isinstance(experiment_path, Path):
        return experiment_path / PRETRAINING_FOLDER
    digest = hashlib.sha256(str(experiment_path).encode()).hexdigest()[:16]
    return cache_root() / PRETRAINING_FOLDER / f"{experiment_path.name}-{digest}"


def record_attempt(experiment_path: Path | RemotePath, resume: dict[str, Any] | None) -> None:
    """Append this start of the trial to attempts/<trial id>.jsonl in the experiment folder."""
    context = tune.get_context()
    line = {
        "trial_id": context.get_trial_id(),
        "start_epoch": 0 if resume is None else int(resume["epoch"]),
        "pid": os.getpid(),
        "node_id": ray.get_runtime_context().get_node_id(),  # the Ray node that runs this attempt
        "time": time.time(),
    }
    append_line(experiment_path / ATTEMPTS_FOLDER / f"{context.get_trial_id()}.jsonl", json.dumps(line))
