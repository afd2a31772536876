"""Ranking evaluation of a GroupIM model on validation or test groups and users."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from groupim.batching import GroupBatcher, make_bags
from groupim.metrics import METRICS, RankingAccumulator
from groupim.model import GroupIM

EVAL_BATCH_SIZE = 512


@torch.no_grad()
def evaluate_groups(
    model: GroupIM,
    group_members: sp.csr_matrix,
    group_items: sp.csr_matrix,
    member_items: sp.csr_matrix,
    norm: str,
    metrics: tuple[str, ...] = METRICS,
    batch_size: int = EVAL_BATCH_SIZE,
) -> dict[str, float]:
    """Rank all items for each group; its held-out items are the group's items.

    Members are encoded from `member_items` (training and fold-in histories only).
    """
    model.eval()
    device = next(model.parameters()).device
    batcher = GroupBatcher(group_members, group_items, member_items, norm)
    accumulator = RankingAccumulator(metrics)
    for start in range(0, batcher.n_groups, batch_size):
        rows = np.arange(start, min(start + batch_size, batcher.n_groups))
        batch = batcher.batch(rows).to(device)
        accumulator.add(model.group_logits(batch), group_items[rows])
    return accumulator.result()


@torch.no_grad()
def evaluate_users(
    model: GroupIM,
    fold_in: sp.csr_matrix,
    held_out: sp.csr_matrix,
    pretraining: bool,
    metrics: tuple[str, ...] = METRICS,
    batch_size: int = EVAL_BATCH_SIZE,
) -> dict[str, float]:
    """Rank all items for each user from its fold-in items, which are left out of the ranking."""
    model.eval()
    device = next(model.parameters()).device
    accumulator = RankingAccumulator(metrics)
    for start in range(0, fold_in.shape[0], batch_size):
        rows = np.arange(start, min(start + batch_size, fold_in.shape[0]))
        bags = make_bags(fold_in, rows).to(device)
        scores = model.user_logits(bags, pretraining=pretraining)  # [B, I]
        accumulator.add(scores, held_out[rows], exclude=fold_in[rows])
    return accumulator.result()
