"""Every baseline fits on planted two-group data and recovers the structure it can see."""

from __future__ import annotations

import numpy as np
import pytest

from _factories import item_half, make_data, planted_data
from recops.data.interactions import InteractionData
from recops.models.baselines import BASELINES, Recommender, make_baseline
from recops.models.baselines.itemcf import top_k_per_row
from recops.models.baselines.tfidf import tfidf_vectors, tokenize
from recops.training.evaluation import Scorer, auc, evaluate

# Small enough for the planted data to train in well under a second.
FAST_PARAMS: dict[str, dict[str, object]] = {
    "bpr": {"epochs": 30, "dim": 16, "lr": 0.02, "reg": 1e-3},
    "sasrec": {"epochs": 5, "dim": 16, "max_length": 10},
}
PERSONALISED = ("itemcf", "bpr", "ease", "tfidf")
COLLABORATIVE = ("pop", "itemcf", "bpr", "ease")


@pytest.fixture(scope="module")
def data() -> InteractionData:
    return planted_data()


@pytest.fixture(scope="module")
def fitted(data: InteractionData) -> dict[str, Recommender]:
    models = {}
    for name in BASELINES:
        model = make_baseline(name, **FAST_PARAMS.get(name, {}))
        model.fit(data)
        models[name] = model
    return models


def _halves(data: InteractionData, items: np.ndarray) -> np.ndarray:
    return np.array([item_half(data, int(i)) for i in items])


def test_registry_names_match_classes() -> None:
    assert set(BASELINES) == {"pop", "itemcf", "bpr", "ease", "tfidf", "sasrec"}
    for name, model in BASELINES.items():
        assert model.name == name
    with pytest.raises(ValueError, match="known: bpr, ease, itemcf, pop, sasrec, tfidf"):
        make_baseline("svd")


def test_scoring_before_fit_fails() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        make_baseline("pop").score_users(np.array([0]))


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_scores_have_the_scorer_shape_and_dtype(name: str, data: InteractionData, fitted: dict) -> None:
    model = fitted[name]
    assert isinstance(model, Scorer)
    scores = model.score_users(np.array([0, 3, 5]))
    assert scores.shape == (3, data.n_items)
    assert scores.dtype == np.float32
    assert np.isfinite(scores).all()
    assert model.score_users(np.array([], dtype=np.int64)).shape == (0, data.n_items)


@pytest.mark.parametrize("name", PERSONALISED)
def test_personalised_baselines_prefer_the_users_half(name: str, data: InteractionData, fitted: dict) -> None:
    users = np.arange(data.n_users)
    scores = fitted[name].score_users(users)
    warm = np.flatnonzero(data.warm_mask)
    item_halves = _halves(data, warm)
    seen = data.train_matrix().toarray()[:, warm].astype(bool)
    for user in users:
        own = (item_halves == user % 2) & ~seen[user]
        other = item_halves != user % 2
        # Unseen items of the user's half outrank the other half's, pair by pair. Not all pairs:
        # BPR samples those very items as negatives, so one of them can end up below a few others.
        labels = np.r_[np.ones(own.sum()), np.zeros(other.sum())]
        ordered = auc(labels, np.r_[scores[user, warm[own]], scores[user, warm[other]]])
        assert ordered >= 0.95, (name, user, ordered)


def test_popularity_scores_train_counts(data: InteractionData, fitted: dict) -> None:
    counts = np.bincount(data.train["item_idx"].to_numpy(), minlength=data.n_items)
    scores = fitted["pop"].score_users(np.array([0, 1]))
    np.testing.assert_array_equal(scores, np.tile(counts, (2, 1)))


@pytest.mark.parametrize("name", COLLABORATIVE)
def test_collaborative_baselines_give_cold_items_no_signal(
    name: str, data: InteractionData, fitted: dict
) -> None:
    cold_scores = fitted[name].score_users(np.arange(data.n_users))[:, data.cold_items]
    assert (cold_scores == cold_scores[:, :1]).all()


