"""Group-training throughput of Ray Tune trials: two trials at one CPU each against one trial at two CPUs.

Usage:
    python benchmarks/bench_search.py --data ../shared/data/weeplaces [--epochs 4] [--cpus 2]

Both layouts run the same two configurations through `search/run.py` on a local Ray
runtime with `--cpus` CPUs, without pre-training and with one evaluation at the end. The
rate of a trial is its group epochs divided by its running time (Ray's time_total_s: data
loading, model set-up, the epochs and the one evaluation). The rate of the parallel layout
is the sum over its two trials, which run at the same time. The rate of the sequential
layout is the mean of its trials. It prints one JSON record.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import ray
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from search.run import main as run_search, ray_runtime_env  # noqa: E402


def experiment_file(folder: Path, name: str, epochs: int, cpus_per_trial: int, max_concurrent: int) -> Path:
    values = {
        "name": name,
        "base": str(REPO_ROOT / "experiments" / "default.yaml"),
        "train": {"pretrain_user": False, "pretrain_mi": False, "eval_freq": epochs},
        "search": {
            "algorithm": "grid",
            "max_concurrent_trials": max_concurrent,
            "axes": {"aggregator": {"grid": ["meanpool", "attention"]}},
        },
        "scheduler": {"grace_period": epochs, "reduction_factor": 3, "max_epochs": epochs},
        "resources": {"cpus_per_trial": cpus_per_trial},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def trial_rates(experiment_dir: Path) -> list[float]:
    """Group epochs per minute of each trial over its running time."""
    rates = []
    for progress in sorted(experiment_dir.glob("*/progress.csv")):
        history = pd.read_csv(progress)
        epochs = int(history["epoch"].iloc[-1])
        seconds = float(history["time_total_s"].iloc[-1])
        rates.append(60.0 * epochs / seconds)
    return rates


def run_layout(data: str, storage: Path, name: str, epochs: int, cpus_per_trial: int, max_concurrent: int) -> dict:
    experiment = experiment_file(storage, name, epochs, cpus_per_trial, max_concurrent)
    start = time.perf_counter()
    code = run_search(["--experiment", str(experiment), "--data", data, "--storage-path", str(storage)])
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"the {name} search failed with exit status {code}")
    rates = trial_rates(storage / name)
    combined = sum(rates) if max_concurrent > 1 else sum(rates) / len(rates)
    return {"trial_epochs_per_minute": rates, "epochs_per_minute": combined, "wall_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="dataset folder")
    parser.add_argument("--epochs", type=int, default=4, help="group epochs per trial")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray runtime")
    args = parser.parse_args()

    ray.init(num_cpus=args.cpus, include_dashboard=False, runtime_env=ray_runtime_env())
    with tempfile.TemporaryDirectory(prefix="bench-search-") as folder:
        storage = Path(folder)
        record = {
            "epochs": args.epochs,
            "two_trials_one_cpu_each": run_layout(args.data, storage, "parallel", args.epochs, 1, 2),
            "one_trial_two_cpus": run_layout(args.data, storage, "sequential", args.epochs, 2, 1),
        }
    ray.shutdown()
    record["parallel_over_sequential"] = (
        record["two_trials_one_cpu_each"]["epochs_per_minute"] / record["one_trial_two_cpus"]["epochs_per_minute"]
    )
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
