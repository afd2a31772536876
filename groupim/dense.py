"""A dense formulation of the GroupIM group-training loss, for tests and benchmarks only.

It builds the [B, G, I] member tensor that the sparse model avoids and computes
L_G + lambda * L_UG + L_MI with plain autograd, reading the parameters of a `GroupIM`.
The tests compare it with `GroupIM.group_loss` (values and gradients), and the
benchmark times both on the same batches. It needs memory B * G * I * 4 bytes, so keep
batches small.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from groupim.model import Bags, GroupBatch, GroupIM


def dense_rows(bags: Bags, n_items: int) -> torch.Tensor:
    """Rebuild the binary [rows, I] matrix behind a bag batch."""
    dense = torch.zeros(bags.n_rows, n_items, dtype=bags.values.dtype, device=bags.items.device)
    dense[bags.owner, bags.items] = 1.0
    return dense


def dense_members(batch: GroupBatch, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Member histories [B, G, I] and the presence mask [B, G]."""
    rows = dense_rows(batch.members, n_items)  # [M, I]
    padded = rows.new_zeros(batch.n_groups, batch.max_members, n_items)
    padded[batch.member_group, batch.member_slot] = rows
    mask = torch.zeros(batch.n_groups, batch.max_members, dtype=torch.bool, device=rows.device)
    mask[batch.member_group, batch.member_slot] = True
    return padded, mask


def encode(model: GroupIM, histories: torch.Tensor, norm: str) -> torch.Tensor:
    """User embeddings [B, S, D] from binary histories [B, S, I].

    norm="member" normalises each user over its items (dim 2); norm="group" normalises
    each item across the set's users (dim 1), as `F.normalize` on 3-D input does.
    """
    encoder = model.encoder
    normalised = F.normalize(histories, dim=2 if norm == "member" else 1)
    normalised = F.dropout(normalised, encoder.dropout, encoder.training)
    hidden = torch.tanh(normalised @ encoder.input_weight + encoder.input_bias)  # [B, S, D]
    return torch.tanh(encoder.transform(hidden))


def aggregate(model: GroupIM, members: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Group embeddings [B, D] with an additive -inf mask, as the reference notebook pools."""
    additive = torch.zeros_like(mask, dtype=members.dtype).masked_fill(~mask, float("-inf"))  # [B, G]
    kind = model.aggregator.kind
    if kind == "maxpool":
        return torch.max(members + additive.unsqueeze(2), dim=1).values
    if kind == "meanpool":
        present = additive.exp()  # [B, G], 1 for members and 0 for padding
        return (members * present.unsqueeze(2)).sum(dim=1) / present.sum(dim=1, keepdim=True)
    scores = torch.tanh(model.aggregator.attention(members))  # [B, G, 1]
    weights = torch.softmax(scores + additive.unsqueeze(2), dim=1)  # [B, G, 1]
    return (members * weights).sum(dim=1)


def discriminate(model: GroupIM, groups: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
    """Scores [B, S] of users [B, S, D] against their groups [B, D]."""
    disc = model.discriminator
    group_side = torch.tanh(disc.fc(groups)).unsqueeze(1).expand(-1, users.shape[1], -1)  # [B, S, D]
    user_side = torch.tanh(disc.fc(users))  # [B, S, D]
    return disc.bilinear(user_side, group_side).squeeze(2)


def multinomial_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(F.log_softmax(logits, dim=1) * target).sum(dim=1).mean()


def dense_group_loss(model: GroupIM, batch: GroupBatch, lambda_mi: float, norm: str) -> torch.Tensor:
    """L_G + lambda * L_UG + L_MI on dense tensors; equals `GroupIM.group_loss` when dropout is off."""
    n_items = model.n_items
    histories, mask = dense_members(batch, n_items)  # [B, G, I], [B, G]
    negatives = dense_rows(batch.negatives, n_items).view(batch.n_groups, -1, n_items)  # [B, N, I]
    group_items = torch.zeros_like(histories[:, 0])
    group_items[batch.target_rows, batch.target_items] = 1.0  # [B, I]

    member_embeds = encode(model, histories, norm)  # [B, G, D]
    group_embeds = aggregate(model, member_embeds, mask)  # [B, D]
    logits = group_embeds @ model.group_predictor.T  # [B, I]

    positive = discriminate(model, group_embeds, member_embeds)  # [B, G]
    negative = discriminate(model, group_embeds, encode(model, negatives, norm))  # [B, N]
    mi = F.binary_cross_entropy_with_logits(
        torch.cat([positive[mask], negative.flatten()]),
        torch.cat([torch.ones_like(positive[mask]), torch.zeros_like(negative.flatten())]),
    )

    weight = torch.sigmoid(positive.detach()) * mask  # [B, G]
    member_share = histories / histories.sum(dim=2, keepdim=True).clamp(min=1)  # [B, G, I]
    ug_target = (member_share * weight.unsqueeze(2)).sum(dim=1) / mask.sum(dim=1, keepdim=True)  # [B, I]
    g_target = group_items / group_items.sum(dim=1, keepdim=True).clamp(min=1)  # [B, I]
    return multinomial_loss(logits, g_target) + lambda_mi * multinomial_loss(logits, ug_target) + mi
