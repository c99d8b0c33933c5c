"""Tests of the synthetic e-commerce log generator."""

from __future__ import annotations

import time

import numpy as np
import polars as pl
import pytest

from recops.data.synthetic import (
    CATEGORIES,
    EVENT_TYPES,
    SHARED_ADJECTIVES,
    SyntheticConfig,
    SyntheticDataset,
    generate,
)

EXPECTED_EVENT_SCHEMA = {
    "user_id": pl.Utf8,
    "item_id": pl.Utf8,
    "event": pl.Utf8,
    "timestamp": pl.Int64,
    "device": pl.Utf8,
    "request_id": pl.Utf8,
    "value": pl.Float64,
}
EXPECTED_ITEM_SCHEMA = {
    "item_id": pl.Utf8,
    "title": pl.Utf8,
    "category": pl.Utf8,
    "description": pl.Utf8,
    "price": pl.Float64,
    "created_at": pl.Int64,
}
SMALL = SyntheticConfig(n_users=300, n_items=200, days=10, seed=3)


@pytest.fixture(scope="module")
def dataset() -> SyntheticDataset:
    return generate(SyntheticConfig())


def _step(events: pl.DataFrame, name: str) -> pl.DataFrame:
    return events.filter(pl.col("event") == name)


def _human_impressions_with_clicks(ds: SyntheticDataset) -> pl.DataFrame:
    """Human impression rows with a 0/1 ``clicked`` column (bots click at random)."""
    clicks = _step(ds.events, "click").select("request_id", "item_id").unique()
    return (
        _step(ds.events, "impression")
        .filter(~pl.col("user_id").is_in(list(ds.bot_user_ids)))
        .join(clicks.with_columns(clicked=pl.lit(1)), on=["request_id", "item_id"], how="left")
        .with_columns(pl.col("clicked").fill_null(0))
    )


def test_schemas_are_exact(dataset: SyntheticDataset) -> None:
    assert dict(dataset.events.schema) == EXPECTED_EVENT_SCHEMA
    assert dict(dataset.items.schema) == EXPECTED_ITEM_SCHEMA
    assert dataset.events.select(pl.exclude("value")).null_count().sum_horizontal().item() == 0
    assert dataset.items.null_count().sum_horizontal().item() == 0


def test_ids_devices_and_event_names(dataset: SyntheticDataset) -> None:
    ev, items = dataset.events, dataset.items
    assert ev["user_id"].str.contains(r"^U\d{6}$").all()
    assert items["item_id"].str.contains(r"^P\d{5}$").all()
    assert items["item_id"].is_unique().all()
    assert set(ev["event"].unique()) == set(EVENT_TYPES)
    assert ev["device"].str.contains(r"^(iOS\d+\.\d|Android\d+|Web)$").all()
    assert ev["timestamp"].is_sorted()


def test_default_size_and_time() -> None:
    started = time.perf_counter()
    ds = generate(SyntheticConfig())
    assert time.perf_counter() - started < 3.0
    # 2000 users × ~12 requests × (10 impressions + funnel) + the bots' bursts.
    assert 200_000 < ds.events.height < 400_000
    assert ds.items.height == 1000
    assert ds.events["user_id"].n_unique() == 2000


def test_two_million_events_within_target() -> None:
    config = SyntheticConfig(n_users=15_000, n_items=5_000)
    started = time.perf_counter()
    ds = generate(config)
    assert time.perf_counter() - started < 30.0
    assert ds.events.height > 2_000_000


def test_deterministic_and_seed_sensitive() -> None:
    first, second = generate(SMALL), generate(SMALL)
    assert first.events.equals(second.events)
    assert first.items.equals(second.items)
    assert first.bot_user_ids == second.bot_user_ids
    assert np.array_equal(
        first.click_probability(["U000001"] * 3, ["P00000", "P00001", "P00002"]),
        second.click_probability(["U000001"] * 3, ["P00000", "P00001", "P00002"]),
    )
    other = generate(SyntheticConfig(n_users=300, n_items=200, days=10, seed=4))
    assert not first.events.equals(other.events)
    assert not first.items.equals(other.items)


