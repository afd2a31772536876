"""Time one epoch of each GroupIM training phase on real data, and the sparse model against a dense one.

Usage:
    python benchmarks/bench_training.py --data ../shared/data/weeplaces [--epochs 3] [--dense-batches 4]
        [--loss-precision fp32|bf16] [--embedding-size 64] [--threads N]

It prints a JSON record and, with --results FILE, appends it to that JSON-lines file.
Each phase runs `--epochs` epochs; the median epoch time is reported. Peak resident
memory is read before the dense comparison, which needs several GB by design.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from groupim.config import LOSS_PRECISIONS, TrainConfig  # noqa: E402
from groupim.data import load_dataset  # noqa: E402
from groupim.dense import dense_group_loss  # noqa: E402
from groupim.train import build_model, pretrain_mi, pretrain_user, train_batcher, train_group  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def median_epoch_seconds(history: list[dict], key: str = "seconds") -> float:
    return statistics.median(record[key] for record in history)


def time_phases(data, config: TrainConfig) -> dict:
    model = build_model(config, data.n_items)
    user = pretrain_user(model, data, config, progress=False)
    mi = pretrain_mi(model, data, config, progress=False)
    group = train_group(model, data, config, progress=False)
    return {
        "user_pretraining_epoch_s": median_epoch_seconds(user["history"]),
        "mi_pretraining_epoch_s": median_epoch_seconds(mi["history"]),
        "group_epoch_s": median_epoch_seconds(group.history),
        "val_ndcg@100_after_short_run": group.best_metrics.get("ndcg@100"),
    }


def time_sparse_and_dense(data, config: TrainConfig, n_batches: int) -> dict:
    """Forward + backward of the same training batches through both formulations."""
    model = build_model(config, data.n_items)
    model.train()
    batcher = train_batcher(data, config)
    batches = list(batcher.batches(config.batch_size, np.random.default_rng(0), shuffle=True))[:n_batches]

    def run(loss_fn) -> float:
        start = time.perf_counter()
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(batch).backward()
        return (time.perf_counter() - start) / len(batches)

    sparse = run(lambda b: model.group_loss(b, config.lambda_mi)[0])
    dense = run(lambda b: dense_group_loss(model, b, config.lambda_mi, config.member_norm))
    return {"sparse_batch_s": sparse, "dense_batch_s": dense, "dense_over_sparse": dense / sparse}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="dataset folder (default: download Weeplaces)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs timed per phase")
    parser.add_argument("--dense-batches", type=int, default=4, help="batches timed through both formulations")
    parser.add_argument("--loss-precision", choices=LOSS_PRECISIONS, default="fp32", help="input type of the loss products")
    parser.add_argument("--embedding-size", type=int, default=TrainConfig.embedding_size, help="embedding size D")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own, one per core)")
    parser.add_argument("--results", help="append the JSON record to this JSON-lines file")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    data = load_dataset(args.data)
    load_s = time.perf_counter() - start
    # Evaluate only after the last timed epoch, so the epoch times hold training alone.
    config = TrainConfig(
        pretrain_user_epochs=args.epochs,
        pretrain_mi_epochs=args.epochs,
        epochs=args.epochs,
        eval_freq=args.epochs,
        embedding_size=args.embedding_size,
        loss_precision=args.loss_precision,
    )
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
        f", {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "embedding_size": config.embedding_size,
        "loss_precision": config.loss_precision,
        "dataset_load_s": load_s,
        **time_phases(data, config),
        "peak_rss_mb": peak_rss_mb(),
    }
    if args.dense_batches > 0:
        record.update(time_sparse_and_dense(data, config, args.dense_batches))
    print(json.dumps(record, indent=2))
    if args.results:
        with open(args.results, "a") as results:
            results.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