def test_tfidf_ranks_cold_items_of_the_users_half_first(data: InteractionData, fitted: dict) -> None:
    cold = np.asarray(data.cold_items)
    scores = fitted["tfidf"].score_users(np.arange(data.n_users))[:, cold]
    cold_halves = _halves(data, cold)
    for user in range(data.n_users):
        top = cold[np.argsort(-scores[user])[: len(cold) // 2]]
        assert set(_halves(data, top)) == {user % 2}, user
    result = evaluate(fitted["tfidf"], data, ks=(1, 5))
    assert result["cold_recall@5"] > 0.9
    assert cold_halves.tolist() == [0] * 5 + [1] * 5


def test_evaluation_of_fitted_baselines_orders_them_sensibly(data: InteractionData, fitted: dict) -> None:
    results = {name: evaluate(model, data, ks=(5, 10)) for name, model in fitted.items()}
    # Popularity ignores the groups; the others see them, so they should beat it on warm items.
    for name in PERSONALISED:
        assert results[name]["recall@10"] > results["pop"]["recall@10"], name
        # A third of the sampled negatives are unseen items of the user's own half, as good as the
        # positives, so even a perfect group model stays near 2/3 + 1/3 * 1/2.
        assert results[name]["click_auc"] > 0.75, name
    for name in COLLABORATIVE:
        assert results[name]["cold_recall@5"] == pytest.approx(0.5, abs=0.2), name


def test_bpr_is_reproducible_for_a_seed(data: InteractionData) -> None:
    first, second = (make_baseline("bpr", epochs=2, dim=8, seed=7) for _ in range(2))
    first.fit(data)
    second.fit(data)
    np.testing.assert_array_equal(first.score_users(np.arange(4)), second.score_users(np.arange(4)))


def test_ease_matches_the_closed_form_on_a_tiny_matrix() -> None:
    train = [(0, 0), (0, 1), (1, 1), (1, 2), (2, 0), (2, 2), (3, 0), (3, 1), (3, 2)]
    data = make_data(4, 3, train=train)
    lam = 2.0
    x = data.train_matrix().toarray().astype(np.float64)
    inverse = np.linalg.inv(x.T @ x + lam * np.eye(3))
    expected_b = np.eye(3) - inverse / np.diag(inverse)
    model = make_baseline("ease", lam=lam)
    model.fit(data)
    np.testing.assert_allclose(model.score_users(np.arange(4)), x @ expected_b, rtol=1e-5, atol=1e-6)


def test_ease_past_its_item_limit_models_the_most_popular_items_and_scores_the_rest_zero() -> None:
    # Item 3 is the least popular: with room for three items EASE is the closed form over items 0-2.
    train = [(0, 0), (0, 1), (1, 1), (1, 2), (2, 0), (2, 2), (3, 0), (3, 1), (3, 2), (1, 3)]
    data = make_data(4, 4, train=train)
    x = data.train_matrix().toarray().astype(np.float64)[:, :3]
    inverse = np.linalg.inv(x.T @ x + 2.0 * np.eye(3))
    expected = x @ (np.eye(3) - inverse / np.diag(inverse))
    for float64_items in (10, 0):  # the float32 solve above float64_items agrees to float32 precision
        model = make_baseline("ease", lam=2.0, max_items=3, float64_items=float64_items)
        model.fit(data)
        scores = model.score_users(np.arange(4))
        np.testing.assert_allclose(scores[:, :3], expected, rtol=1e-4, atol=1e-5)
        assert scores.shape == (4, 4) and not scores[:, 3].any()
    with pytest.raises(ValueError, match="max_items"):
        make_baseline("ease", max_items=0)


def test_itemcf_prunes_to_k_neighbours_per_item() -> None:
    matrix = np.array(
        [[0.0, 0.9, 0.5, 0.1], [0.9, 0.0, 0.2, 0.3], [0.5, 0.2, 0.0, 0.0], [0.1, 0.3, 0.0, 0.0]]
    )
    pruned = top_k_per_row(matrix, 2).toarray()
    expected = np.array([[0, 0.9, 0.5, 0], [0.9, 0, 0, 0.3], [0.5, 0.2, 0, 0], [0.1, 0.3, 0, 0]])
    np.testing.assert_allclose(pruned, expected)


def test_tfidf_vectors_are_unit_rows_weighting_rare_terms_up() -> None:
    assert tokenize("Sci-Fi, Crime_Drama (1995)") == ["sci", "fi", "crime", "drama", "1995"]
    vectors = tfidf_vectors(["common rare", "common", "common other", None]).toarray()
    np.testing.assert_allclose(np.linalg.norm(vectors[:3], axis=1), 1.0)
    assert not vectors[3].any()
    # In the first document "rare" (1 document) outweighs "common" (3 documents).
    nonzero = vectors[0][vectors[0] > 0]
    assert nonzero.max() > nonzero.min()


def test_sasrec_learns_what_comes_next_and_reads_the_valid_item_at_test_time() -> None:
    """Every user walks the catalog in order (item t, then t + 1, ...): the next item is what the newest one
    says. Under leave-one-out the test item follows the valid item, so a model that ranked from train alone
    would predict the valid item, which is masked, and miss."""
    import dataclasses

    import polars as pl

    n_users, n_items, length = 300, 30, 8
    walks = pl.DataFrame({"user_idx": [u for u in range(n_users) for _ in range(length)],
                          "item_idx": [(u + t) % n_items for u in range(n_users) for t in range(length)],
                          "like": [0] * (n_users * length),
                          "timestamp": [t for _ in range(n_users) for t in range(length)]},
                         schema={"user_idx": pl.Int64, "item_idx": pl.Int64, "like": pl.Int8, "timestamp": pl.Int64})
    data = dataclasses.replace(
        make_data(n_users, n_items), protocol="loo", train=walks.filter(pl.col("timestamp") < length - 2),
        valid=walks.filter(pl.col("timestamp") == length - 2), test=walks.filter(pl.col("timestamp") == length - 1))
    recall = {}
    # A toy walk learns faster with less dropout and a larger step than Beauty's published settings.
    toy = {"epochs": 40, "dim": 16, "max_length": 10, "batch_size": 64, "dropout": 0.2, "lr": 1e-3}
    for name, params in (("sasrec", toy), ("pop", {})):
        model = make_baseline(name, **params)
        model.fit(data)
        recall[name] = evaluate(model, data, ks=(1, 5), with_auc=False)["recall@1"]
    assert recall["sasrec"] > 0.8 and recall["sasrec"] > 5 * recall["pop"], recall
    # Reproducible for a seed.
    again = make_baseline("sasrec", epochs=2, dim=16, max_length=10, seed=3)
    again.fit(data)
    twin = make_baseline("sasrec", epochs=2, dim=16, max_length=10, seed=3)
    twin.fit(data)
    np.testing.assert_array_equal(again.score_users(np.arange(5)), twin.score_users(np.arange(5)))


@pytest.mark.parametrize(("params", "message"), [
    ({"dim": 0}, "need dim, blocks"), ({"epochs": -1}, "epochs >= 0"), ({"dropout": 1.0}, "0 <= dropout < 1"),
    ({"lr": 0}, "lr > 0"), ({"dim": 10, "heads": 3}, "dim 10 must be a multiple of heads 3"),
    ({"patience": 0}, "patience, validate_every >= 1"), ({"time_budget": 0}, "positive time_budget"),
    ({"weight_decay": -1}, "weight_decay >= 0"),
])
def test_sasrec_refuses_impossible_settings(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_baseline("sasrec", **params)


def test_sasrec_stops_early_on_the_callers_validation_metric_and_keeps_its_best_epoch() -> None:
    """The metric peaks at the 2nd validation (epoch 4 with validate_every=2) and only falls after: with
    patience 4 the run stops at epoch 8, and the model scores as it did at epoch 4."""
    data = make_data(60, 20)
    readings = iter([0.1, 0.5, 0.4, 0.3, 0.2, 0.1])
    scores_at: dict[int, np.ndarray] = {}

    def validate(model) -> float:
        scores_at[model.epochs_run] = model.score_users(np.arange(5))
        return next(readings)

    model = make_baseline("sasrec", epochs=50, dim=8, max_length=5, patience=4, validate_every=2)
    model.fit(data, validate=validate)
    assert model.epochs_run == 8 and model.best_epoch == 4
    assert model.curve == [(2, 0.1), (4, 0.5), (6, 0.4), (8, 0.3)]
    np.testing.assert_allclose(model.score_users(np.arange(5)), scores_at[4], rtol=1e-5)
    # Without a validation callback it trains every epoch.
    plain = make_baseline("sasrec", epochs=3, dim=8, max_length=5)
    plain.fit(data)
    assert plain.epochs_run == 3 and plain.curve == []
