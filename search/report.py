"""Final test report: retrain a searched configuration with several seeds and test it.

    python search/report.py                                      # champion of experiments/weeplaces.yaml
    python search/report.py --model models:/groupim-weeplaces@champion --seeds 5 --set epochs=200
    python search/report.py --run-id RUN_ID                      # any trial run of a search

The configuration comes from a registered model version or a trial run in MLflow. It is
retrained from scratch once per seed, in parallel Ray tasks. The model of each seed's best
validation epoch is evaluated on the test groups and the test users, and so is the
registered checkpoint itself. The report folder (default reports/<experiment>) gets report.md,
report.json, two PNG plots and each seed's model under models/, and the report is logged
as an MLflow run in the search's experiment, tagged with the search's parent run id.
The search itself never evaluates on the test split.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # `python search/report.py` puts search/ on sys.path, not the folder that contains the packages.
    sys.path.insert(0, str(REPO_ROOT))

from mlflow.exceptions import MlflowException  # noqa: E402

from groupim.config import ConfigError, TrainConfig, parse_overrides  # noqa: E402
from groupim.data import DataError, GroupIMData, load_dataset  # noqa: E402
from search.experiment import ExperimentError, load_experiment  # noqa: E402
from search.registry import CHAMPION_ALIAS, registered_model_name  # noqa: E402
from search.report_plots import LANDSCAPE_PLOT, VALIDATION_PLOT, plot_search_landscape, plot_validation_curves  # noqa: E402
from search.report_seeds import (  # noqa: E402
    CHECKPOINT_FOLDER,
    SeedResult,
    evaluate_test_splits,
    run_seeds,
    save_seed_models,
    seed_config,
)
from search.report_source import (  # noqa: E402
    GROUPIM_CHECKPOINT,
    ReportError,
    ReportSource,
    resolve_model,
    resolve_run,
)
from search.report_tracking import fail_report_run, finish_report_run, search_landscape, start_report_run  # noqa: E402
from search.report_writer import build_report, write_json, write_markdown  # noqa: E402
from search.run import DEFAULT_EXPERIMENT, start_ray  # noqa: E402
from search.tracking import TrackingError, git_commit, new_client, resolve_tracking_uri  # noqa: E402

logger = logging.getLogger("search.report")

DEFAULT_SEEDS = 5
REPORTS_FOLDER = "reports"  # the default output is reports/<experiment> in the working folder
REGISTERED_CHECKPOINT = "registered.pt"  # in the models folder: the evaluated checkpoint, as downloaded
# Settings that each seed's Ray task fixes: one CPU, one torch thread, no GPU.
FIXED_SETTINGS = ("num_threads", "device")
LIBRARIES = ("groupim", "torch", "numpy", "scipy", "pandas", "ray", "mlflow", "matplotlib")

EXIT_FAILED = 1  # every seed failed, or the report could not be logged to MLflow
EXIT_USAGE = 2  # invalid options, or a model, run or data folder not found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python search/report.py",
        description="Retrain a searched GroupIM configuration with several seeds and report its test metrics.",
    )
    source_options = parser.add_mutually_exclusive_group()
    source_options.add_argument(
        "--model", help="registered model to report on, models:/NAME@ALIAS or models:/NAME/VERSION "
        "(default: models:/groupim-<experiment>@champion)",
    )
    source_options.add_argument("--run-id", help="MLflow run id of a search trial to report on, instead of a registered model")
    parser.add_argument(
        "--experiment", default=str(DEFAULT_EXPERIMENT),
        help="experiment YAML whose champion is the default model (default: experiments/weeplaces.yaml)",
    )
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help=f"number of seeds to retrain with (default {DEFAULT_SEEDS})")
    parser.add_argument(
        "--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="change training settings of the searched configuration, e.g. epochs=200; seed sets the first seed",
    )
    parser.add_argument("--data", help="dataset folder (default: the folder the search read, from its MLflow parent run)")
    parser.add_argument("--output", help="report folder (default: reports/<experiment>)")
    parser.add_argument("--address", help="address of a running Ray cluster to join (default: $RAY_ADDRESS, else start a local one)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    return parser


@dataclass(frozen=True)
class ReportPlan:
    """The source, configuration, data and output folder of a report, checked before any training starts."""

    tracking_uri: str
    source: ReportSource
    config: TrainConfig  # the searched configuration with the --set changes
    overrides: dict[str, Any]
    data: GroupIMData
    registered: dict[str, Any] | None  # test metrics of the source's own checkpoint
    output: Path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        plan = plan_report(args)
    except (ReportError, ConfigError, DataError, ExperimentError, TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except MlflowException as err:
        print(f"error: MLflow request failed: {err.message}; check --tracking-uri and that its server is running", file=sys.stderr)
        return EXIT_USAGE

    logger.info("report on %s: %d seeds of %s, writing to %s", plan.source.description, args.seeds, plan.config, plan.output)
    start_ray(args.address)
    seeds_start = time.perf_counter()
    seeds = run_seeds(plan.config, [plan.config.seed + offset for offset in range(args.seeds)], plan.data)
    seeds_seconds = time.perf_counter() - seeds_start
    save_seed_models(seeds, plan.config, plan.data, plan.output)
    wall_time = {"seeds_seconds": seeds_seconds, "search_seconds": plan.source.search_seconds}
    return publish(plan, seeds, wall_time, start)


def plan_report(args: argparse.Namespace) -> ReportPlan:
    """Resolve the source in MLflow, load and check the data, and evaluate the source's checkpoint."""
    overrides = check_options(args)
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    client = new_client(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="groupim-report-") as scratch:
        source = resolve_source(args, client, tracking_uri, Path(scratch))
        output = prepare_output(args.output, source)
        source = keep_checkpoint(source, output)
    config = source.config.replace(**overrides)
    data = load_report_data(args.data, source)
    registered = evaluate_checkpoint(source, data)
    return ReportPlan(tracking_uri, source, config, overrides, data, registered, output)


