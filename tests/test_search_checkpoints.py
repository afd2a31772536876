"""Pruning an ended trial's checkpoints to its best few and its latest."""

import json
import math

from search.checkpoints import SUMMARY_FILE, prune_checkpoints

METRIC = "val/ndcg@100"


def make_checkpoints(trial_dir, values):
    """One checkpoint folder per metric value, in order, as Ray Tune names them."""
    for index, value in enumerate(values):
        folder = trial_dir / f"checkpoint_{index:06d}"
        folder.mkdir(parents=True)
        (folder / SUMMARY_FILE).write_text(json.dumps({"epoch": index + 1, METRIC: value}))


def remaining(trial_dir):
    return sorted(path.name for path in trial_dir.glob("checkpoint_*"))


def test_prune_keeps_best_and_latest(tmp_path):
    make_checkpoints(tmp_path, [0.1, 0.5, 0.3, 0.4, 0.2])

    prune_checkpoints(tmp_path, tmp_path / "checkpoint_000004", keep=2, metric=METRIC)

    assert remaining(tmp_path) == ["checkpoint_000001", "checkpoint_000003", "checkpoint_000004"]


def test_prune_ranks_nan_last(tmp_path):
    make_checkpoints(tmp_path, [0.2, math.nan, 0.1, 0.05])

    prune_checkpoints(tmp_path, tmp_path / "checkpoint_000003", keep=2, metric=METRIC)

    assert remaining(tmp_path) == ["checkpoint_000000", "checkpoint_000002", "checkpoint_000003"]


def test_prune_leaves_folders_after_latest(tmp_path):
    make_checkpoints(tmp_path, [0.1, 0.2, 0.3])
    (tmp_path / "checkpoint_000003").mkdir()  # still being written when the trial ended

    prune_checkpoints(tmp_path, tmp_path / "checkpoint_000001", keep=1, metric=METRIC)

    assert remaining(tmp_path) == ["checkpoint_000001", "checkpoint_000002", "checkpoint_000003"]


def test_prune_without_checkpoints_does_nothing(tmp_path):
    assert prune_checkpoints(tmp_path, None, keep=2, metric=METRIC) == []
