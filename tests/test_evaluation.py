"""Ranking metrics, masking, tie handling and AUCs of recops.training.evaluation."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from scipy.stats import mannwhitneyu

from _factories import make_data
from recops.data.interactions import InteractionData
from recops.data.samples import sample_unseen_items
from recops.training.evaluation import (
    Scorer,
    auc,
    evaluate,
    ranking_metrics,
)


class TableScorer:
    """Scores every user from a fixed (n_users, n_items) table."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = np.asarray(table, dtype=np.float32)

    def score_users(self, users: np.ndarray) -> np.ndarray:
        return self.table[users]


class PairTableScorer(TableScorer):
    """A table scorer that also has score_pairs, with a separate like table."""

    def __init__(self, table: np.ndarray, like_table: np.ndarray) -> None:
        super().__init__(table)
        self.like_table = np.asarray(like_table, dtype=np.float32)

    def score_pairs(self, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.table[users, items], self.like_table[users, items]


def log2(x: float) -> float:
    return math.log2(x)


def test_ranking_metrics_match_recbole_formulas_by_hand() -> None:
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]])
    truth = sp.csr_matrix(np.array([[0, 1, 0, 1, 0], [1, 0, 0, 0, 0]]))
    m = ranking_metrics(scores, truth, ks=(2, 5))
    # User 0 ranks items 0,1,2,3,4: hits at ranks 2 and 4. User 1 ranks 4,3,2,1,0: its one hit at rank 5.
    assert m["recall@2"] == pytest.approx([1 / 2, 0.0])
    assert m["recall@5"] == pytest.approx([1.0, 1.0])
    assert m["ndcg@2"] == pytest.approx([(1 / log2(3)) / (1 + 1 / log2(3)), 0.0])
    assert m["ndcg@5"] == pytest.approx([(1 / log2(3) + 1 / log2(5)) / (1 + 1 / log2(3)), 1 / log2(6)])
    assert m["mrr@2"] == pytest.approx([1 / 2, 0.0])
    assert m["mrr@5"] == pytest.approx([1 / 2, 1 / 5])


def test_ranking_metrics_idcg_is_capped_at_k_and_masked_items_never_hit() -> None:
    # Three relevant items, K=2: IDCG sums 2 positions, so a perfect top 2 has NDCG 1 but recall 2/3.
    scores = np.array([[3.0, 2.0, 1.0, 0.0]])
    truth = sp.csr_matrix(np.array([[1, 1, 1, 0]]))
    m = ranking_metrics(scores, truth, ks=(2,))
    assert m["ndcg@2"] == pytest.approx([1.0])
    assert m["recall@2"] == pytest.approx([2 / 3])
    masked = np.array([[-np.inf, -np.inf, -np.inf, 0.0]])
    m = ranking_metrics(masked, truth, ks=(2,))
    assert m["recall@2"] == pytest.approx([0.0])


def test_ranking_metrics_without_ground_truth_are_nan() -> None:
    m = ranking_metrics(np.zeros((1, 3)), sp.csr_matrix((1, 3)), ks=(1,))
    assert np.isnan(m["recall@1"][0]) and np.isnan(m["ndcg@1"][0]) and np.isnan(m["mrr@1"][0])


def _ladder(n_users: int, n_items: int) -> np.ndarray:
    """Every user scores item i as n_items - i: item 0 best."""
    return np.tile(np.arange(n_items, 0, -1, dtype=np.float32), (n_users, 1))


def test_train_items_are_masked_and_valid_items_too_when_testing() -> None:
    # Item 0 (seen in train) and item 1 (valid) score highest; the test item 2 comes next.
    data = make_data(1, 6, train=[(0, 0)], valid=[(0, 1)], test=[(0, 2)])
    scorer = TableScorer(_ladder(1, 6))
    on_test = evaluate(scorer, data, ks=(1, 2), split="test")
    assert on_test["recall@1"] == 1.0
    assert on_test["mrr@1"] == 1.0
    assert on_test["users"] == 1
    # On the valid split only train is masked: the valid item 1 is then ranked first.
    on_valid = evaluate(scorer, data, ks=(1, 2), split="valid")
    assert on_valid["recall@1"] == 1.0