def test_events_reference_catalog_items(dataset: SyntheticDataset) -> None:
    assert set(dataset.events["item_id"].unique()) <= set(dataset.items["item_id"])


def test_each_request_is_one_user_on_one_device(dataset: SyntheticDataset) -> None:
    per_request = dataset.events.group_by("request_id").agg(
        pl.col("user_id").n_unique(), pl.col("device").n_unique()
    )
    assert (per_request["user_id"] == 1).all()
    assert (per_request["device"] == 1).all()


def test_slates_hold_distinct_items_of_slate_size(dataset: SyntheticDataset) -> None:
    slates = _step(dataset.events, "impression").unique().group_by("request_id").agg(
        pl.len().alias("shown"), pl.col("item_id").n_unique().alias("distinct")
    )
    assert (slates["shown"] == dataset.config.slate_size).all()
    assert (slates["distinct"] == slates["shown"]).all()


@pytest.mark.parametrize(
    ("step", "after"),
    [("click", "impression"), ("like", "click"), ("cart", "click"), ("purchase", "cart")],
)
def test_funnel_steps_follow_their_cause(dataset: SyntheticDataset, step: str, after: str) -> None:
    keys = ["request_id", "item_id"]
    cause = _step(dataset.events, after).group_by(keys).agg(pl.col("timestamp").min().alias("cause_at"))
    effect = _step(dataset.events, step).join(cause, on=keys, how="left")
    assert effect.height > 0
    assert effect["cause_at"].null_count() == 0  # e.g. clicks only on impressed items
    assert (effect["timestamp"] > effect["cause_at"]).all()


def test_purchase_value_is_item_price(dataset: SyntheticDataset) -> None:
    purchases = _step(dataset.events, "purchase").join(
        dataset.items.select("item_id", "price"), on="item_id"
    )
    assert purchases.height > 0
    assert (purchases["value"] == purchases["price"]).all()
    assert dataset.events.filter(pl.col("event") != "purchase")["value"].null_count() == (
        dataset.events.height - purchases.height
    )


