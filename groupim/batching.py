"""Turn CSR matrices into the bag batches of `groupim.model`, and sample negative users.

Everything here is vectorised NumPy on CSR arrays: a batch costs a few array passes over
its non-zero entries, never a Python loop over groups or members.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import scipy.sparse as sp
import torch

from groupim.model import Bags, GroupBatch

# Probability mass of a negative draw that follows the item overlap with the group;
# the rest is uniform over users.
ITEM_BIASED_SHARE = 0.5
# Redraw rounds for negatives that hit a member or repeat within a group.
MAX_REDRAW_ROUNDS = 20


def gather_rows(matrix: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenated column ids, values and row lengths of `matrix[rows]`."""
    starts = matrix.indptr[rows]
    lengths = matrix.indptr[rows + 1] - starts  # [R]
    total = int(lengths.sum())
    row_begin = np.cumsum(lengths) - lengths  # [R], where each row starts in the output
    positions = np.arange(total) - np.repeat(row_begin - starts, lengths)  # [nnz] into matrix.indices
    return matrix.indices[positions], matrix.data[positions], lengths


def make_bags(
    matrix: sp.csr_matrix,
    rows: np.ndarray,
    norm: str = "member",
    row_group: np.ndarray | None = None,
) -> Bags:
    """Bags for `matrix[rows]` with L2-normalised values.

    norm="member": each row is L2-normalised over its own items.
    norm="group": each item's weight is normalised across the rows of one group
    (`row_group`), giving 1/sqrt(number of the group's rows holding the item) on binary
    data. This is what `F.normalize` over dim 1 of a [B, G, I] tensor computes in the
    reference notebook.
    """
    items, values, lengths = gather_rows(matrix, rows)
    owner = np.repeat(np.arange(len(rows)), lengths)  # [nnz]
    binary = bool(np.all(values == 1))
    if norm == "member":
        # On binary rows the L2 norm is sqrt(row length): no pass over the squares.
        row_norm = np.sqrt(lengths if binary else np.bincount(owner, weights=values**2, minlength=len(rows)))
        scale = row_norm.astype(np.float32)[owner]
    elif norm == "group":
        if row_group is None:
            raise ValueError("norm='group' needs row_group")
        key = row_group[owner].astype(np.int64) * matrix.shape[1] + items  # one key per (group, item)
        _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
        squares = counts if binary else np.bincount(inverse, weights=values**2)
        scale = np.sqrt(squares).astype(np.float32)[inverse]
    else:
        raise ValueError(f"unknown norm {norm!r}; expected 'member' or 'group'")
    normalised = values.astype(np.float32) / np.maximum(scale, np.float32(1e-12))

    offsets = np.cumsum(lengths) - lengths
    return Bags(
        items=torch.from_numpy(items.astype(np.int64)),
        values=torch.from_numpy(normalised),
        offsets=torch.from_numpy(offsets.astype(np.int64)),
        owner=torch.from_numpy(owner.astype(np.int64)),
        lengths=torch.from_numpy(lengths.astype(np.int64)),
    )


class NegativeSampler:
    """Draws N negative users per group for the discriminator.

    Each draw follows, with probability ITEM_BIASED_SHARE, the number of the group's items
    that a user has (users sharing more items are harder negatives); otherwise it is
    uniform over all users. Group members are never drawn by the uniform part; the
    item-biased part skips them too unless `exclude_members` is False, the reference
    notebook's behaviour. A group's negatives are distinct, as in the notebook's
    sampling without replacement.
    """

    def __init__(self, member_items: sp.csr_matrix, n_negatives: int, exclude_members: bool = True) -> None:
        self.item_users = member_items.T.tocsr()  # [I, U]
        self.n_users = member_items.shape[0]
        self.n_negatives = n_negatives
        self.exclude_members = exclude_members

    def sample(
        self, group_items: sp.csr_matrix, group_members: sp.csr_matrix, rng: np.random.Generator
    ) -> np.ndarray:
        """Negatives [B, N] for groups given as rows of group_items [B, I] and group_members [B, U]."""
        n_groups = group_items.shape[0]
        overlap = (group_items @ self.item_users).tocsr()  # [B, U], shared-item counts
        if self.exclude_members:
            overlap = (overlap - overlap.multiply(group_members)).tocsr()
            overlap.eliminate_zeros()
        cumulative = np.cumsum(overlap.data, dtype=np.float64)  # [nnz]
        row_total = np.diff(np.concatenate([[0.0], cumulative])[overlap.indptr])  # [B]
        member_keys = _member_keys(group_members)

        negatives = np.empty((n_groups, self.n_negatives), dtype=np.int64)
        pending = np.ones_like(negatives, dtype=bool)
        for _ in range(MAX_REDRAW_ROUNDS):
            rows, cols = np.nonzero(pending)
            if len(rows) == 0:
                break
            biased = (rng.random(len(rows)) < ITEM_BIASED_SHARE) & (row_total[rows] > 0)
            draws = rng.integers(0, self.n_users, size=len(rows))
            if biased.any():
                draws[biased] = self._draw_biased(overlap, cumulative, row_total, rows[biased], rng)
            negatives[rows, cols] = draws

            is_member = np.isin(rows * self.n_users + draws, member_keys)
            # The item-biased part may return members only in the notebook's mode.
            rejected = is_member & (~biased | self.exclude_members)
            pending[:] = False
            pending[rows[rejected], cols[rejected]] = True
            pending |= _later_duplicates(negatives)
        return negatives

    def _draw_biased(self, overlap, cumulative, row_total, rows, rng) -> np.ndarray:
        start = np.where(overlap.indptr[rows] > 0, cumulative[overlap.indptr[rows] - 1], 0.0)
        target = start + rng.random(len(rows)) * row_total[rows]
        position = np.searchsorted(cumulative, target, side="right")
        position = np.clip(position, overlap.indptr[rows], overlap.indptr[rows + 1] - 1)
        return overlap.indices[position]