def test_oracle_scorer_gets_perfect_metrics_and_users_without_truth_are_skipped() -> None:
    rng = np.random.default_rng(1)
    n_users, n_items = 20, 50
    test = [(u, int(i)) for u in range(n_users - 2) for i in rng.choice(n_items, size=5, replace=False)]
    data = make_data(n_users, n_items, test=test)
    oracle = TableScorer(data.matrix(data.test).toarray())
    result = evaluate(oracle, data)
    assert result["users"] == n_users - 2
    for key in ("recall@10", "recall@20", "recall@50", "recall@100", "ndcg@10", "mrr@10"):
        assert result[key] == pytest.approx(1.0), key
    assert result["click_auc"] == pytest.approx(1.0)
    assert not any(key.startswith("cold_") for key in result)


def test_random_scorer_recall_is_about_k_over_n() -> None:
    rng = np.random.default_rng(2)
    n_users, n_items = 300, 400
    test = [(u, int(i)) for u in range(n_users) for i in rng.choice(n_items, size=10, replace=False)]
    data = make_data(n_users, n_items, test=test)
    result = evaluate(TableScorer(rng.random((n_users, n_items))), data, ks=(10, 100))
    assert result["recall@10"] == pytest.approx(10 / n_items, abs=0.01)
    assert result["recall@100"] == pytest.approx(100 / n_items, abs=0.03)
    assert result["click_auc"] == pytest.approx(0.5, abs=0.03)


def test_auc_matches_mann_whitney_with_ties() -> None:
    rng = np.random.default_rng(3)
    labels = rng.random(500) < 0.3
    scores = np.round(rng.normal(size=500) + labels, 1)  # rounding creates many ties
    expected = mannwhitneyu(scores[labels], scores[~labels]).statistic / (labels.sum() * (~labels).sum())
    assert auc(labels, scores) == pytest.approx(expected)
    assert auc([1, 1, 0], [0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert math.isnan(auc([1, 1], [0.1, 0.2]))
    assert math.isnan(auc([0, 0], [0.1, 0.2]))


def _cold_data(n_users: int = 200, n_warm: int = 10, n_cold: int = 20) -> InteractionData:
    """Every user's cold-test item is the first cold item; no warm ground truth."""
    cold_items = list(range(n_warm, n_warm + n_cold))
    return make_data(
        n_users,
        n_warm + n_cold,
        train=[(u, 0) for u in range(n_users)],
        cold_test=[(u, cold_items[0]) for u in range(n_users)],
        cold_items=cold_items,
    )


def test_cold_evaluation_ranks_only_cold_items() -> None:
    data = _cold_data()
    # Warm items outscore every cold item, and the first cold item outscores the other cold ones.
    table = np.zeros((data.n_users, data.n_items), dtype=np.float32)
    table[:, :10] = 100.0
    table[:, 10] = 1.0
    result = evaluate(TableScorer(table), data, ks=(1, 5))
    assert result["cold_recall@1"] == 1.0
    assert result["cold_recall@5"] == 1.0
    assert result["cold_ndcg@1"] == 1.0
    assert result["cold_users"] == data.n_users
    assert result["users"] == 0 and math.isnan(result["recall@1"])


def test_constant_cold_scores_get_random_ties_not_a_lucky_order() -> None:
    data = _cold_data()
    result = evaluate(TableScorer(np.zeros((data.n_users, data.n_items))), data, ks=(1, 5))
    # Without the jitter every user gets the same fixed tie order, and argpartition happens to put
    # the first cold item (everyone's ground truth) first: recall@1 would be 1.
    assert result["cold_recall@1"] == pytest.approx(1 / 20, abs=0.04)
    assert result["cold_recall@5"] == pytest.approx(5 / 20, abs=0.08)
    again = evaluate(TableScorer(np.zeros((data.n_users, data.n_items))), data, ks=(1, 5))
    assert again["cold_recall@5"] == result["cold_recall@5"]  # the jitter is seeded


def test_tie_breaking_keeps_distinct_scores_in_order() -> None:
    # Scores one float32 step apart must not be swapped by the jitter.
    base = np.float32(1000.0)
    row = np.array([base, np.nextafter(base, np.float32(0))], dtype=np.float32)
    data = make_data(300, 2, test=[(u, 0) for u in range(300)])
    result = evaluate(TableScorer(np.tile(row, (300, 1))), data, ks=(1,))
    assert result["recall@1"] == 1.0


def test_auc_sample_uses_score_pairs_and_unseen_negatives() -> None:
    n_users, n_items = 50, 30
    rng = np.random.default_rng(4)
    test = [(u, int(i)) for u in range(n_users) for i in rng.choice(n_items, size=4, replace=False)]
    likes = [int(i % 2 == 0) for _, i in test]
    data = make_data(n_users, n_items, test=test, test_likes=likes)
    truth = data.matrix(data.test).toarray()
    like_table = truth * (np.arange(n_items) % 2 == 0)
    # Without score_pairs the click table serves as the like score too: it cannot tell likes apart.
    plain = evaluate(TableScorer(truth), data)
    assert plain["click_auc"] == pytest.approx(1.0)
    assert plain["like_auc_clicked"] == pytest.approx(0.5)
    paired = evaluate(PairTableScorer(truth, like_table), data)
    assert paired["click_auc"] == pytest.approx(1.0)
    assert paired["like_auc"] == pytest.approx(1.0)
    assert paired["like_auc_clicked"] == pytest.approx(1.0)


def test_sampled_negatives_are_unseen_pool_items() -> None:
    seen = sp.csr_matrix(np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]))
    users = np.repeat([0, 1, 2], 200)
    pool = np.arange(5)  # item 5 is outside the pool (cold)
    items = sample_unseen_items(users, seen, pool, np.random.default_rng(0))
    assert set(items[users == 0]) == {3, 4}
    assert set(items[users == 1]) == {-1}  # everything in its pool is seen
    assert set(items[users == 2]) == {-1}