def publish(plan: ReportPlan, seeds: list[SeedResult], wall_time: dict[str, float | None], start: float) -> int:
    """Draw the plots, write report.md and report.json, log them as an MLflow run; return the exit status."""
    client = new_client(plan.tracking_uri)
    plots = draw_plots(client, plan.source, seeds, plan.output)
    run_id = start_report_run(client, plan.source, plan.data.checksum, git_commit(REPO_ROOT))
    try:
        report = build_report(
            source={**plan.source.to_report(plan.tracking_uri), "report_run_id": run_id},
            config=seed_config(plan.config, plan.config.seed).to_dict(),  # as the first seed trains it
            overrides=plan.overrides,
            seeds=[seed.to_report() for seed in seeds],
            registered=plan.registered,
            data=data_summary(plan.data),
            versions=library_versions(),
            wall_time={"report_seconds": time.perf_counter() - start, **wall_time},
            plots=plots,
        )
        files = [write_markdown(report, plan.output), write_json(report, plan.output)]
        files += [plan.output / name for name in plots.values()]
        finish_report_run(client, run_id, plan.source, report, files)
    except (MlflowException, OSError) as err:
        fail_report_run(client, run_id)
        print(f"error: could not write or log the report to MLflow run {run_id}: {err}", file=sys.stderr)
        return EXIT_FAILED
    return print_outcome(report, plan.output)