def _member_keys(group_members: sp.csr_matrix) -> np.ndarray:
    rows = np.repeat(np.arange(group_members.shape[0]), np.diff(group_members.indptr))
    return rows * group_members.shape[1] + group_members.indices


def _later_duplicates(negatives: np.ndarray) -> np.ndarray:
    """True where a value already occurs earlier in its row."""
    same = negatives[:, :, None] == negatives[:, None, :]  # [B, N, N]
    return np.tril(same, k=-1).any(axis=2)


class GroupBatcher:
    """Yields `GroupBatch`es over the groups of one split."""

    def __init__(
        self,
        group_members: sp.csr_matrix,
        group_items: sp.csr_matrix,
        member_items: sp.csr_matrix,
        norm: str,
        sampler: NegativeSampler | None = None,
    ) -> None:
        self.group_members = group_members.tocsr()  # [G, U]
        self.group_items = group_items.tocsr()  # [G, I]
        self.member_items = member_items.tocsr()  # [U, I]
        self.norm = norm
        self.sampler = sampler

    @property
    def n_groups(self) -> int:
        return self.group_members.shape[0]

    def batches(
        self, batch_size: int, rng: np.random.Generator | None = None, shuffle: bool = False
    ) -> Iterator[GroupBatch]:
        order = np.arange(self.n_groups)
        if shuffle:
            if rng is None:
                raise ValueError("shuffle=True needs a random generator")
            order = rng.permutation(self.n_groups)
        for start in range(0, self.n_groups, batch_size):
            yield self.batch(order[start : start + batch_size], rng)

    def batch(self, groups: np.ndarray, rng: np.random.Generator | None = None) -> GroupBatch:
        """Build the batch of the given group rows, drawing negatives when a sampler is set."""
        members = self.group_members[groups]  # [B, U]
        n_groups = len(groups)
        group_size = np.diff(members.indptr)  # [B]
        member_group = np.repeat(np.arange(n_groups), group_size)  # [M]
        member_slot = np.arange(len(member_group)) - np.repeat(members.indptr[:-1], group_size)  # [M]
        member_bags = make_bags(self.member_items, members.indices, self.norm, member_group)

        items = self.group_items[groups]  # [B, I]
        negative_bags = None
        if self.sampler is not None:
            if rng is None:
                raise ValueError("negative sampling needs a random generator")
            negatives = self.sampler.sample(items, members, rng)  # [B, N]
            negative_group = np.repeat(np.arange(n_groups), negatives.shape[1])
            negative_bags = make_bags(self.member_items, negatives.ravel(), self.norm, negative_group)

        item_count = np.diff(items.indptr)  # [B]
        target_rows = np.repeat(np.arange(n_groups), item_count)
        target_values = (1.0 / np.maximum(item_count, 1))[target_rows].astype(np.float32)
        return GroupBatch(
            n_groups=n_groups,
            max_members=int(group_size.max(initial=1)),
            member_group=torch.from_numpy(member_group.astype(np.int64)),
            member_slot=torch.from_numpy(member_slot.astype(np.int64)),
            members=member_bags,
            negatives=negative_bags,
            target_rows=torch.from_numpy(target_rows.astype(np.int64)),
            target_items=torch.from_numpy(items.indices.astype(np.int64)),
            target_values=torch.from_numpy(target_values),
        )
