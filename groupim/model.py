"""GroupIM on sparse inputs: user encoder, aggregators, discriminator and the training loss.

Dimensions: B groups (or users) in a batch, M members of the batch's groups (flattened),
G the largest group in the batch, I items, D embedding size, N negatives per group.

No dense member x item tensor is ever built. A member's item history enters as a bag of
item ids with weights, and the encoder's first layer is an `embedding_bag` over an
[I, D] weight (`bag_sum`), which equals `Linear(I, D)` applied to the sparse vector. The
softmax over all items is the only dense [B, I] tensor, and `sparse_softmax_cross_entropy` computes
its loss and gradient without autograd's intermediate copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from groupim.config import AGGREGATORS, LOSS_PRECISIONS, TrainConfig


@dataclass
class Bags:
    """Rows of a sparse matrix as bags of item ids, the input of `UserEncoder`.

    `items[offsets[r]:offsets[r + 1]]` are the items of row r and `values` their input
    weights (already normalised); `owner[k]` is the row of entry k.
    """

    items: torch.Tensor  # [nnz] long
    values: torch.Tensor  # [nnz] float
    offsets: torch.Tensor  # [rows] long
    owner: torch.Tensor  # [nnz] long
    lengths: torch.Tensor  # [rows] long, items per row before normalisation

    @property
    def n_rows(self) -> int:
        return self.offsets.shape[0]

    def to(self, device: torch.device) -> "Bags":
        return Bags(*(getattr(self, f).to(device, non_blocking=True) for f in _BAG_FIELDS))


_BAG_FIELDS = ("items", "values", "offsets", "owner", "lengths")


@dataclass
class GroupBatch:
    """A batch of groups: members' histories, optional negatives and the groups' items."""

    n_groups: int  # B
    max_members: int  # G
    member_group: torch.Tensor  # [M] batch row of each member, ascending
    member_slot: torch.Tensor  # [M] position of the member inside its group
    members: Bags  # M bags
    negatives: Bags | None  # B * N bags, group b owns rows b * N .. b * N + N - 1
    target_rows: torch.Tensor | None  # [T] the group items as (row, item, value) triples,
    target_items: torch.Tensor | None  # values L1-normalised per group
    target_values: torch.Tensor | None

    def to(self, device: torch.device) -> "GroupBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return GroupBatch(
            self.n_groups,
            self.max_members,
            move(self.member_group),
            move(self.member_slot),
            self.members.to(device),
            None if self.negatives is None else self.negatives.to(device),
            move(self.target_rows),
            move(self.target_items),
            move(self.target_values),
        )


class UserEncoder(nn.Module):
    """f_enc: two fully connected tanh layers over a user's normalised item vector.

    `hidden` (first layer only) feeds user pre-training through `item_logits`;
    `forward` adds the transform layer and gives the embeddings that groups pool.
    """

    def __init__(self, n_items: int, embedding_size: int, dropout: float) -> None:
        super().__init__()
        # The first layer's weight is stored as [I, D] (the transpose of Linear(I, D).weight)
        # so that `embedding_bag` reads it row by row.
        self.input_weight = nn.Parameter(torch.empty(n_items, embedding_size))
        self.input_bias = nn.Parameter(torch.zeros(embedding_size))
        self.transform = nn.Linear(embedding_size, embedding_size)
        # Item embeddings of user pre-training; they initialise the group predictor.
        self.user_predictor = nn.Parameter(torch.empty(n_items, embedding_size))
        self.dropout = dropout
        nn.init.xavier_uniform_(self.input_weight)
        nn.init.xavier_uniform_(self.transform.weight)
        nn.init.zeros_(self.transform.bias)
        nn.init.xavier_uniform_(self.user_predictor)

    def hidden(self, bags: Bags) -> torch.Tensor:
        """First layer with input dropout: [rows, D]."""
        # Dropout on the non-zero entries equals dropout on the dense input vector.
        values = F.dropout(bags.values, self.dropout, self.training)
        summed = bag_sum(self.input_weight, bags.items, bags.offsets, values)  # [rows, D]
        return torch.tanh(summed + self.input_bias)

    def forward(self, bags: Bags) -> torch.Tensor:
        return torch.tanh(self.transform(self.hidden(bags)))  # [rows, D]


class Aggregator(nn.Module):
    """Pools member embeddings [B, G, D] with a mask [B, G] into group embeddings [B, D]."""

    def __init__(self, kind: str, embedding_size: int) -> None:
        super().__init__()
        if kind not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {kind!r}; expected one of {', '.join(AGGREGATORS)}")
        self.kind = kind
        self.attention = nn.Linear(embedding_size, 1) if kind == "attention" else None
        if self.attention is not None:
            nn.init.xavier_uniform_(self.attention.weight)

    def forward(self, members: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "maxpool":
            return members.masked_fill(~mask.unsqueeze(2), float("-inf")).amax(dim=1)  # [B, D]
        if self.kind == "meanpool":
            weights = mask.to(members.dtype) / mask.sum(dim=1, keepdim=True)  # [B, G]
        else:
            scores = torch.tanh(self.attention(members)).squeeze(2)  # [B, G]
            weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)  # [B, G]
        return torch.bmm(weights.unsqueeze(1), members).squeeze(1)  # [B, D]


class Discriminator(nn.Module):
    """Bilinear MI discriminator: score(u, g) = tanh(F u)^T W tanh(F g) + b."""

    def __init__(self, embedding_size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(embedding_size, embedding_size)
        self.bilinear = nn.Bilinear(embedding_size, embedding_size, 1)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        # Zero start: every pair scores 0 until MI training moves it.
        nn.init.zeros_(self.bilinear.weight)
        nn.init.zeros_(self.bilinear.bias)

    def forward(self, groups: torch.Tensor, users: torch.Tensor, user_group: torch.Tensor) -> torch.Tensor:
        """Score each user against its group: groups [B, D], users [R, D], user_group [R] -> [R]."""
        group_side = torch.tanh(self.fc(groups)) @ self.bilinear.weight[0].T  # [B, D]
        user_side = torch.tanh(self.fc(users))  # [R, D]
        return (user_side * group_side[user_group]).sum(dim=1) + self.bilinear.bias  # [R]


class GroupIM(nn.Module):
    """User encoder, aggregator, group predictor and discriminator.

    `loss_precision` is the input type of the all-item products in the training losses:
    "fp32", or "bf16" (bfloat16 inputs; float32 softmax, gradients' sums and weights).
    Scoring for evaluation and recommendation is always float32.
    """

    def __init__(
        self, n_items: int, embedding_size: int, aggregator: str, dropout: float, loss_precision: str = "fp32"
    ) -> None:
        super().__init__()
        if loss_precision not in LOSS_PRECISIONS:
            raise ValueError(f"invalid loss_precision {loss_precision!r}; expected one of {', '.join(LOSS_PRECISIONS)}")
        self.n_items = n_items
        self.loss_precision = loss_precision
        self.encoder = UserEncoder(n_items, embedding_size, dropout)
        self.aggregator = Aggregator(aggregator, embedding_size)
        self.group_predictor = nn.Parameter(torch.empty(n_items, embedding_size))  # [I, D]
        self.discriminator = Discriminator(embedding_size)
        nn.init.xavier_uniform_(self.group_predictor)

    @classmethod
    def from_config(cls, n_items: int, config: TrainConfig) -> "GroupIM":
        """Build an untrained model with the architecture and loss precision of `config`."""
        return cls(n_items, config.embedding_size, config.aggregator, config.dropout, config.loss_precision)

    @property
    def low_precision(self) -> torch.dtype | None:
        return torch.bfloat16 if self.loss_precision == "bf16" else None

    def member_embeddings(self, batch: GroupBatch) -> torch.Tensor:
        return self.encoder(batch.members)  # [M, D]

    def pool(self, batch: GroupBatch, member_embeds: torch.Tensor) -> torch.Tensor:
        """Group embeddings [B, D] from member embeddings [M, D]."""
        padded, mask = pad_members(batch, member_embeds)  # [B, G, D], [B, G]
        return self.aggregator(padded, mask)

    def group_logits(self, batch: GroupBatch) -> torch.Tensor:
        """Scores of every item for each group: [B, I]."""
        return self.pool(batch, self.member_embeddings(batch)) @ self.group_predictor.T

    def user_logits(self, bags: Bags, pretraining: bool) -> torch.Tensor:
        """Scores of every item for each user: [B, I].

        Pre-training scores with the first encoder layer and the user predictor; after it,
        a user is scored like a one-member group (full encoder, group predictor).
        """
        if pretraining:
            return self.encoder.hidden(bags) @ self.encoder.user_predictor.T
        return self.encoder(bags) @ self.group_predictor.T

    def user_pretraining_loss(self, bags: Bags) -> torch.Tensor:
        """Multinomial log-likelihood of each user's own items under the user predictor."""
        hidden = self.encoder.hidden(bags)  # [B, D]
        return sparse_softmax_cross_entropy(
            hidden, self.encoder.user_predictor, bags.owner, bags.items, torch.ones_like(bags.values), self.low_precision
        )

    def mi_pretraining_loss(self, batch: GroupBatch) -> torch.Tensor:
        """L_MI with the user embeddings detached: the encoder learns only through the group embedding."""
        assert batch.negatives is not None, "MI training needs negative users in the batch"
        member_embeds = self.member_embeddings(batch)  # [M, D]
        group_embeds = self.pool(batch, member_embeds)  # [B, D]
        with torch.no_grad():
            negative_embeds = self.encoder(batch.negatives)  # [B * N, D]
        return self.mi_loss(batch, group_embeds, member_embeds.detach(), negative_embeds)

    def mi_loss(
        self,
        batch: GroupBatch,
        group_embeds: torch.Tensor,
        member_embeds: torch.Tensor,
        negative_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """L_MI: binary cross-entropy of the discriminator, members labelled 1 and negatives 0.

        The mean runs over real (group, user) pairs only. The reference notebook pads
        groups and its padded slots add a constant log(2) each, which changes the loss
        value but not its gradient.
        """
        negatives_per_group = negative_embeds.shape[0] // batch.n_groups
        negative_group = torch.arange(batch.n_groups, device=group_embeds.device).repeat_interleave(
            negatives_per_group
        )  # [B * N]
        positive = self.discriminator(group_embeds, member_embeds, batch.member_group)  # [M]
        negative = self.discriminator(group_embeds, negative_embeds, negative_group)  # [B * N]
        logits = torch.cat([positive, negative])
        labels = torch.cat([torch.ones_like(positive), torch.zeros_like(negative)])
        return F.binary_cross_entropy_with_logits(logits, labels)

    def group_loss(self, batch: GroupBatch, lambda_mi: float) -> tuple[torch.Tensor, dict[str, float]]:
        """L_G + lambda * L_UG + L_MI for a batch of training groups.

        L_G: multinomial log-likelihood of the group's items (L1-normalised).
        L_UG: the same for the members' items, each member's history L1-normalised and
        weighted by its detached discriminator score sigmoid(score), averaged over members.
        Both share the group logits, so they enter one softmax cross-entropy with the
        summed target L_G-target + lambda * L_UG-target.
        """
        assert batch.negatives is not None and batch.target_rows is not None
        # One encoder pass over members and negatives: one embedding_bag backward, not two.
        user_embeds = self.encoder(concat_bags(batch.members, batch.negatives))  # [M + B * N, D]
        member_embeds, negative_embeds = user_embeds.split([batch.members.n_rows, batch.negatives.n_rows])
        group_embeds = self.pool(batch, member_embeds)  # [B, D]
        mi = self.mi_loss(batch, group_embeds, member_embeds, negative_embeds)

        with torch.no_grad():
            member_weight = torch.sigmoid(
                self.discriminator(group_embeds, member_embeds, batch.member_group)
            )  # [M]
            group_size = torch.bincount(batch.member_group, minlength=batch.n_groups).float()  # [B]
            per_member = member_weight / batch.members.lengths.clamp(min=1).float()
            per_member = per_member / group_size[batch.member_group]  # [M]
            ug_values = lambda_mi * per_member[batch.members.owner]  # [nnz]
        rows = torch.cat([batch.target_rows, batch.member_group[batch.members.owner]])
        items = torch.cat([batch.target_items, batch.members.items])
        values = torch.cat([batch.target_values, ug_values])
        recon = sparse_softmax_cross_entropy(
            group_embeds, self.group_predictor, rows, items, values, self.low_precision
        )

        stats = {"loss_recon": recon.item(), "loss_mi": mi.item()}
        return recon + mi, stats


def concat_bags(first: Bags, second: Bags) -> Bags:
    """Concatenate two bag batches: the rows of `first`, then those of `second`."""
    return Bags(
        items=torch.cat([first.items, second.items]),
        values=torch.cat([first.values, second.values]),
        offsets=torch.cat([first.offsets, second.offsets + first.items.shape[0]]),
        owner=torch.cat([first.owner, second.owner + first.n_rows]),
        lengths=torch.cat([first.lengths, second.lengths]),
    )


def pad_members(batch: GroupBatch, member_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter member embeddings [M, D] into [B, G, D] with a presence mask [B, G]."""
    dim = member_embeds.shape[1]
    flat = batch.member_group * batch.max_members + batch.member_slot  # [M]
    padded = member_embeds.new_zeros(batch.n_groups * batch.max_members, dim)
    padded = padded.index_copy(0, flat, member_embeds).view(batch.n_groups, batch.max_members, dim)
    mask = torch.zeros(batch.n_groups * batch.max_members, dtype=torch.bool, device=member_embeds.device)
    mask[flat] = True
    return padded, mask.view(batch.n_groups, batch.max_members)


def bag_sum(weight: torch.Tensor, items: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Sum the rows of weight [I, D] per bag, each scaled by its value: [rows, D].

    This is the sparse [rows, I] bag matrix times weight. When weight is a float32 CPU
    parameter that needs a gradient, `_BagSum` computes it. Otherwise this calls
    `embedding_bag` directly.
    """
    needs_grad = weight.requires_grad and torch.is_grad_enabled()
    if needs_grad and weight.device.type == "cpu" and weight.dtype == torch.float32:
        return _BagSum.apply(weight, items, offsets, values.detach())
    return F.embedding_bag(items, weight, offsets, mode="sum", per_sample_weights=values)


class _BagSum(torch.autograd.Function):
    """Autograd function of `bag_sum`: `embedding_bag` forward, a scipy scatter backward.

    torch's `embedding_bag` backward on the CPU sorts the item ids and fills the dense
    [I, D] gradient. A CSC product (the bag matrix transposed) scatters the same sums
    without the sort: about 12 ms against 21 ms per group batch at D = 128 on one thread
    (benchmarks/RESULTS.md). The values get no gradient because they are inputs.
    """

    @staticmethod
    def forward(ctx, weight, items, offsets, values):
        ctx.save_for_backward(items, offsets, values)
        ctx.n_items = weight.shape[0]
        return F.embedding_bag(items, weight, offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad_rows):
        items, offsets, values = ctx.saved_tensors
        indptr = np.append(offsets.numpy(), items.shape[0])
        bags = sp.csr_matrix((values.numpy(), items.numpy(), indptr), shape=(offsets.shape[0], ctx.n_items))
        grad_weight = bags.T @ grad_rows.contiguous().numpy()  # [I, D]
        return torch.from_numpy(np.ascontiguousarray(grad_weight, dtype=np.float32)), None, None, None


class _LogitsBuffer:
    """One reusable [B, I] buffer for the logits of `_SparseSoftmaxCrossEntropy`.

    A fresh 25 MB tensor per batch costs more in page faults than the arithmetic on it
    (about 17 ms against 1.4 ms for an in-place multiply, measured on one CPU thread).
    The buffer is lent to one forward until its backward returns it. A forward that finds
    it lent, or of another shape, allocates a new tensor.
    """

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None
        self.lent = False

    def borrow(self, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        fits = (
            self.tensor is not None
            and self.tensor.shape == (rows, cols)
            and self.tensor.dtype == like.dtype
            and self.tensor.device == like.device
        )
        if self.lent or not fits:
            if self.lent:
                return like.new_empty(rows, cols)
            self.tensor = like.new_empty(rows, cols)
        self.lent = True
        return self.tensor

    def give_back(self, tensor: torch.Tensor) -> None:
        if tensor is self.tensor:
            self.lent = False


_LOGITS_BUFFER = _LogitsBuffer()
_LOW_PRECISION_BUFFER = _LogitsBuffer()  # bfloat16 products of `low_precision` losses


class _SparseSoftmaxCrossEntropy(torch.autograd.Function):
    """mean_b sum_i -t[b, i] * log_softmax(E W^T)[b, i] with a sparse target t.

    The [B, I] logits become exp(logits - row max) in place and stay for backward, which
    turns them into the gradient of the logits, softmax * sum_i t[b, i] - t, scaled by
    1/B. So backward runs once per forward: retain_graph=True cannot repeat it.

    With `low_precision` (bfloat16), the three [B, I] products (logits, and the gradients
    of E and W) take bfloat16 inputs and accumulate in float32 inside the kernel; the
    softmax, the loss and the returned gradients are float32. This is faster on CPUs with
    AVX512-BF16 or AMX and on GPUs; benchmarks/RESULTS.md has the measured epoch times.
    """

    @staticmethod
    def forward(ctx, embeds, item_weight, rows, items, values, low_precision):
        n_rows, n_items = embeds.shape[0], item_weight.shape[0]
        logits = _LOGITS_BUFFER.borrow(n_rows, n_items, embeds)  # [B, I]
        if low_precision is None:
            torch.mm(embeds, item_weight.T, out=logits)
            saved_embeds, saved_weight = embeds, item_weight
        else:
            saved_embeds, saved_weight = embeds.to(low_precision), item_weight.to(low_precision)
            product = _LOW_PRECISION_BUFFER.borrow(n_rows, n_items, saved_embeds)
            logits.copy_(torch.mm(saved_embeds, saved_weight.T, out=product))
            _LOW_PRECISION_BUFFER.give_back(product)
        picked = logits[rows, items]  # [T]
        row_max = logits.amax(dim=1)  # [B]
        unnormalised = logits.sub_(row_max.unsqueeze(1)).exp_()  # [B, I], reuses the logits' memory
        row_sum = unnormalised.sum(dim=1)  # [B]
        log_norm = row_max + row_sum.log()  # [B], logsumexp of each row
        loss = (values * (log_norm[rows] - picked)).sum() / n_rows

        ctx.save_for_backward(saved_embeds, saved_weight, unnormalised, row_sum, rows, items, values)
        ctx.used = False
        ctx.out_dtype = embeds.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("sparse_softmax_cross_entropy supports one backward pass per forward")
        ctx.used = True
        embeds, item_weight, unnormalised, row_sum, rows, items, values = ctx.saved_tensors
        scale = grad_loss / embeds.shape[0]
        target_mass = torch.zeros_like(row_sum).index_add_(0, rows, values)  # [B]
        # softmax * target mass, the softmax's division folded into the row factor.
        row_factor = (target_mass * scale / row_sum).unsqueeze(1)  # [B, 1]
        grad_logits = unnormalised.mul_(row_factor)  # [B, I]
        if embeds.dtype != ctx.out_dtype:
            grad_logits = _LOW_PRECISION_BUFFER.borrow(*unnormalised.shape, embeds).copy_(grad_logits)
        grad_logits.index_put_((rows, items), (-values * scale).to(grad_logits.dtype), accumulate=True)
        grad_embeds = (grad_logits @ item_weight).to(ctx.out_dtype)  # [B, D]
        grad_weight = (grad_logits.T @ embeds).to(ctx.out_dtype)  # [I, D]
        _LOGITS_BUFFER.give_back(unnormalised)
        _LOW_PRECISION_BUFFER.give_back(grad_logits)
        return grad_embeds, grad_weight, None, None, None, None


def sparse_softmax_cross_entropy(
    embeds: torch.Tensor,
    item_weight: torch.Tensor,
    rows: torch.Tensor,
    items: torch.Tensor,
    values: torch.Tensor,
    low_precision: torch.dtype | None = None,
) -> torch.Tensor:
    """Multinomial loss of logits embeds [B, D] @ item_weight[I, D]^T against a sparse target.

    The target is given as (rows, items, values) triples; repeated pairs add up.
    `low_precision` (torch.bfloat16 or None) is the input type of the [B, I] products.
    """
    values = values.to(embeds.dtype)
    return _SparseSoftmaxCrossEntropy.apply(embeds, item_weight, rows, items, values, low_precision)
