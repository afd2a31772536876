"""Tests for groupim.metrics against values worked out by hand and a slow reference.

Discounts used in the hand computations, 1 / log2(j + 2) for 0-based position j:
    d0 = 1, d1 = 0.630930, d2 = 0.5, d3 = 0.430677, d4 = 0.386853
"""

import logging
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from groupim.metrics import (
    METRICS,
    SELECTION_METRIC,
    SELECTION_MODE,
    RankingAccumulator,
    ndcg_at_k,
    parse_metric_name,
    recall_at_k,
)

D = [1 / math.log2(j + 2) for j in range(6)]


def as_mask(rows_of_items, n_items):
    """Bool tensor [len(rows_of_items), n_items] with True at the listed items of each row."""
    mask = torch.zeros(len(rows_of_items), n_items, dtype=torch.bool)
    for row, items in enumerate(rows_of_items):
        mask[row, list(items)] = True
    return mask


# Four rows x six items, used by several tests.
#   row 0: perfect ranking, relevant {0, 1} are the two highest scores.
#   row 1: ranking 1, 3, 5, 2, 4, 0 with relevant {0, 3, 5}, so the top 3 are (no, yes, yes).
#   row 2: no held-out item.
#   row 3: the only relevant item, 5, has the lowest score.
SCORES = torch.tensor([
    [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
    [0.1, 0.9, 0.3, 0.8, 0.2, 0.7],
    [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],
    [0.2, 0.4, 0.6, 0.8, 1.0, 0.0],
])
RELEVANT = as_mask([{0, 1}, {0, 3, 5}, set(), {5}], 6)


def reference_metrics(scores, relevant, k, exclude=None):
    """Slow reference: full stable sort of each row by (score descending, relevance ascending).

    NaN scores and excluded items get score -inf, and excluded items are not relevant.
    Returns (ndcg [B], recall [B]) as float64 numpy arrays, NaN for rows without a relevant item.
    """
    scores = scores.double().numpy().copy()
    relevant = relevant.numpy().copy()
    scores[np.isnan(scores)] = -np.inf
    if exclude is not None:
        scores[exclude.numpy()] = -np.inf
        relevant[exclude.numpy()] = False

    ndcg, recall = [], []
    for row_scores, row_relevant in zip(scores, relevant):
        n_relevant = int(row_relevant.sum())
        if n_relevant == 0:
            ndcg.append(math.nan)
            recall.append(math.nan)
            continue
        ranking = sorted(range(len(row_scores)), key=lambda item: (-row_scores[item], row_relevant[item]))
        top = [bool(row_relevant[item]) for item in ranking[:k]]
        dcg = sum(1 / math.log2(j + 2) for j, hit in enumerate(top) if hit)
        idcg = sum(1 / math.log2(j + 2) for j in range(min(k, n_relevant)))
        ndcg.append(dcg / idcg)
        recall.append(sum(top) / min(k, n_relevant))
    return np.array(ndcg), np.array(recall)


def random_tied_batch(seed, n_rows=64, n_items=40):
    """Scores with only four distinct values (many ties) and relevance of varying density."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (n_rows, n_items), generator=generator).float()
    density = torch.tensor([0.0, 0.05, 0.2, 0.5, 1.0])[torch.randint(0, 5, (n_rows, 1), generator=generator)]
    relevant = torch.rand(n_rows, n_items, generator=generator) < density
    exclude = torch.rand(n_rows, n_items, generator=generator) < 0.15
    return scores, relevant, exclude


def test_constants_name_the_selection_metric():
    assert METRICS == ("ndcg@20", "ndcg@50", "ndcg@100", "recall@20", "recall@50")
    assert SELECTION_METRIC == "ndcg@100"
    assert SELECTION_METRIC in METRICS
    assert SELECTION_MODE == "max"


def test_parse_metric_name_valid():
    assert parse_metric_name("ndcg@100") == ("ndcg", 100)
    assert parse_metric_name("recall@1") == ("recall", 1)


@pytest.mark.parametrize(
    "name", ["ndcg", "ndcg@0", "ndcg@-1", "NDCG@20", "map@10", "recall@2.5", "ndcg@20 ", 20]
)
def test_parse_metric_name_invalid(name):
    with pytest.raises(ValueError, match="invalid metric name"):
        parse_metric_name(name)


def test_perfect_ranking_scores_one():
    # Row 0: relevant {0, 1} hold the two highest scores.
    # K=2: DCG = d0 + d1 = IDCG, so NDCG = 1 and recall = 2 / min(2, 2) = 1.
    # K=3: the third item is not relevant, DCG = d0 + d1 = IDCG (2 relevant), recall = 2 / 2.
    for k in (2, 3):
        assert ndcg_at_k(SCORES[:1], RELEVANT[:1], k).item() == pytest.approx(1.0)
        assert recall_at_k(SCORES[:1], RELEVANT[:1], k).item() == pytest.approx(1.0)


def test_partial_ranking_hand_computed():
    # Row 1: ranking 1, 3, 5, ...; relevant {0, 3, 5}; top 3 relevance is (0, 1, 1).
    # K=3: DCG = d1 + d2 = 0.630930 + 0.5 = 1.130930
    #      IDCG = d0 + d1 + d2 = 2.130930 (min(3, 3) = 3 relevant first)
    #      NDCG = 1.130930 / 2.130930 = 0.530721, recall = 2 / min(3, 3) = 0.666667
    # K=2: DCG = d1 = 0.630930, IDCG = d0 + d1 = 1.630930, NDCG = 0.386853
    #      recall = 1 / min(2, 3) = 0.5
    row = slice(1, 2)
    assert ndcg_at_k(SCORES[row], RELEVANT[row], 3).item() == pytest.approx(0.530721, abs=1e-6)
    assert recall_at_k(SCORES[row], RELEVANT[row], 3).item() == pytest.approx(2 / 3)
    assert ndcg_at_k(SCORES[row], RELEVANT[row], 2).item() == pytest.approx(0.386853, abs=1e-6)
    assert recall_at_k(SCORES[row], RELEVANT[row], 2).item() == pytest.approx(0.5)


def test_recall_denominator_is_min_of_k_and_relevant():
    # Three relevant items, all ranked first, K=2: 2 hits / min(2, 3) = 1, not 2 / 3.
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.0, 0.2]])
    relevant = as_mask([{0, 1, 2}], 6)
    assert recall_at_k(scores, relevant, 2).item() == pytest.approx(1.0)
    # One relevant item found at K=3: 1 / min(3, 1) = 1.
    assert recall_at_k(scores, as_mask([{2}], 6), 3).item() == pytest.approx(1.0)


def test_relevant_item_ranked_last_scores_zero():
    # Row 3: the only relevant item has the lowest score, so no hit in the top 3.
    assert ndcg_at_k(SCORES[3:], RELEVANT[3:], 3).item() == 0.0
    assert recall_at_k(SCORES[3:], RELEVANT[3:], 3).item() == 0.0


def test_per_row_functions_return_nan_without_held_out():
    ndcg = ndcg_at_k(SCORES, RELEVANT, 3)
    recall = recall_at_k(SCORES, RELEVANT, 3)
    assert ndcg.shape == (4,)
    assert ndcg.dtype == torch.float64
    assert math.isnan(ndcg[2].item())
    assert math.isnan(recall[2].item())
    assert not torch.isnan(ndcg[[0, 1, 3]]).any()


def test_accumulator_leaves_out_and_counts_empty_rows():
    # Rows 0, 1, 3 enter the means, row 2 has no held-out item.
    # ndcg@3   = (1 + 0.530721 + 0) / 3 = 0.510240
    # recall@3 = (1 + 2/3 + 0) / 3      = 0.555556
    # ndcg@2   = (1 + 0.386853 + 0) / 3 = 0.462284
    # recall@2 = (1 + 0.5 + 0) / 3      = 0.5
    accumulator = RankingAccumulator(["ndcg@2", "ndcg@3", "recall@2", "recall@3"])
    accumulator.add(SCORES, RELEVANT)
    result = accumulator.result()
    assert result["ndcg@3"] == pytest.approx(0.510240, abs=1e-6)
    assert result["recall@3"] == pytest.approx(0.555556, abs=1e-6)
    assert result["ndcg@2"] == pytest.approx(0.462284, abs=1e-6)
    assert result["recall@2"] == pytest.approx(0.5)
    assert result["n_rows"] == 4
    assert result["n_rows_without_held_out"] == 1
    assert all(isinstance(result[name], float) for name in accumulator.metrics)


def test_accumulator_batches_match_one_batch():
    single_batch = RankingAccumulator(["ndcg@2", "recall@3"])
    single_batch.add(SCORES, RELEVANT)
    three_batches = RankingAccumulator(["ndcg@2", "recall@3"])
    three_batches.add(SCORES[:1], RELEVANT[:1])
    three_batches.add(SCORES[1:3], RELEVANT[1:3])
    three_batches.add(SCORES[3:], RELEVANT[3:])
    assert three_batches.result() == pytest.approx(single_batch.result())


def test_accumulator_accepts_scipy_csr():
    dense = RankingAccumulator(["ndcg@3", "recall@2"])
    dense.add(SCORES, RELEVANT)
    sparse = RankingAccumulator(["ndcg@3", "recall@2"])
    sparse.add(SCORES, sp.csr_matrix(RELEVANT.numpy().astype(np.float32)))
    assert sparse.result() == pytest.approx(dense.result())


def test_csr_explicit_zeros_are_not_relevant():
    # Item 0 (score 0.9) is stored with value 0, so the only relevant item is 5 (last).
    data = np.array([0.0, 1.0], dtype=np.float32)
    relevant = sp.csr_matrix((data, np.array([0, 5]), np.array([0, 2])), shape=(1, 6))
    assert recall_at_k(SCORES[:1], relevant, 1).item() == 0.0


def test_accumulator_without_rows_returns_nan():
    result = RankingAccumulator().result()
    assert all(math.isnan(result[name]) for name in METRICS)
    assert result["n_rows"] == 0
    assert result["n_rows_without_held_out"] == 0


def test_accumulator_all_rows_empty_returns_nan():
    accumulator = RankingAccumulator(["ndcg@2"])
    accumulator.add(SCORES[2:3], RELEVANT[2:3])
    result = accumulator.result()
    assert math.isnan(result["ndcg@2"])
    assert result["n_rows"] == 1
    assert result["n_rows_without_held_out"] == 1


@pytest.mark.parametrize("function", [ndcg_at_k, recall_at_k])
def test_k_larger_than_item_count_raises(function):
    with pytest.raises(ValueError, match=r"K=7 is larger than the item count 6"):
        function(SCORES, RELEVANT, 7)


@pytest.mark.parametrize("k", [0, -1])
def test_k_below_one_raises(k):
    with pytest.raises(ValueError, match="at least 1"):
        ndcg_at_k(SCORES, RELEVANT, k)


def test_accumulator_k_larger_than_item_count_names_metric():
    accumulator = RankingAccumulator()
    with pytest.raises(ValueError, match=r"'ndcg@100'.*K=100 is larger than the item count 6"):
        accumulator.add(SCORES, RELEVANT)


def test_accumulator_rejects_invalid_metric_lists():
    with pytest.raises(ValueError, match="invalid metric name 'hits@10'"):
        RankingAccumulator(["ndcg@10", "hits@10"])
    with pytest.raises(ValueError, match="empty"):
        RankingAccumulator([])
    with pytest.raises(ValueError, match="twice"):
        RankingAccumulator(["ndcg@10", "ndcg@10"])
    with pytest.raises(TypeError, match="sequence of names"):
        RankingAccumulator("ndcg@10")


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"relevant has shape \(4, 5\), but scores have shape \(4, 6\)"):
        ndcg_at_k(SCORES, RELEVANT[:, :5], 2)
    with pytest.raises(ValueError, match=r"exclude has shape \(3, 6\)"):
        ndcg_at_k(SCORES, RELEVANT, 2, exclude=RELEVANT[:3])
    with pytest.raises(ValueError, match=r"relevant has shape \(1, 6\)"):
        recall_at_k(SCORES, sp.csr_matrix((1, 6)), 2)
    with pytest.raises(ValueError, match="2-D"):
        ndcg_at_k(SCORES[0], RELEVANT[0], 2)


def test_constant_scorer_scores_zero():
    # All scores equal and relevant {1, 3}: the four non-relevant items rank first.
    scores = torch.zeros(1, 6)
    relevant = as_mask([{1, 3}], 6)
    for k in (1, 2, 3, 4):
        assert ndcg_at_k(scores, relevant, k).item() == 0.0
        assert recall_at_k(scores, relevant, k).item() == 0.0
    # K=5 leaves one slot for a relevant item, at position 4:
    # DCG = d4 = 0.386853, IDCG = d0 + d1 = 1.630930, NDCG = 0.237198, recall = 1 / min(5, 2)
    assert ndcg_at_k(scores, relevant, 5).item() == pytest.approx(0.237198, abs=1e-6)
    assert recall_at_k(scores, relevant, 5).item() == pytest.approx(0.5)


def test_ties_at_kth_position_resolved_pessimistically():
    # Scores 0.9, then three items tied at 0.5 (items 1, 2, 3), relevant {1, 2}.
    # K=3: threshold 0.5, one item above it (item 0, not relevant), two slots for the three
    # tied items: first the non-relevant item 3, then one relevant item. Relevance (0, 0, 1).
    # DCG = d2 = 0.5, IDCG = d0 + d1 = 1.630930, NDCG = 0.306574, recall = 1 / min(3, 2) = 0.5
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.5, 0.1, 0.0]])
    relevant = as_mask([{1, 2}], 6)
    assert ndcg_at_k(scores, relevant, 3).item() == pytest.approx(0.306574, abs=1e-6)
    assert recall_at_k(scores, relevant, 3).item() == pytest.approx(0.5)
    # K=2: the only tied slot goes to the non-relevant item 3.
    assert ndcg_at_k(scores, relevant, 2).item() == 0.0
    assert recall_at_k(scores, relevant, 2).item() == 0.0


def test_ties_above_threshold_ordered_relevant_last():
    # Items 0 and 1 tie at 0.8 above the K=3 threshold 0.6 (items 2, 3), relevant {0, 2}.
    # Position 0: item 1 (not relevant), position 1: item 0 (relevant), position 2: the
    # non-relevant tied item 3. Relevance (0, 1, 0).
    # DCG = d1 = 0.630930, IDCG = d0 + d1 = 1.630930, NDCG = 0.386853, recall = 1 / min(3, 2)
    scores = torch.tensor([[0.8, 0.8, 0.6, 0.6, 0.1, 0.0]])
    relevant = as_mask([{0, 2}], 6)
    assert ndcg_at_k(scores, relevant, 3).item() == pytest.approx(0.386853, abs=1e-6)
    assert recall_at_k(scores, relevant, 3).item() == pytest.approx(0.5)
    # Same ranking with the tied items listed in the other order.
    swapped = scores[:, [1, 0, 3, 2, 4, 5]]
    assert ndcg_at_k(swapped, relevant[:, [1, 0, 3, 2, 4, 5]], 3).item() == pytest.approx(0.386853, abs=1e-6)


def test_nan_scores_rank_lowest():
    # Item 0 is relevant but its score is NaN, so it ranks below the finite scores.
    scores = torch.tensor([[math.nan, 0.5, 0.4, 0.3]])
    relevant = as_mask([{0}], 4)
    assert recall_at_k(scores, relevant, 3).item() == 0.0
    # K=4 reaches it: DCG = d3, IDCG = d0, NDCG = 0.430677.
    assert ndcg_at_k(scores, relevant, 4).item() == pytest.approx(0.430677, abs=1e-6)


def test_nan_scores_counted_and_logged(caplog):
    scores = SCORES.clone()
    scores[1, 0] = math.nan
    scores[3, :] = math.nan
    accumulator = RankingAccumulator(["ndcg@2"])
    with caplog.at_level(logging.WARNING, logger="groupim.metrics"):
        accumulator.add(scores, RELEVANT)
        accumulator.add(scores, RELEVANT)
    assert accumulator.n_rows_with_nan_scores == 4
    assert len(caplog.records) == 1
    assert "NaN" in caplog.records[0].getMessage()


@pytest.mark.parametrize("exclude_format", ["tensor", "csr"])
def test_inputs_not_modified(exclude_format):
    scores = torch.tensor([[math.nan, 0.5, 0.4, 0.3]])
    relevant = as_mask([{0, 1}], 4)
    exclude = as_mask([{1}], 4)
    if exclude_format == "csr":
        exclude = sp.csr_matrix(exclude.numpy())
    ndcg_at_k(scores, relevant, 2, exclude=exclude)
    assert math.isnan(scores[0, 0].item())
    assert scores[0, 1].item() == 0.5
    assert torch.equal(relevant, as_mask([{0, 1}], 4))


def test_same_result_twice():
    scores, relevant, exclude = random_tied_batch(seed=1)
    first = ndcg_at_k(scores, relevant, 5, exclude=exclude)
    second = ndcg_at_k(scores, relevant, 5, exclude=exclude)
    assert torch.equal(first.nan_to_num(-1.0), second.nan_to_num(-1.0))


def test_result_independent_of_item_order():
    scores, relevant, exclude = random_tied_batch(seed=2)
    permutation = torch.randperm(scores.shape[1], generator=torch.Generator().manual_seed(3))
    for k in (1, 5, 20):
        original = ndcg_at_k(scores, relevant, k, exclude=exclude)
        permuted = ndcg_at_k(
            scores[:, permutation], relevant[:, permutation], k, exclude=exclude[:, permutation]
        )
        torch.testing.assert_close(permuted, original, equal_nan=True)


def test_excluded_fold_in_items_leave_ranking():
    # Fold-in items 0 and 1 score highest. Held-out item 2 comes third, first once they are removed.
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.2, 0.3]])
    held_out = as_mask([{2}], 6)
    fold_in = as_mask([{0, 1}], 6)
    assert ndcg_at_k(scores, held_out, 1).item() == 0.0
    assert ndcg_at_k(scores, held_out, 1, exclude=fold_in).item() == pytest.approx(1.0)
    fold_in_csr = sp.csr_matrix(fold_in.numpy())
    assert recall_at_k(scores, held_out, 1, exclude=fold_in_csr).item() == pytest.approx(1.0)


def test_excluded_items_are_not_relevant():
    # Item 0 is both held out and excluded, so it leaves the relevant set: only item 2
    # counts, and it is ranked first after the exclusion.
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.2, 0.3]])
    held_out = as_mask([{0, 2}], 6)
    exclude = as_mask([{0, 1}], 6)
    assert ndcg_at_k(scores, held_out, 2, exclude=exclude).item() == pytest.approx(1.0)
    # Excluding the only held-out item leaves a row without held-out items.
    accumulator = RankingAccumulator(["recall@2"])
    accumulator.add(scores, as_mask([{0}], 6), exclude=exclude)
    assert accumulator.result()["n_rows_without_held_out"] == 1


def test_all_items_excluded_but_relevant_one():
    # Fewer than K items keep a finite score: the excluded items tie at -inf as non-relevant.
    scores = torch.tensor([[0.3, 0.2, 0.1, 0.0]])
    exclude = as_mask([{0, 1, 2}], 4)
    relevant = as_mask([{3}], 4)
    assert ndcg_at_k(scores, relevant, 4, exclude=exclude).item() == pytest.approx(1.0)


def test_integer_scores_accepted():
    scores = torch.tensor([[3, 2, 1, 0]])
    assert ndcg_at_k(scores, as_mask([{0}], 4), 1).item() == pytest.approx(1.0)


@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("exclude_format", [None, "tensor", "csr"])
def test_matches_reference_on_tied_scores(k, exclude_format):
    scores, relevant, exclude = random_tied_batch(seed=10 + k)
    exclude = exclude if exclude_format else None
    expected_ndcg, expected_recall = reference_metrics(scores, relevant, k, exclude)

    exclude_arg = sp.csr_matrix(exclude.numpy()) if exclude_format == "csr" else exclude
    ndcg = ndcg_at_k(scores, relevant, k, exclude=exclude_arg).numpy()
    recall = recall_at_k(scores, relevant, k, exclude=exclude_arg).numpy()
    np.testing.assert_allclose(ndcg, expected_ndcg, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(recall, expected_recall, rtol=1e-12, atol=1e-12)

    # The batch must contain rows where the K-th score ties with items left out of the
    # top K and both relevant and non-relevant items share that score.
    masked = scores.masked_fill(exclude, -math.inf) if exclude is not None else scores
    kept_relevant = relevant & ~exclude if exclude is not None else relevant
    threshold = masked.topk(k, dim=1).values[:, -1:]
    tied = masked == threshold
    more_tied_than_slots = tied.sum(dim=1) > k - (masked > threshold).sum(dim=1)
    tied_relevant = (tied & kept_relevant).any(dim=1)
    tied_non_relevant = (tied & ~kept_relevant).any(dim=1)
    straddles = more_tied_than_slots & tied_relevant & tied_non_relevant
    assert straddles.sum() >= 5


def test_matches_reference_with_nan_and_infinite_scores():
    scores, relevant, exclude = random_tied_batch(seed=4, n_rows=32, n_items=12)
    generator = torch.Generator().manual_seed(5)
    special = torch.tensor([math.nan, math.inf, -math.inf])
    replace = torch.rand(scores.shape, generator=generator) < 0.2
    scores[replace] = special[torch.randint(0, 3, (int(replace.sum()),), generator=generator)]
    for k in (1, 5, 12):
        expected_ndcg, expected_recall = reference_metrics(scores, relevant, k, exclude)
        ndcg = ndcg_at_k(scores, relevant, k, exclude=exclude).numpy()
        recall = recall_at_k(scores, relevant, k, exclude=exclude).numpy()
        np.testing.assert_allclose(ndcg, expected_ndcg, rtol=1e-12)
        np.testing.assert_allclose(recall, expected_recall, rtol=1e-12)


def test_accumulator_matches_reference_means():
    metrics = ["ndcg@1", "ndcg@5", "ndcg@20", "recall@5", "recall@20"]
    accumulator = RankingAccumulator(metrics)
    batches = [random_tied_batch(seed=20 + batch) for batch in range(3)]
    for scores, relevant, exclude in batches:
        accumulator.add(scores, sp.csr_matrix(relevant.numpy()), exclude=sp.csr_matrix(exclude.numpy()))
    result = accumulator.result()

    scores = torch.cat([batch[0] for batch in batches])
    relevant = torch.cat([batch[1] for batch in batches])
    exclude = torch.cat([batch[2] for batch in batches])
    for name in metrics:
        kind, k = parse_metric_name(name)
        expected_ndcg, expected_recall = reference_metrics(scores, relevant, k, exclude)
        expected = expected_ndcg if kind == "ndcg" else expected_recall
        assert result[name] == pytest.approx(np.nanmean(expected), rel=1e-12)
    n_empty = int(((relevant & ~exclude).sum(dim=1) == 0).sum())
    assert n_empty > 0
    assert result["n_rows"] == scores.shape[0]
    assert result["n_rows_without_held_out"] == n_empty


def test_accumulator_empty_batch_changes_nothing():
    accumulator = RankingAccumulator(["ndcg@2"])
    accumulator.add(SCORES, RELEVANT)
    before = accumulator.result()
    accumulator.add(torch.zeros(0, 6), torch.zeros(0, 6, dtype=torch.bool))
    assert accumulator.result() == pytest.approx(before)