def test_evaluate_rejects_bad_arguments() -> None:
    data = make_data(1, 3, test=[(0, 0)])
    scorer = TableScorer(np.zeros((1, 3)))
    assert isinstance(scorer, Scorer)
    with pytest.raises(ValueError, match="split"):
        evaluate(scorer, data, split="train")
    with pytest.raises(ValueError, match="ks"):
        evaluate(scorer, data, ks=(0,))
    with pytest.raises(ValueError, match="shape"):
        evaluate(TableScorer(np.zeros((1, 2))), data)


def test_leave_one_out_ranks_the_test_item_from_train_and_the_valid_item():
    """The papers' protocol: at test time a sequential model reads the valid item too (it is the user's latest),
    and only under ``loo``: the other protocols keep ranking from train alone. Nothing is refitted."""
    import dataclasses

    from _factories import frame
    from recops.models.baselines import make_baseline

    # Items 2 and 3 go together for users 0-9, items 0 and 1 for users 10-19. User 20 had item 0 in train, then
    # item 2 (valid); its test item is 3, which only the valid item points to.
    train = [(u, i) for u in range(10) for i in (2, 3)] + [(u, i) for u in range(10, 20) for i in (0, 1)] + [(20, 0)]
    data = make_data(21, 4, train=train, test=[(20, 3)])
    valid = frame([(20, 2)]).with_columns(pl.lit(1_000, dtype=pl.Int64).alias("timestamp"))  # after train
    loo = dataclasses.replace(data, valid=valid, protocol="loo")
    time_ordered = dataclasses.replace(loo, protocol="recbole")
    for name in ("itemcf", "ease"):
        model = make_baseline(name)
        model.fit(loo)
        before = model.score_users(np.array([20]))
        assert evaluate(model, loo, ks=(1,), with_auc=False)["recall@1"] == 1.0, name
        assert evaluate(model, time_ordered, ks=(1,), with_auc=False)["recall@1"] == 0.0, name
        np.testing.assert_array_equal(model.score_users(np.array([20])), before)  # the fitted model is unchanged
    popularity = make_baseline("pop")
    popularity.fit(loo)
    assert popularity.conditioned(loo, loo.train) is popularity  # reads no history: itself


def test_the_two_tower_scorer_reads_the_valid_item_as_its_newest_history_under_leave_one_out():
    import dataclasses

    import torch

    from _factories import frame
    from recops.data.features import history_matrix
    from recops.training.trainer import ModelScorer

    class Towers:  # only what ModelScorer reads before scoring
        def item_vectors(self) -> torch.Tensor:
            return torch.zeros(4, 2)

    data = make_data(2, 4, train=[(0, 1), (0, 0), (1, 3)])
    valid = frame([(0, 2)]).with_columns(pl.lit(1_000, dtype=pl.Int64).alias("timestamp"))
    loo = dataclasses.replace(data, valid=valid, protocol="loo")
    scorer = ModelScorer(Towers(), history_matrix(loo.train, 2, 3))
    conditioned = scorer.conditioned(loo, pl.concat([loo.train, loo.valid]))
    assert conditioned.histories.items[0].tolist() == [1, 0, 2] and conditioned.histories.mask[0].all()
    assert scorer.histories.mask[0].tolist() == [False, True, True]  # the original keeps its train history
    assert scorer.histories.items[0, 1:].tolist() == [1, 0]
    assert conditioned.item_vectors is scorer.item_vectors  # nothing re-encoded
