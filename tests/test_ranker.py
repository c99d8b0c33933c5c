"""The ranker over an exported model: same scores as the trained model, clear errors for bad requests."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recops.serving.ranker import Ranker, RankRequestError
from recops.training.trainer import ModelScorer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tiny_model):
    data, result, model_dir = tiny_model
    return data, result, Ranker.load(model_dir)


def _history_ids(data, user):
    rows = data.train.filter(pl.col("user_idx") == user).sort("timestamp", "item_idx")
    return [data.items["item_id"][i] for i in rows["item_idx"].to_list()]


def test_recommendations_equal_the_trained_models_scores(exported):
    data, result, ranker = exported
    users = [u for u in range(data.n_users) if data.train.filter(pl.col("user_idx") == u).height][:20]
    expected = ModelScorer(result.model, result.histories).score_users(np.array(users))
    answers = ranker.recommend([_history_ids(data, u) for u in users], k=10)
    for row, user in enumerate(users):
        seen = set(data.train.filter(pl.col("user_idx") == user)["item_idx"].to_list())
        order = [i for i in np.argsort(-expected[row], kind="stable") if i not in seen][:10]
        got = [ranker.item_index[i] for i in answers[row].item_ids]
        assert np.allclose(answers[row].scores, expected[row][got], atol=1e-5)
        assert np.allclose(np.sort(expected[row][order])[::-1], answers[row].scores, atol=1e-5)
        assert ((answers[row].click > 0) & (answers[row].click < 1)).all()


def test_empty_history_and_candidates(exported):
    data, _, ranker = exported
    pool = data.items["item_id"].to_list()[:5]
    (answer,) = ranker.recommend([[]], k=3, candidates=pool)
    assert set(answer.item_ids) <= set(pool) and len(answer.item_ids) == 3
    assert list(answer.scores) == sorted(answer.scores, reverse=True)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"histories": [["no-such-item"]], "k": 5}, "unknown item ids: no-such-item"),
        ({"histories": [[]], "k": 0}, "k must be between 1"),
        ({"histories": [[]], "k": 100_000}, "k must be between 1"),
        ({"histories": [[]], "k": 5, "candidates": ["nope"]}, "candidates has unknown"),
        ({"histories": [[]], "k": 5, "candidates": []}, "candidates is empty"),
    ],
)
def test_bad_requests_are_refused_and_the_ranker_keeps_working(exported, request_, message):
    data, _, ranker = exported
    with pytest.raises(RankRequestError, match=message):
        ranker.recommend(**request_)
    assert len(ranker.recommend([[data.items["item_id"][0]]], k=2)[0].item_ids) == 2


def test_a_pool_holding_only_the_history_is_refused(exported):
    data, _, ranker = exported
    first = data.items["item_id"][0]
    with pytest.raises(RankRequestError, match="k=1 but only 0 items are left"):
        ranker.recommend([[first]], k=1, candidates=[first])


def test_oversized_history_is_refused(exported):
    data, _, ranker = exported
    small = Ranker(ranker.loaded, max_history=3)
    with pytest.raises(RankRequestError, match="history\\[0\\] has 4 items; at most 3"):
        small.recommend([data.items["item_id"].to_list()[:4]], k=2)


def test_a_candidate_pool_with_repeats_answers_each_item_once_less_the_history(exported):
    data, _, ranker = exported
    ids = data.items["item_id"].to_list()
    (answer,) = ranker.recommend([[ids[0]]], k=3, candidates=[ids[0], ids[1], ids[1], ids[2], ids[3], ids[3]])
    assert sorted(answer.item_ids) == sorted(ids[1:4])  # each once; the history's item is left out
    with pytest.raises(RankRequestError, match="k=4 but only 3 items are left"):
        ranker.recommend([[ids[0]]], k=4, candidates=[ids[0], ids[1], ids[1], ids[2], ids[3]])


def test_an_index_with_nan_rows_is_refused_at_load_naming_the_items(tiny_model):
    from recops.serving.ranker import Scorer
    from recops.training.export import load_model

    _, _, model_dir = tiny_model
    loaded = load_model(model_dir, with_backbone=False)
    loaded.item_index[[2, 5]] = np.nan
    with pytest.raises(ValueError, match=rf"2 rows with NaN or infinite values \(items {loaded.item_ids[2]}, "):
        Scorer(loaded)


@pytest.mark.parametrize("exclude_history", [True, False])
def test_a_mixed_batch_answers_each_request_as_it_would_alone(exported, exclude_history):
    """Whole-catalog requests, a candidate pool, an empty history, a repeated item and one asking for more items
    than are left, ranked in one batch: each gets the answer (or the error) it gets on its own."""
    data, _, ranker = exported
    ids = data.items["item_id"].to_list()
    catalog, scorer = ranker.catalog, ranker.scorer
    requests = [
        catalog.features(ids[:5], 4),
        catalog.features(ids[3:9], 3, candidates=ids[:12]),
        catalog.features(ids[:10], catalog.max_k),  # more than the catalog less the history
        catalog.features([], 7),
        catalog.features([ids[20], ids[21], ids[20]], 2),
    ]
    answers = scorer.rank(requests, exclude_history=exclude_history)
    for request, answer in zip(requests, answers, strict=True):
        (alone,) = scorer.rank([request], exclude_history=exclude_history)
        if isinstance(alone, RankRequestError):
            assert isinstance(answer, RankRequestError) and str(answer) == str(alone)
            continue
        assert np.array_equal(answer.items, alone.items) and len(answer.items) == request.k
        for field in ("scores", "click", "like"):
            assert np.allclose(getattr(answer, field), getattr(alone, field), atol=1e-6)
        if exclude_history:
            assert not set(answer.items.tolist()) & set(request.history[request.mask].tolist())
    assert isinstance(answers[2], RankRequestError) == exclude_history
