"""Top-K item recommendations for ad-hoc groups given as lists of member user ids."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from groupim.batching import GroupBatcher
from groupim.model import GroupIM


class UnknownUserError(ValueError):
    """A member id that is not a user of the dataset the model was trained on."""


@dataclass(frozen=True)
class Recommendation:
    users: list[int]  # the group's members, as given
    items: list[int]  # top-K item ids, best first
    scores: list[float]  # the model's logits of those items


@torch.no_grad()
def recommend(
    model: GroupIM,
    member_items: sp.csr_matrix,
    groups: list[list[int]],
    k: int,
    member_norm: str = "member",
) -> list[Recommendation]:
    """Rank all items for each group and return the K best with their scores.

    `member_items` [U, I] contains the users' training and fold-in histories, as in training.
    Raises UnknownUserError for ids outside 0..U-1 and ValueError for an empty group or a K
    outside 1..I.
    """
    n_users, n_items = member_items.shape
    if not 1 <= k <= n_items:
        raise ValueError(f"invalid k={k}: expected 1 <= k <= {n_items}, the number of items")
    check_groups(groups, n_users)

    rows, cols = [], []
    for row, users in enumerate(groups):
        unique = list(dict.fromkeys(int(user) for user in users))  # a repeated member counts once
        rows += [row] * len(unique)
        cols += unique
    members = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(groups), n_users))
    no_items = sp.csr_matrix((len(groups), n_items), dtype=np.float32)

    model.eval()
    device = next(model.parameters()).device
    batch = GroupBatcher(members, no_items, member_items, member_norm).batch(np.arange(len(groups))).to(device)
    top = torch.topk(model.group_logits(batch), k, dim=1)  # values and indices [B, K]
    return [
        Recommendation(list(map(int, users)), top.indices[row].tolist(), top.values[row].tolist())
        for row, users in enumerate(groups)
    ]


def check_groups(groups: list[list[int]], n_users: int) -> None:
    """Raise a clear error for an empty group or a member id that is not a known user."""
    if not groups:
        raise ValueError("no groups given: pass at least one group of user ids")
    for position, users in enumerate(groups):
        if len(users) == 0:
            raise ValueError(f"group {position} has no members: give at least one user id")
        unknown = sorted({int(user) for user in users if not 0 <= int(user) < n_users})
        if unknown:
            raise UnknownUserError(
                f"unknown user id(s) {', '.join(map(str, unknown))} in group {position}: "
                f"the model knows users 0..{n_users - 1}"
            )
