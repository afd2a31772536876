"""The sparse GroupIM model against its dense formulation, and the negative sampler."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from groupim.batching import GroupBatcher, NegativeSampler, make_bags
from groupim.dense import dense_group_loss, dense_rows, encode
from groupim.model import GroupIM, bag_sum, sparse_softmax_cross_entropy

N_USERS, N_ITEMS, N_GROUPS = 30, 40, 12


def binary(matrix: sp.spmatrix) -> sp.csr_matrix:
    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    matrix.data[:] = 1.0
    return matrix


@pytest.fixture
def tiny():
    """Random binary user-item and group matrices; every group has items and 1-4 members."""
    rng = np.random.default_rng(7)
    member_items = binary(sp.random(N_USERS, N_ITEMS, density=0.15, random_state=1))
    members = sp.lil_matrix((N_GROUPS, N_USERS), dtype=np.float32)
    for group in range(N_GROUPS):
        for user in rng.choice(N_USERS, size=rng.integers(1, 5), replace=False):
            members[group, user] = 1.0
    group_items = binary(sp.random(N_GROUPS, N_ITEMS, density=0.1, random_state=2) + sp.eye(N_GROUPS, N_ITEMS))
    return member_items, members.tocsr(), group_items


def make_model(aggregator: str, dropout: float = 0.0) -> GroupIM:
    torch.manual_seed(0)
    model = GroupIM(N_ITEMS, 8, aggregator, dropout).double()
    with torch.no_grad():
        # Non-zero discriminator weights, so that L_UG's member weights differ from 1/2.
        model.discriminator.bilinear.weight.normal_()
        model.discriminator.bilinear.bias.fill_(0.1)
    return model


def double_batch(batch):
    batch.members.values = batch.members.values.double()
    batch.negatives.values = batch.negatives.values.double()
    batch.target_values = batch.target_values.double()
    return batch


@pytest.mark.parametrize("norm", ["member", "group"])
@pytest.mark.parametrize("aggregator", ["maxpool", "meanpool", "attention"])
def test_sparse_loss_equals_dense(tiny, aggregator, norm):
    member_items, members, group_items = tiny
    sampler = NegativeSampler(member_items, 3)
    batch = GroupBatcher(members, group_items, member_items, norm, sampler).batch(
        np.arange(N_GROUPS), np.random.default_rng(0)
    )
    batch = double_batch(batch)
    model = make_model(aggregator)
    model.train()
    params = [p for p in model.parameters()]

    sparse_loss, _ = model.group_loss(batch, lambda_mi=0.7)
    sparse_grads = torch.autograd.grad(sparse_loss, params, allow_unused=True)
    dense_loss = dense_group_loss(model, batch, lambda_mi=0.7, norm=norm)
    dense_grads = torch.autograd.grad(dense_loss, params, allow_unused=True)

    # Bag values are float32, so agreement is to float32 precision.
    assert sparse_loss.item() == pytest.approx(dense_loss.item(), rel=1e-6)
    for param, sparse_grad, dense_grad in zip(params, sparse_grads, dense_grads):
        assert (sparse_grad is None) == (dense_grad is None)
        if sparse_grad is not None:
            assert torch.allclose(sparse_grad, dense_grad, atol=1e-6), param.shape


@pytest.mark.parametrize("aggregator", ["maxpool", "meanpool", "attention"])
def test_group_logits_equal_dense(tiny, aggregator):
    member_items, members, group_items = tiny
    batch = GroupBatcher(members, group_items, member_items, "member").batch(np.arange(N_GROUPS))
    model = make_model(aggregator).float().eval()
    with torch.no_grad():
        sparse = model.group_logits(batch)
        from groupim.dense import aggregate, dense_members

        histories, mask = dense_members(batch, N_ITEMS)
        dense = aggregate(model, encode(model, histories, "member"), mask) @ model.group_predictor.T
    assert sparse.shape == (N_GROUPS, N_ITEMS)
    assert torch.allclose(sparse, dense, atol=1e-5)


def test_group_norm_weights_by_members_holding_item():
    # Group 0: users 0 and 1 both hold item 0; only user 0 holds item 1.
    member_items = binary(sp.csr_matrix(np.array([[1, 1, 0], [1, 0, 0]])))
    bags = make_bags(member_items, np.array([0, 1]), "group", row_group=np.array([0, 0]))
    weights = dict(zip(zip(bags.owner.tolist(), bags.items.tolist()), bags.values.tolist()))
    assert weights[(0, 0)] == pytest.approx(1 / np.sqrt(2))
    assert weights[(1, 0)] == pytest.approx(1 / np.sqrt(2))
    assert weights[(0, 1)] == pytest.approx(1.0)


def test_member_norm_is_l2_per_member():
    member_items = binary(sp.csr_matrix(np.array([[1, 1, 1, 1], [0, 1, 0, 0]])))
    bags = make_bags(member_items, np.array([0, 1]))
    assert bags.values[:4].tolist() == pytest.approx([0.5] * 4)
    assert bags.values[4].item() == pytest.approx(1.0)


def test_sparse_cross_entropy_matches_log_softmax():
    torch.manual_seed(0)
    embeds = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    weight = torch.randn(6, 4, dtype=torch.double, requires_grad=True)
    rows = torch.tensor([0, 0, 1, 2, 2])
    items = torch.tensor([1, 1, 5, 0, 3])  # the repeated (0, 1) pair adds up
    values = torch.tensor([0.5, 0.25, 1.0, 0.3, 0.7], dtype=torch.double)

    loss = sparse_softmax_cross_entropy(embeds, weight, rows, items, values)
    grads = torch.autograd.grad(loss, (embeds, weight))
    target = torch.zeros(3, 6, dtype=torch.double).index_put_((rows, items), values, accumulate=True)
    expected = -(torch.log_softmax(embeds @ weight.T, dim=1) * target).sum(dim=1).mean()
    expected_grads = torch.autograd.grad(expected, (embeds, weight))

    assert loss.item() == pytest.approx(expected.item())
    assert torch.allclose(grads[0], expected_grads[0])
    assert torch.allclose(grads[1], expected_grads[1])


def test_bf16_cross_entropy_equals_float_on_rounded_inputs():
    # bf16 rounds the inputs of the products, and the softmax and the sums stay float32.
    # So the loss is the exact loss of the rounded inputs, up to the rounding of the products.
    torch.manual_seed(2)
    embeds = torch.randn(5, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    rows = torch.tensor([0, 0, 1, 2, 3, 4, 4])
    items = torch.tensor([3, 3, 7, 0, 49, 10, 11])
    values = torch.tensor([0.5, 0.25, 1.0, 0.3, 0.7, 2.0, 0.1])

    loss = sparse_softmax_cross_entropy(embeds, weight, rows, items, values, torch.bfloat16)
    grads = torch.autograd.grad(loss, (embeds, weight))
    rounded_embeds = embeds.detach().bfloat16().double().requires_grad_()
    rounded_weight = weight.detach().bfloat16().double().requires_grad_()
    target = torch.zeros(5, 50, dtype=torch.double).index_put_((rows, items), values.double(), accumulate=True)
    expected = -(torch.log_softmax(rounded_embeds @ rounded_weight.T, dim=1) * target).sum(dim=1).mean()
    expected_grads = torch.autograd.grad(expected, (rounded_embeds, rounded_weight))

    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-2)
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == torch.float32
        error = (grad.double() - expected_grad).norm() / expected_grad.norm()
        assert error < 2e-2
    # The bf16 path really ran: the float32 loss of the unrounded inputs differs.
    assert loss.item() != sparse_softmax_cross_entropy(embeds, weight, rows, items, values).item()


def test_bf16_training_loss_is_close_to_fp32(tiny):
    member_items, members, group_items = tiny
    batch = GroupBatcher(members, group_items, member_items, "member", NegativeSampler(member_items, 3)).batch(
        np.arange(N_GROUPS), np.random.default_rng(0)
    )
    torch.manual_seed(0)
    full = GroupIM(N_ITEMS, 8, "attention", 0.0)
    low = GroupIM(N_ITEMS, 8, "attention", 0.0, loss_precision="bf16")
    low.load_state_dict(full.state_dict())
    full_loss, _ = full.group_loss(batch, 0.7)
    low_loss, _ = low.group_loss(batch, 0.7)
    full_loss.backward()
    low_loss.backward()
    assert low_loss.item() == pytest.approx(full_loss.item(), rel=1e-2)
    grad_error = (low.group_predictor.grad - full.group_predictor.grad).norm() / full.group_predictor.grad.norm()
    assert grad_error < 3e-2
    with pytest.raises(ValueError, match="loss_precision"):
        GroupIM(N_ITEMS, 8, "attention", 0.0, loss_precision="fp16")


def test_sparse_cross_entropy_rejects_second_backward():
    embeds = torch.randn(2, 3, requires_grad=True)
    weight = torch.randn(4, 3, requires_grad=True)
    loss = sparse_softmax_cross_entropy(embeds, weight, torch.tensor([0, 1]), torch.tensor([2, 3]), torch.ones(2))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


def test_sparse_cross_entropy_two_forwards_before_backward():
    # The second forward finds the shared logits buffer lent and must not overwrite it.
    torch.manual_seed(1)
    embeds = torch.randn(2, 3, dtype=torch.double, requires_grad=True)
    weight = torch.randn(4, 3, dtype=torch.double, requires_grad=True)
    rows, items, values = torch.tensor([0, 1]), torch.tensor([2, 3]), torch.ones(2, dtype=torch.double)
    first = sparse_softmax_cross_entropy(embeds, weight, rows, items, values)
    second = sparse_softmax_cross_entropy(embeds * 2, weight, rows, items, values)
    (grad_first,) = torch.autograd.grad(first, embeds)
    (grad_second,) = torch.autograd.grad(second, embeds)
    target = torch.zeros(2, 4, dtype=torch.double).index_put_((rows, items), values)
    reference = -(torch.log_softmax(embeds @ weight.T, dim=1) * target).sum(dim=1).mean()
    assert torch.allclose(grad_first, torch.autograd.grad(reference, embeds)[0])
    assert second.item() != first.item()
    assert grad_second.shape == grad_first.shape


def test_bf16_cross_entropy_two_forwards_before_backward():
    # Both buffers are lent while the first loss waits for its backward.
    torch.manual_seed(3)
    embeds = torch.randn(2, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    rows, items, values = torch.tensor([0, 1]), torch.tensor([2, 29]), torch.ones(2)
    first = sparse_softmax_cross_entropy(embeds, weight, rows, items, values, torch.bfloat16)
    second = sparse_softmax_cross_entropy(embeds * 2, weight, rows, items, values, torch.bfloat16)
    (grad_first,) = torch.autograd.grad(first, embeds)
    (grad_second,) = torch.autograd.grad(second, embeds)
    (alone,) = torch.autograd.grad(sparse_softmax_cross_entropy(embeds, weight, rows, items, values, torch.bfloat16), embeds)
    assert torch.equal(grad_first, alone)
    assert not torch.equal(grad_second, grad_first)


def test_bag_sum_gradient_equals_embedding_bag():
    """The scipy scatter of bag_sum's backward against torch's embedding_bag, repeated items and an empty bag included."""
    torch.manual_seed(0)
    weight = torch.randn(N_ITEMS, 6, requires_grad=True)
    items = torch.tensor([3, 7, 3, 39, 0, 10, 10, 5])
    offsets = torch.tensor([0, 2, 2, 5])  # bag 1 is empty
    values = torch.rand(8)
    grad_rows = torch.randn(4, 6)

    out = bag_sum(weight, items, offsets, values)
    out.backward(grad_rows)
    grad = weight.grad.clone()
    weight.grad = None
    expected = torch.nn.functional.embedding_bag(items, weight, offsets, mode="sum", per_sample_weights=values)
    expected.backward(grad_rows)

    assert out.grad_fn is not None and "BagSum" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, weight.grad)
    torch.testing.assert_close(grad[3], values[0] * grad_rows[0] + values[2] * grad_rows[2])
    assert torch.count_nonzero(grad[[1, 2, 4]]) == 0  # items in no bag get no gradient


def test_dense_rows_round_trip(tiny):
    member_items, _, _ = tiny
    bags = make_bags(member_items, np.arange(N_USERS))
    assert torch.equal(dense_rows(bags, N_ITEMS), torch.from_numpy(member_items.toarray()))


def test_negatives_exclude_members_and_repeat_never(tiny):
    member_items, members, group_items = tiny
    sampler = NegativeSampler(member_items, 5)
    negatives = sampler.sample(group_items, members, np.random.default_rng(3))
    assert negatives.shape == (N_GROUPS, 5)
    for group in range(N_GROUPS):
        assert len(set(negatives[group])) == 5
        assert not set(negatives[group]) & set(members[group].indices)


def test_negatives_follow_item_overlap():
    # Users 1 and 2 share the group's item 0; users 3..99 share nothing. Member: user 0.
    n_users = 100
    member_items = sp.lil_matrix((n_users, 3), dtype=np.float32)
    member_items[0, 0] = member_items[1, 0] = member_items[2, 0] = 1
    for user in range(3, n_users):
        member_items[user, 2] = 1
    members = sp.csr_matrix(([1.0], ([0], [0])), shape=(1, n_users))
    group_items = sp.csr_matrix(([1.0], ([0], [0])), shape=(1, 3))
    sampler = NegativeSampler(member_items.tocsr(), 1)
    rng = np.random.default_rng(0)
    draws = np.concatenate([sampler.sample(group_items, members, rng)[0] for _ in range(4000)])
    # Item-biased half: users 1 and 2 with 1/4 each; uniform half: 1/99 each of the rest.
    share_overlap = np.isin(draws, [1, 2]).mean()
    assert share_overlap == pytest.approx(0.5 + 0.5 * 2 / 99, abs=0.03)
    assert 0 not in draws


def test_notebook_negatives_may_be_members():
    # The only user sharing the group's item is its member: the notebook mode draws it.
    member_items = binary(sp.csr_matrix(np.array([[1, 0], [0, 1], [0, 1], [0, 1]])))
    members = sp.csr_matrix(([1.0], ([0], [0])), shape=(1, 4))
    group_items = sp.csr_matrix(([1.0], ([0], [0])), shape=(1, 2))
    rng = np.random.default_rng(0)
    notebook = NegativeSampler(member_items, 1, exclude_members=False)
    draws = np.concatenate([notebook.sample(group_items, members, rng)[0] for _ in range(400)])
    assert 0 in draws
    paper = NegativeSampler(member_items, 1, exclude_members=True)
    draws = np.concatenate([paper.sample(group_items, members, rng)[0] for _ in range(400)])
    assert 0 not in draws


def test_sampling_is_seeded(tiny):
    member_items, members, group_items = tiny
    sampler = NegativeSampler(member_items, 4)
    first = sampler.sample(group_items, members, np.random.default_rng(11))
    second = sampler.sample(group_items, members, np.random.default_rng(11))
    assert np.array_equal(first, second)
