"""Command line: `groupim train`, `groupim evaluate` and `groupim recommend`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from groupim.checkpoint import load_checkpoint, save_checkpoint
from groupim.config import ConfigError, TrainConfig, load_config
from groupim.data import DataError, GroupIMData, load_dataset
from groupim.evaluate import evaluate_groups
from groupim.metrics import METRICS
from groupim.recommend import recommend
from groupim.train import fit

logger = logging.getLogger("groupim")

SPLITS = ("val", "test")


def group_metrics(model, data: GroupIMData, config: TrainConfig, split: str) -> dict[str, float]:
    """Compute the reported metrics (METRICS) of `model` on the validation or test groups."""
    groups = data.val_groups if split == "val" else data.test_groups
    result = evaluate_groups(model, groups.group_members, groups.group_items, data.member_items, config.member_norm)
    return {name: result[name] for name in METRICS}


RUN_FILES = ("model.pt", "metrics.json", "history.json")  # what `groupim train` writes into --output


def command_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set)
    data = load_dataset(args.data)
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file; pass a folder for model.pt and metrics.json")
    earlier = [name for name in RUN_FILES if (output / name).exists()]
    if earlier and not args.overwrite:
        raise ValueError(
            f"--output {output} already contains {', '.join(earlier)} of an earlier run; "
            "pass another folder, or --overwrite to replace them"
        )
    output.mkdir(parents=True, exist_ok=True)
    logger.info("training on %s (%d groups, %d items) with %s", data.source, data.train_groups.n_groups, data.n_items, config)

    start = time.perf_counter()
    result = fit(config, data, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    metrics = {split: group_metrics(result.model, data, config, split) for split in SPLITS}

    save_checkpoint(output / "model.pt", result.model, config, metrics, data.checksum)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    history = {
        "user_pretraining": result.user_pretraining,
        "mi_pretraining": result.mi_pretraining,
        "group_training": result.group.history,
        "group_train_losses": result.group.train_losses,
        "best_epoch": result.group.best_epoch,
        "seconds": seconds,
    }
    (output / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    print(f"best group epoch {result.group.best_epoch}, {seconds:.0f} s; wrote {', '.join(str(output / name) for name in RUN_FILES)}")
    return 0


def command_evaluate(args: argparse.Namespace) -> int:
    model, config, data = load_model_and_data(args.checkpoint, args.data)
    print(json.dumps(group_metrics(model, data, config, args.split), indent=2))
    return 0


def load_model_and_data(checkpoint: str, data_dir: str | None):
    """Load a checkpoint and the dataset it is used with, checking that they fit together."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, config, payload = load_checkpoint(checkpoint, device)
    data = load_dataset(data_dir)
    if data.n_items != model.n_items:
        raise DataError(
            f"{checkpoint} was trained on {model.n_items} items but {data.source} has {data.n_items}; "
            "pass the dataset it was trained on with --data"
        )
    warn_other_data(checkpoint, payload, data)
    return model, config, data


def warn_other_data(checkpoint: str, payload: dict, data: GroupIMData) -> None:
    trained_on = payload.get("data_checksum")
    if trained_on and trained_on != data.checksum:
        logger.warning(
            "%s was trained on data with checksum %s, but %s has %s: the metrics describe other data",
            checkpoint, trained_on[:12], data.source, data.checksum[:12],
        )


def parse_users(text: str) -> list[int]:
    try:
        users = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"invalid --users {text!r}: expected comma-separated integer user ids, e.g. 12,55,901") from None
    if not users:
        raise ValueError("--users is empty: give comma-separated user ids, e.g. 12,55,901")
    return users


def command_recommend(args: argparse.Namespace) -> int:
    users = parse_users(args.users)
    if args.model:
        items, scores = recommend_registered(args.model, users, args.k)
    else:
        model, config, data = load_model_and_data(args.checkpoint, args.data)
        result = recommend(model, data.member_items, [users], args.k, config.member_norm)[0]
        items, scores = result.items, result.scores

    if args.json:
        print(json.dumps({"users": users, "items": items, "scores": scores}))
    else:
        print(f"top {args.k} items for the group {','.join(map(str, users))}")
        print(f"{'rank':>4}  {'item':>8}  score")
        for rank, (item, score) in enumerate(zip(items, scores), start=1):
            print(f"{rank:>4}  {item:>8}  {score:.4f}")
    return 0


def recommend_registered(model_uri: str, users: list[int], k: int) -> tuple[list[int], list[float]]:
    """Recommend with an MLflow-registered GroupIM model (`models:/NAME@ALIAS`).

    MLflow is imported here only, so the package itself runs without it.
    """
    try:
        import mlflow.pyfunc
    except ImportError:
        raise ValueError("--model needs MLflow: pip install mlflow, or pass --checkpoint FILE") from None
    model = mlflow.pyfunc.load_model(model_uri)
    output = model.predict([users], params={"k": k})
    row = output.iloc[0] if hasattr(output, "iloc") else output[0]
    return [int(item) for item in row["items"]], [float(score) for score in row["scores"]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="groupim", description="Train and evaluate GroupIM group recommenders.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run the three training phases and save the best model")
    train.add_argument("--data", help="dataset folder in the GroupIM CSV format (default: download Weeplaces)")
    train.add_argument("--config", help="YAML file of TrainConfig settings (default: built-in defaults)")
    train.add_argument("--output", required=True, help="folder for model.pt, metrics.json and history.json")
    train.add_argument(
        "--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="override config values; may be repeated",
    )
    train.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in --output")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    train.set_defaults(handler=command_train)

    evaluate = commands.add_parser("evaluate", help="print a checkpoint's group metrics as JSON")
    evaluate.add_argument("--checkpoint", required=True, help="model.pt written by groupim train")
    evaluate.add_argument("--data", help="dataset folder (default: download Weeplaces)")
    evaluate.add_argument("--split", choices=SPLITS, default="test", help="group split to evaluate on")
    evaluate.set_defaults(handler=command_evaluate)

    recommend_parser = commands.add_parser("recommend", help="print the top-K items for an ad-hoc group of users")
    source = recommend_parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="model.pt written by groupim train (needs --data or the download)")
    source.add_argument("--model", help="MLflow model URI, e.g. models:/groupim-weeplaces@champion")
    recommend_parser.add_argument("--data", help="dataset folder for --checkpoint (default: download Weeplaces)")
    recommend_parser.add_argument("--users", required=True, help="comma-separated member user ids, e.g. 12,55,901")
    recommend_parser.add_argument("--k", type=int, default=10, help="number of items to print (default 10)")
    recommend_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    recommend_parser.set_defaults(handler=command_recommend)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        # train writes its files only at the end, so an interrupted run leaves --output as it was.
        print(f"interrupted: groupim {args.command} stopped before it finished", file=sys.stderr)
        return 130
    except (ConfigError, DataError, FileNotFoundError, ValueError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