def check_options(args: argparse.Namespace) -> dict[str, Any]:
    """Validate the options and return the --set overrides as a mapping."""
    if args.seeds < 1:
        raise ReportError(f"invalid --seeds {args.seeds}; expected an integer >= 1")
    if args.seeds == 1:
        logger.warning("one seed gives no standard deviation or confidence interval; pass --seeds 2 or more")
    overrides = parse_overrides(args.set)
    known = set(TrainConfig().to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in --set overrides: {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    fixed = sorted(set(overrides) & set(FIXED_SETTINGS))
    if fixed:
        raise ConfigError(
            f"--set {', '.join(fixed)} is not allowed: each seed trains on the CPU with one CPU and one torch thread"
        )
    return overrides


def resolve_source(args: argparse.Namespace, client, tracking_uri: str, scratch: Path) -> ReportSource:
    """Find the configuration to report on: --run-id, --model, or the default experiment's champion."""
    if args.run_id:
        return resolve_run(client, args.run_id, tracking_uri, scratch)
    model_uri = args.model
    if model_uri is None:
        experiment = load_experiment(args.experiment)
        model_uri = f"models:/{registered_model_name(experiment.name)}@{CHAMPION_ALIAS}"
    return resolve_model(client, model_uri, tracking_uri, scratch)


def prepare_output(output: str | None, source: ReportSource) -> Path:
    """Create the report folder: --output, else reports/<experiment> in the working folder."""
    folder = Path(output or Path(REPORTS_FOLDER) / source.experiment_name).resolve()
    if folder.exists() and not folder.is_dir():
        raise ReportError(f"--output {folder} is a file; pass a folder for the report")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def keep_checkpoint(source: ReportSource, output: Path) -> ReportSource:
    """Copy a downloaded checkpoint into the report's models folder, so that it outlives the download folder."""
    if source.checkpoint is None or source.checkpoint.kind != GROUPIM_CHECKPOINT:
        return source
    copy_path = output / CHECKPOINT_FOLDER / REGISTERED_CHECKPOINT
    copy_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source.checkpoint.path, copy_path)
    return replace(source, checkpoint=replace(source.checkpoint, path=copy_path))


def load_report_data(data_dir: str | None, source: ReportSource) -> GroupIMData:
    """Load --data, else the folder the search read; raise ReportError when its checksum differs from the search's."""
    folder = data_dir or source.data_source
    if folder is not None and not Path(folder).is_dir():
        raise ReportError(f"data folder {folder} not found; pass --data DIR with the data the search used")
    data = load_dataset(folder)
    if source.data_checksum and data.checksum != source.data_checksum:
        raise ReportError(
            f"{data.source} has checksum {data.checksum[:12]}, but the search trained on data with checksum "
            f"{source.data_checksum[:12]}; pass --data DIR with the data the search used"
        )
    return data


def evaluate_checkpoint(source: ReportSource, data: GroupIMData) -> dict[str, Any] | None:
    """Evaluate the source's own checkpoint on the test splits; None when it has none."""
    if source.checkpoint is None:
        logger.warning("%s has no checkpoint to evaluate; the report shows the retrained seeds only", source.description)
        return None
    model = source.checkpoint.load_model()
    if model.n_items != data.n_items:
        raise ReportError(f"{source.checkpoint.path} has {model.n_items} items but {data.source} has {data.n_items}")
    return {"label": source.checkpoint.label, **evaluate_test_splits(model, data, source.config.member_norm)}


def draw_plots(client, source: ReportSource, seeds: list[SeedResult], output: Path) -> dict[str, str]:
    """Draw the validation curves and, when the search's trials are in MLflow, the search landscape.

    Returns the plot file names relative to `output`, keyed "validation" and "landscape".
    """
    plots = {"validation": plot_validation_curves([seed.to_report() for seed in seeds], output / VALIDATION_PLOT).name}
    if source.parent_run_id is None:
        logger.warning("%s belongs to no search parent run; the report has no search landscape", source.description)
        return plots
    trials = search_landscape(client, source.experiment_id, source.parent_run_id)
    try:
        plots["landscape"] = plot_search_landscape(trials, output / LANDSCAPE_PLOT).name
    except ValueError as err:
        logger.warning("no search landscape for parent run %s: %s", source.parent_run_id, err)
    return plots


def data_summary(data: GroupIMData) -> dict[str, Any]:
    return {
        "source": data.source,
        "checksum": data.checksum,
        "n_users": data.n_users,
        "n_items": data.n_items,
        "test_groups": data.test_groups.n_groups,
        "test_users": len(data.test_users.user_ids),
    }


def library_versions() -> dict[str, str | None]:
    """Return the versions of Python and the libraries that train and evaluate, and the git commit."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["git commit"] = git_commit(REPO_ROOT)
    return versions


def print_outcome(report: dict[str, Any], output: Path) -> int:
    summary = report["summary"]["test_groups"]
    succeeded = summary["ndcg@20"]["n"]
    print(f"\n{succeeded} of {len(report['seeds'])} seeds succeeded. Test groups, mean over the seeds:")
    for name, values in summary.items():
        if values["mean"] is not None:
            print(f"  {name}: {values['mean']:.4f}")
    print(f"Report: {output / 'report.md'}")
    print(f"MLflow run: {report['source']['report_run_id']}")
    if succeeded == 0:
        print("error: every seed failed; their errors are in report.md", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