def test_bots_fire_hundreds_of_events_per_minute(dataset: SyntheticDataset) -> None:
    assert len(dataset.bot_user_ids) == dataset.config.n_bots == 10
    peak = (
        dataset.events.group_by("user_id", (pl.col("timestamp") // 60).alias("minute"))
        .len()
        .group_by("user_id")
        .agg(pl.col("len").max().alias("peak"))
        .with_columns(bot=pl.col("user_id").is_in(list(dataset.bot_user_ids)))
    )
    assert peak.filter(pl.col("bot"))["peak"].min() >= 300
    assert peak.filter(~pl.col("bot"))["peak"].max() < 100


def test_exact_duplicates_exist(dataset: SyntheticDataset) -> None:
    duplicated = dataset.events.height - dataset.events.unique().height
    expected = int(dataset.config.duplicate_fraction * dataset.events.height)
    assert 0.5 * expected <= duplicated <= 1.5 * expected


def test_no_event_before_an_item_is_listed(dataset: SyntheticDataset) -> None:
    config = dataset.config
    first_seen = dataset.events.group_by("item_id").agg(pl.col("timestamp").min().alias("first_seen"))
    joined = dataset.items.join(first_seen, on="item_id")
    assert (joined["first_seen"] >= joined["created_at"]).all()
    cold = dataset.items.filter(pl.col("item_id").is_in(list(dataset.cold_item_ids)))
    assert cold.height == config.n_cold_items == 100
    assert (cold["created_at"] >= config.start_timestamp + 0.85 * config.period).all()
    # The exposure policy's new-arrivals slot gives cold items traffic to evaluate on.
    cold_clicks = _step(dataset.events, "click").filter(pl.col("item_id").is_in(list(dataset.cold_item_ids)))
    assert cold_clicks["item_id"].n_unique() > 50


def test_hidden_signal_is_recoverable(dataset: SyntheticDataset) -> None:
    shown = _human_impressions_with_clicks(dataset)
    affinity = dataset.preferences.affinity(shown["user_id"].to_numpy(), shown["item_id"].to_numpy())
    clicked = shown["clicked"].to_numpy()
    low, high = np.quantile(affinity, [0.1, 0.9])
    bottom, top = clicked[affinity <= low].mean(), clicked[affinity >= high].mean()
    assert 0.03 < clicked.mean() < 0.15
    assert top > 10 * bottom


def test_click_probability_is_calibrated(dataset: SyntheticDataset) -> None:
    # Position bias is not in the log, so compare against the slate-average
    # probability: mean over positions of sigmoid(logit(p0) + bias(pos)).
    shown = _human_impressions_with_clicks(dataset).sample(20_000, seed=0)
    users, items = shown["user_id"].to_numpy(), shown["item_id"].to_numpy()
    positions = np.arange(dataset.config.slate_size)
    expected = dataset.click_probability(users[:, None], items[:, None], positions[None, :]).mean(axis=1)
    assert abs(expected.mean() - shown["clicked"].mean()) < 0.01


def test_text_carries_the_taste_features(dataset: SyntheticDataset) -> None:
    prefs = dataset.preferences
    rows = dataset.items.head(50).iter_rows(named=True)
    for row, words, category in zip(rows, prefs.item_words, prefs.item_category, strict=False):
        text = f"{row['title']} {row['description']}".lower()
        assert row["category"] == prefs.categories[category]
        assert row["category"] in text
        assert all(prefs.vocabulary[w] in text for w in words)


def test_vocabulary_words_are_unique_per_category() -> None:
    words = [w for _, vocabulary in CATEGORIES.values() for w in vocabulary] + list(SHARED_ADJECTIVES)
    assert len(words) == len(set(words))
    assert all(len(vocabulary) >= 15 for _, vocabulary in CATEGORIES.values())


def test_probability_api(dataset: SyntheticDataset) -> None:
    items = dataset.items["item_id"].to_list()
    one_user = dataset.click_probability(["U000007"], items)
    assert one_user.shape == (len(items),)
    assert ((one_user > 0) & (one_user < 1)).all()
    lower = dataset.click_probability(["U000007"], items, positions=5)
    assert (lower < one_user).all()  # position bias
    affinity = dataset.preferences.affinity(["U000007"], items)
    likes = dataset.like_probability(["U000007"], items)
    assert np.all(np.diff(likes[np.argsort(affinity)]) >= 0)
    with pytest.raises(KeyError, match="U999999"):
        dataset.click_probability(["U999999"], items[:1])
    with pytest.raises(KeyError, match="P99999"):
        dataset.like_probability(["U000007"], ["P99999"])


def test_tiny_and_degenerate_configs() -> None:
    # Fewer warm items than slate slots: slates shrink, but never repeat an item.
    tiny = generate(
        SyntheticConfig(
            n_users=20, n_items=5, n_categories=1, cold_fraction=0.4, popular_share=1.0, fresh_share=0.0
        )
    )
    slates = _step(tiny.events, "impression").unique().group_by("request_id").agg(
        pl.len().alias("shown"), pl.col("item_id").n_unique().alias("distinct")
    )
    assert (slates["shown"] == slates["distinct"]).all()
    assert set(slates["shown"].unique()) <= {3, 4, 5}
    clean = generate(SyntheticConfig(n_users=5, n_items=1, bot_fraction=0, duplicate_fraction=0))
    assert clean.bot_user_ids == ()
    assert clean.events.height == clean.events.unique().height


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_users", 0),
        ("n_items", -1),
        ("n_categories", len(CATEGORIES) + 1),
        ("days", 0),
        ("days", 1.5),
        ("requests_per_user", 0.5),
        ("slate_size", 0),
        ("cold_fraction", 1.0),
        ("bot_fraction", -0.1),
        ("duplicate_fraction", 1.0),
        ("popular_share", 1.5),
        ("fresh_share", 0.9),
        ("seed", -1),
        ("n_users", True),
        ("seed", "0"),
    ],
)
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**{field: value})  # type: ignore[arg-type]
