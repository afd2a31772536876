"""Hyper-parameter search of GroupIM with Ray Tune and ASHA.

    python search/run.py                                   # experiments/weeplaces.yaml
    python search/run.py --experiment experiments/smoke.yaml --data DIR
    python search/run.py --resume                          # continue an interrupted search

Ray's progress table shows the trials while they run. At the end the best trial's
configuration and validation metrics are printed, and trials.csv and best.json are
written to the experiment folder <storage_path>/<name>.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # `python search/run.py` puts search/ on sys.path, not the folder that contains the packages.
    sys.path.insert(0, str(REPO_ROOT))

import ray  # noqa: E402
import yaml  # noqa: E402
from filelock import FileLock, Timeout  # noqa: E402

from groupim.data import DataError, load_dataset  # noqa: E402
from groupim.metrics import METRICS  # noqa: E402
from search import mlflow_search  # noqa: E402
from search.checkpoints import prune_all_trials  # noqa: E402
from search.experiment import Experiment, ExperimentError, load_experiment  # noqa: E402
from search.results import FAILED, STOPPED_EARLY, UNFINISHED, SearchSummary, summarize, write_results  # noqa: E402
from search.storage import StorageError, check_storage_path, is_uri  # noqa: E402
from search.trainable import TUNE_METRIC  # noqa: E402
from search.tuner import can_restore, new_tuner, restore_tuner  # noqa: E402
from search.registry import CHAMPION_ALIAS  # noqa: E402
from search.tracking import TrackingError, TrackingTarget, resolve_tracking_uri  # noqa: E402

logger = logging.getLogger("search")

DEFAULT_EXPERIMENT = REPO_ROOT / "experiments" / "weeplaces.yaml"
SNAPSHOT_FILE = "experiment.yaml"  # the settings a search started with, reused by --resume

# Seconds between saves of Ray Tune's experiment state (trial statuses, searcher and
# scheduler). Ray's default of at least 10 s leaves a window in which a trial has finished
# but a killed driver has not recorded it, and --resume would then start it once more.
EXPERIMENT_STATE_PERIOD_S = "1"

EXIT_ERROR = 1  # the search ran but no trial succeeded
EXIT_USAGE = 2  # invalid experiment file, data or options
EXIT_INTERRUPTED = 130  # Ctrl-C: resume with --resume


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python search/run.py", description="Search GroupIM hyper-parameters with Ray Tune and ASHA."
    )
    parser.add_argument(
        "--experiment", default=str(DEFAULT_EXPERIMENT),
        help="experiment YAML file (default: experiments/weeplaces.yaml)",
    )
    parser.add_argument("--data", help="dataset folder; overrides the experiment's data")
    parser.add_argument(
        "--address", help="address of a running Ray cluster to join (default: $RAY_ADDRESS, else start a local one)"
    )
    parser.add_argument(
        "--storage-path",
        help="parent folder of the experiment folder, or a URI such as s3://BUCKET/PREFIX; overrides storage_path. "
        "On a multi-node Ray cluster a local folder must be on a file system shared by every node",
    )
    parser.add_argument("--num-samples", type=int, help="grid repetitions or TPE trials; overrides search.num_samples")
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the current folder "
        "with artifacts in ./mlartifacts)",
    )
    parser.add_argument(
        "--resume", action="store_true",
        help="continue the interrupted experiment in <storage_path>/<name> with the settings it started with",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    finally:
        while _HELD_LOCKS:
            _HELD_LOCKS.pop().release()


def run(argv: list[str] | None = None) -> int:
    """Run or resume the search of the command line and return the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # tensorboardX logs an INFO line for each metric name with "@" in every result of every
    # trial, which would bury Ray's progress table.
    logging.getLogger("tensorboardX").setLevel(logging.WARNING)
    try:
        experiment = prepare_experiment(args)
        data = load_dataset(experiment.data)
    except (ExperimentError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    logger.info(
        "experiment %s: %d trials on %s (%d items, %d training groups) in %s",
        experiment.name, experiment.num_trials, data.source, data.n_items, data.train_groups.n_groups, experiment.path,
    )
    start_ray(args.address)
    try:
        check_storage_path(experiment.storage_path)
    except StorageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        tracking = mlflow_search.start(resolve_tracking_uri(args.tracking_uri), experiment, data, args.resume)
    except TrackingError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if not args.resume:
        write_snapshot(experiment)

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", EXPERIMENT_STATE_PERIOD_S)
    start = time.perf_counter()
    tuner = restore_tuner(experiment, tracking) if args.resume else new_tuner(experiment, tracking)
    result_grid = tuner.fit()
    summary = summarize(experiment, result_grid)
    if not summary.interrupted:
        prune_all_trials(result_grid, experiment.checkpoints_to_keep, TUNE_METRIC)
    code = report(experiment, summary, time.perf_counter() - start, args)
    champion = mlflow_search.finish(tracking, experiment, summary, result_grid, data, code)
    print_tracking(tracking, champion)
    return code


def prepare_experiment(args: argparse.Namespace) -> Experiment:
    """Load the experiment of the command line, or for --resume the one saved at its start."""
    if args.num_samples is not None and args.num_samples < 1:
        raise ExperimentError(f"invalid --num-samples {args.num_samples}; expected an integer >= 1")
    experiment = load_experiment(
        args.experiment, data=args.data, storage_path=args.storage_path, num_samples=args.num_samples
    )
    lock_experiment(experiment)
    restorable = can_restore(experiment)
    if not args.resume:
        if restorable:
            raise ExperimentError(
                f"{experiment.path} already contains a search; pass --resume to continue it, or start a new "
                "one with another --storage-path or experiment name"
            )
        return experiment

    snapshot = experiment.path / SNAPSHOT_FILE
    if not restorable or not snapshot.is_file():
        raise ExperimentError(f"no search to resume in {experiment.path}; start one without --resume")
    saved = load_experiment(snapshot, data=args.data, storage_path=experiment.storage_path)
    if args.num_samples is not None and args.num_samples != saved.num_samples:
        raise ExperimentError(
            f"--num-samples {args.num_samples} differs from the {saved.num_samples} the search started with; "
            "a resumed search keeps its number of samples"
        )
    if _comparable(saved) != _comparable(experiment):
        logger.warning(
            "%s differs from the settings the search started with; resuming with those saved in %s",
            args.experiment, snapshot,
        )
    return saved


# Locks held until the driver exits; the operating system releases them when it dies.
_HELD_LOCKS: list[FileLock] = []


def lock_experiment(experiment: Experiment) -> None:
    """Hold a lock on the experiment folder, so that a second driver cannot run the same search.

    NOTE: only local and shared-file-system paths are locked; an s3:// experiment has no lock.
    """
    if is_uri(str(experiment.storage_path)):
        return
    lock_file = Path(experiment.storage_path) / f".{experiment.name}.lock"
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExperimentError(
            f"cannot create the storage folder {lock_file.parent} ({err.strerror}). "
            "Pass --storage-path a folder, or a path that does not exist yet"
        ) from None
    lock = FileLock(lock_file)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ExperimentError(
            f"another search is running in {experiment.path} (lock {lock_file}); wait for it to end, "
            "or stop it and then continue with --resume"
        ) from None
    _HELD_LOCKS.append(lock)


def _comparable(experiment: Experiment) -> dict:
    values = experiment.to_dict()
    for key in ("data", "storage_path"):
        values.pop(key)
    return values


def write_snapshot(experiment: Experiment) -> None:
    experiment.path.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(experiment.to_dict(), sort_keys=False)
    (experiment.path / SNAPSHOT_FILE).write_text(
        f"# Settings this search started with; `python search/run.py --resume` reads them.\n{text}"
    )


def start_ray(address: str | None) -> None:
    """Join the cluster at `address` or $RAY_ADDRESS, or start a local one, unless Ray runs already."""
    if ray.is_initialized():
        return
    ray.init(address=address, runtime_env=ray_runtime_env())


def ray_runtime_env() -> dict:
    """Ray's runtime environment for the workers that run trials.

    The packages travel to the workers as py_modules, so trials on other nodes, and workers
    started from another current directory, import the same groupim and search as the driver.
    """
    return {"py_modules": [str(REPO_ROOT / "groupim"), str(REPO_ROOT / "search")]}


def report(experiment: Experiment, summary: SearchSummary, seconds: float, args: argparse.Namespace) -> int:
    """Print the outcome, write trials.csv and best.json, and return the exit status."""
    statuses = [row["status"] for row in summary.rows]
    if summary.interrupted:
        print(
            f"\nThe search was interrupted with {statuses.count(UNFINISHED)} of {len(statuses)} trials unfinished. "
            f"Continue it with:\n  python search/run.py --experiment {args.experiment} "
            f"--storage-path {experiment.storage_path} --resume"
        )
        return EXIT_INTERRUPTED

    trials_path, best_path = write_results(experiment, summary)
    took = f"{seconds / 60:.1f} min" + (" since --resume" if args.resume else "")
    print(
        f"\n{len(statuses)} trials, {took}: {statuses.count(FAILED)} failed, "
        f"{statuses.count(STOPPED_EARLY)} stopped early by ASHA."
    )
    _print_pretraining(summary)
    print(f"Trials: {trials_path}")
    if summary.best is None:
        print(f"error: all {len(statuses)} trials failed; their errors are in {trials_path}", file=sys.stderr)
        return EXIT_ERROR

    best = summary.best
    settings = ", ".join(f"{name}={value}" for name, value in best["config"].items())
    metrics = ", ".join(f"{name} {best['metrics']['val/' + name]:.4f}" for name in METRICS)
    print(f"Best trial {best['trial_id']} at group epoch {best['epoch']}: {settings}")
    print(f"  validation: {metrics}")
    print(f"  checkpoint: {best['checkpoint']}")
    print(f"Best: {best_path}")
    return 0


def print_tracking(tracking: TrackingTarget, champion) -> None:
    print(f"MLflow: parent run {tracking.parent_run_id} in {tracking.tracking_uri}")
    if champion is not None:
        print(f"  model: models:/{champion.name}@{CHAMPION_ALIAS} (version {champion.version})")
    if tracking.tracking_uri.startswith("sqlite:"):
        print(f"  browse: mlflow ui --backend-store-uri {tracking.tracking_uri}")


def _print_pretraining(summary: SearchSummary) -> None:
    for phase, totals in summary.pretraining.items():
        print(
            f"{phase} pre-training: computed {totals['computed']} times ({totals['compute_seconds']:.0f} s), "
            f"reused {totals['reused']} times, saving {totals['saved_seconds']:.0f} trial-seconds"
        )


if __name__ == "__main__":
    sys.exit(main())
