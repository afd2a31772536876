"""Retrain one configuration from scratch with several seeds in parallel Ray tasks, and test each.

Each seed is one Ray task with one CPU and one torch thread. It runs GroupIM's three
phases with `groupim.train.fit`, so the validation groups choose the best group epoch,
and then evaluates that model once on the test groups and the test users. The task
returns the metrics, the validation history and the model's weights; the driver saves
the weights as a groupim checkpoint.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

from groupim.checkpoint import save_checkpoint
from groupim.config import TrainConfig
from groupim.data import DataError, GroupIMData, load_dataset
from groupim.evaluate import evaluate_groups, evaluate_users
from groupim.metrics import METRICS
from groupim.model import GroupIM
from groupim.train import fit

logger = logging.getLogger(__name__)

CPUS_PER_SEED = 1  # also the seed's torch threads
# NOTE: seeds train on the CPU only. A task reserves no GPU, so device=cuda could pick a GPU
# that Ray gave to another task; GPU seeds would need num_gpus in the task options.
SEED_DEVICE = "cpu"
CHECKPOINT_FOLDER = "models"  # in the report folder: seed-<seed>.pt


@dataclass
class SeedResult:
    """The outcome of one seed; `error` is None when it succeeded."""

    seed: int
    error: str | None = None
    test_groups: dict[str, float] = field(default_factory=dict)
    test_users: dict[str, float] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)  # best validation group metrics
    best_epoch: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # validation metrics per evaluation epoch
    seconds: float | None = None  # wall time of the three phases in the task
    state_dict: dict[str, torch.Tensor] | None = None  # the model of the best validation epoch, on the CPU
    checkpoint: str | None = None  # path relative to the report folder, once saved

    def to_report(self) -> dict[str, Any]:
        """Return the entry of report.json: everything but the weights."""
        return {
            "seed": self.seed,
            "error": self.error,
            "test_groups": self.test_groups,
            "test_users": self.test_users,
            "validation": self.validation,
            "best_epoch": self.best_epoch,
            "seconds": self.seconds,
            "checkpoint": self.checkpoint,
            "history": self.history,
        }


def evaluate_test_splits(model: GroupIM, data: GroupIMData, member_norm: str) -> dict[str, dict[str, float]]:
    """Evaluate `model` on the test groups and the test users; returns {split: {metric: value}}.

    Test users are ranked from their fold-in items through the group predictor
    (pretraining=False), the way group training left the model.
    """
    groups = data.test_groups
    group_result = evaluate_groups(model, groups.group_members, groups.group_items, data.member_items, member_norm)
    users = data.test_users
    user_result = evaluate_users(model, users.fold_in, users.held_out, pretraining=False)
    return {
        "test_groups": {name: float(group_result[name]) for name in METRICS},
        "test_users": {name: float(user_result[name]) for name in METRICS},
    }


def train_and_test(config_values: dict[str, Any], data_dir: str, data_checksum: str) -> dict[str, Any]:
    """Ray task body: train one seed's configuration and test it; returns SeedResult's fields."""
    config = TrainConfig.from_dict(config_values, source="report seed config")
    torch.set_num_threads(config.num_threads or CPUS_PER_SEED)
    data = load_dataset(data_dir)
    if data.checksum != data_checksum:
        raise DataError(
            f"{data_dir} on this node has checksum {data.checksum[:12]}, but the driver's copy has {data_checksum[:12]}; "
            "place the same data folder on every node"
        )

    start = time.perf_counter()
    result = fit(config, data, progress=False)
    seconds = time.perf_counter() - start
    metrics = evaluate_test_splits(result.model, data, config.member_norm)
    history = [{key: record[key] for key in ("epoch", "train_loss", *METRICS)} for record in result.group.history]
    return {
        "seed": config.seed,
        **metrics,
        "validation": {name: float(result.group.best_metrics[name]) for name in METRICS},
        "best_epoch": result.group.best_epoch,
        "history": history,
        "seconds": seconds,
        "state_dict": {key: value.detach().cpu() for key, value in result.model.state_dict().items()},
    }


def seed_config(config: TrainConfig, seed: int) -> TrainConfig:
    """Return the configuration that the task of `seed` trains: that seed, one thread, the CPU."""
    return config.replace(seed=seed, num_threads=CPUS_PER_SEED, device=SEED_DEVICE)


def run_seeds(config: TrainConfig, seeds: list[int], data: GroupIMData) -> list[SeedResult]:
    """Train and test `config` once per seed, in parallel Ray tasks; Ray must be initialised.

    A seed that fails (a diverged loss, a crashed worker after Ray's retries) gets its
    error in the result instead of stopping the other seeds. Results follow `seeds`.
    Every task reads the data from `data.source`, so on a cluster that folder must exist
    on every node. A seed on a node whose copy differs fails with a DataError.
    """
    task = ray.remote(train_and_test)
    pending = {}
    for seed in seeds:
        values = seed_config(config, seed).to_dict()
        reference = task.options(num_cpus=CPUS_PER_SEED, name=f"report-seed-{seed}").remote(values, data.source, data.checksum)
        pending[reference] = seed
    logger.info("training %d seeds in Ray tasks of %d CPU each", len(seeds), CPUS_PER_SEED)

    results = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        seed = pending.pop(done[0])
        try:
            results[seed] = SeedResult(**ray.get(done[0]))
        except Exception as err:  # noqa: BLE001 - one seed's failure must not lose the others
            results[seed] = SeedResult(seed=seed, error=_last_line(err))
            logger.error("seed %d failed: %s", seed, "".join(traceback.format_exception(err)))
            continue
        result = results[seed]
        logger.info(
            "seed %d done in %.0f s (%d of %d): test groups NDCG@20 %.4f, Recall@20 %.4f",
            seed, result.seconds, len(results), len(seeds), result.test_groups["ndcg@20"], result.test_groups["recall@20"],
        )
    return [results[seed] for seed in seeds]


def save_seed_models(results: list[SeedResult], config: TrainConfig, data: GroupIMData, folder: Path) -> None:
    """Save each successful seed's model as <folder>/models/seed-<seed>.pt and record the relative path."""
    for result in results:
        if result.state_dict is None:
            continue
        config_of_seed = seed_config(config, result.seed)
        model = GroupIM.from_config(data.n_items, config_of_seed)
        model.load_state_dict(result.state_dict)
        relative = Path(CHECKPOINT_FOLDER) / f"seed-{result.seed}.pt"
        metrics = {"validation": result.validation, "test_groups": result.test_groups, "test_users": result.test_users}
        save_checkpoint(folder / relative, model, config_of_seed, metrics, data.checksum)
        result.checkpoint = str(relative)


def _last_line(error: BaseException) -> str:
    """Return the last line of an error, which for a Ray task error names the original exception."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
