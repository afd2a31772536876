"""Ray Tune objects built from an Experiment: search space, searcher, ASHA, trainable, Tuner."""

from __future__ import annotations

import itertools
import random
from typing import Any

from ray import tune
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from search.asha import ResumableASHA
from search.checkpoints import CheckpointPruner
from search.experiment import Axis, Experiment
from search.mlflow_search import TrialRunStatus
from search.tracking import TrackingTarget
from search.trainable import TIME_ATTR, TUNE_METRIC, TUNE_MODE, TrialSettings, train_trial


def param_space(experiment: Experiment) -> dict[str, Any]:
    """Ray Tune's search space: one entry per axis.

    A grid axis becomes a choice over its values: the grid itself reaches Ray as the
    searcher's points_to_evaluate (see search_algorithm), so nothing is ever sampled.
    """
    return {axis.name: _domain(axis) for axis in experiment.axes}


def _domain(axis: Axis) -> Any:
    if axis.kind in ("grid", "choice"):
        return tune.choice(list(axis.values))
    if axis.kind == "uniform":
        return tune.uniform(*axis.values)
    if axis.kind == "loguniform":
        return tune.loguniform(*axis.values)
    if axis.kind == "quniform":
        return tune.quniform(*axis.values)
    if axis.kind == "randint":
        return tune.randint(int(axis.values[0]), int(axis.values[1]))
    raise ValueError(f"unknown axis kind {axis.kind!r} of {axis.name}")


def search_algorithm(experiment: Experiment) -> OptunaSearch | BasicVariantGenerator:
    """Return Optuna's TPE sampler for algorithm tpe, or for grid a generator of grid_points in order.

    Ray's grid_search would start the configurations in axis order, for example all
    maxpool trials with embedding size 32 before any with 128. Asynchronous ASHA promotes
    every trial that is among the best seen so far at a rung, so an order in which later
    trials tend to be better lets the first dozen trials all train to max_epochs. A
    shuffled order, fixed by search.seed, shows ASHA a mixed sample from the start.
    """
    if experiment.algorithm == "tpe":
        return OptunaSearch(seed=experiment.search_seed)
    return BasicVariantGenerator(points_to_evaluate=grid_points(experiment))


def grid_points(experiment: Experiment) -> list[dict[str, Any]]:
    """Return every grid configuration num_samples times, in the order the trials start.

    The order is shuffled with search.seed (default 0), then sorted by the axes of
    search.largest_first, larger values first. The sort is stable: configurations that
    tie on those axes keep their shuffled order. Starting the slowest trials (the largest
    embeddings) first is the longest-job-first rule: the short trials fill the slots at
    the end of the search instead of one long trial running alone. It also gives ASHA's
    first rungs the strongest configurations of the Weeplaces grid to compare with, so
    fewer weak trials are promoted before any rival has reached their rung
    (benchmarks/search.md measures both orders).
    """
    names = [axis.name for axis in experiment.axes]
    combinations = list(itertools.product(*(axis.values for axis in experiment.axes)))
    points = [dict(zip(names, values)) for values in combinations] * experiment.num_samples
    random.Random(experiment.search_seed or 0).shuffle(points)
    points.sort(key=lambda point: tuple(-point[name] for name in experiment.largest_first))
    return points


def scheduler(experiment: Experiment) -> ResumableASHA:
    """ASHA on validation NDCG@100 in group-training epochs; metric and mode come from TuneConfig."""
    settings = experiment.scheduler
    return ResumableASHA(
        time_attr=TIME_ATTR,
        max_t=settings.max_epochs,
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
    )


def trainable(experiment: Experiment, tracking: TrackingTarget | None = None):
    """train_trial with the experiment's shared settings and each trial's resources."""
    settings = TrialSettings(
        train=experiment.train.to_dict(),
        data=None if experiment.data is None else str(experiment.data),
        experiment_path=str(experiment.path),
        threads=experiment.resources.torch_threads,
        tracking=tracking,
    )
    resources = {"cpu": experiment.resources.cpus_per_trial, "gpu": experiment.resources.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(train_trial, settings=settings), resources)


def new_tuner(experiment: Experiment, tracking: TrackingTarget | None = None) -> tune.Tuner:
    """Create a Tuner that starts the experiment in experiment.path; trials log to `tracking`."""
    return tune.Tuner(
        trainable(experiment, tracking),
        param_space=param_space(experiment),
        tune_config=tune.TuneConfig(
            metric=TUNE_METRIC,
            mode=TUNE_MODE,
            search_alg=search_algorithm(experiment),
            scheduler=scheduler(experiment),
            num_samples=experiment.num_trials,
            max_concurrent_trials=experiment.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=experiment.name,
            storage_path=str(experiment.storage_path),
            # No num_to_keep: CheckpointPruner deletes surplus checkpoints once a trial has
            # ended (search/checkpoints.py explains why Ray must not do it).
            checkpoint_config=tune.CheckpointConfig(
                checkpoint_score_attribute=TUNE_METRIC,
                checkpoint_score_order=TUNE_MODE,
            ),
            failure_config=tune.FailureConfig(max_failures=experiment.max_failures),
            callbacks=[CheckpointPruner(experiment.checkpoints_to_keep, TUNE_METRIC)]
            + ([TrialRunStatus(experiment)] if tracking is not None else []),
        ),
    )


def restore_tuner(experiment: Experiment, tracking: TrackingTarget | None = None) -> tune.Tuner:
    """Restore the interrupted experiment in experiment.path with its searcher and scheduler state.

    Unfinished trials continue from their latest checkpoint; finished and failed trials
    stay as they are, so none of them runs again.
    """
    return tune.Tuner.restore(
        str(experiment.path),
        trainable(experiment, tracking),
        resume_unfinished=True,
        resume_errored=False,
        restart_errored=False,
    )


def can_restore(experiment: Experiment) -> bool:
    return tune.Tuner.can_restore(str(experiment.path))
