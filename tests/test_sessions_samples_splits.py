"""Sessions, histories, item statistics, click samples, splits and history features."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recops.data.features import FeatureSchema, histories_from_ids, history_matrix
from recops.data.samples import click_samples
from recops.data.sessions import engagements, item_statistics, sessionize, user_histories
from recops.data.splits import recbole_split, recbole_split_sizes, time_split


def _events(rows):
    return pl.DataFrame(rows, schema=["user_id", "item_id", "event", "timestamp"], orient="row")


def test_sessions_split_on_the_gap():
    events = _events([("U1", "A", "click", 0), ("U1", "B", "click", 60), ("U1", "C", "click", 60 + 31 * 60),
                      ("U2", "A", "click", 10)])
    sessions = sessionize(events, gap_minutes=30)
    assert sessions.filter(pl.col("user_id") == "U1")["session_id"].to_list() == [0, 0, 1]
    assert sessions.filter(pl.col("user_id") == "U2")["session_id"].to_list() == [0]


def test_engagements_and_histories():
    events = _events([("U1", "A", "impression", 0), ("U1", "A", "click", 1), ("U1", "A", "like", 2),
                      ("U1", "B", "purchase", 5), ("U1", "C", "impression", 6)])
    engaged = engagements(events)
    assert engaged["item_id"].to_list() == ["A", "B"]
    assert engaged["like"].to_list() == [1, 0]
    assert user_histories(events, max_length=1)["history"].to_list() == [["B"]]


def test_item_statistics():
    events = _events([("U1", "A", "impression", 0), ("U2", "A", "impression", 0), ("U1", "A", "click", 1)])
    stats = item_statistics(events.with_columns(pl.lit(None, dtype=pl.Float64).alias("value")))
    row = stats.row(0, named=True)
    assert (row["impressions"], row["clicks"], row["users"], row["ctr"]) == (2, 1, 2, 0.5)


def test_click_samples_use_exposures_first_then_catalog():
    rng = np.random.default_rng(0)
    pos_users, pos_items, likes = np.array([0, 0, 1]), np.array([1, 2, 3]), np.array([1, 0, 1])
    exposures_users, exposures_items = np.array([0, 0, 0]), np.array([4, 5, 1])  # item 1 was clicked
    samples = click_samples(pos_users, pos_items, likes, exposures_users, exposures_items,
                            np.arange(20), 20, negatives=4, rng=rng)
    negatives = samples.click == 0
    assert negatives.sum() == 3 * 4
    user0 = set(samples.items[negatives & (samples.users == 0)].tolist())
    assert {4, 5} <= user0 and not ({1, 2} & user0)  # exposures used; positives never negatives
    assert not {3} & set(samples.items[negatives & (samples.users == 1)].tolist())
    assert samples.like[negatives].sum() == 0 and samples.like[~negatives].tolist() == [1, 0, 1]


def test_recbole_split_sizes_match_recbole():
    assert recbole_split_sizes(20, (0.8, 0.1, 0.1)) == [16, 2, 2]
    assert recbole_split_sizes(25, (0.8, 0.1, 0.1)) == [21, 2, 2]
    assert recbole_split_sizes(5, (0.8, 0.1, 0.1)) == [3, 1, 1]


def test_recbole_split_is_per_user_and_holds_out_cold_items():
    rows = [(f"U{u}", f"I{i}", u * 100 + i) for u in range(30) for i in range(20)]
    engaged = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")
    parts = recbole_split(engaged, seed=1, cold_item_fraction=0.1)
    assert len(parts.cold_items) == 2
    for frame in (parts.train, parts.valid, parts.test):
        assert not set(frame["item_id"]) & set(parts.cold_items)
    assert parts.cold_test.height == 2 * 30
    assert parts.train.height == 30 * 16 and parts.test.height == 30 * 1  # 18 warm items: [16, 1, 1]
    again = recbole_split(engaged, seed=1, cold_item_fraction=0.1)
    assert again.test.equals(parts.test)


def test_time_split_marks_late_items_cold():
    rows = [("U1", "old", 1), ("U1", "x", 2), ("U2", "old", 3), ("U2", "y", 4), ("U3", "z", 5),
            ("U1", "new", 6), ("U2", "old", 7), ("U3", "new", 8), ("U3", "x", 9), ("U1", "y", 10)]
    engaged = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")
    parts = time_split(engaged, valid_at=0.5, test_at=0.7)
    assert parts.train["timestamp"].max() < parts.test["timestamp"].min()
    assert "new" in parts.cold_items
    assert set(parts.cold_test["item_id"]) <= set(parts.cold_items)
    with pytest.raises(ValueError, match="valid_at"):
        time_split(engaged, valid_at=0.9, test_at=0.5)


def test_history_features_are_the_same_in_training_and_serving():
    frame = pl.DataFrame({"user_idx": [0, 0, 0, 1], "item_idx": [5, 6, 7, 2], "like": [0] * 4,
                          "timestamp": [3, 1, 2, 9]})
    trained = history_matrix(frame, n_users=3, length=2)
    assert trained.items[0].tolist() == [7, 5] and trained.mask[0].all()  # the two newest, oldest first
    assert trained.mask[1].tolist() == [False, True] and not trained.mask[2].any()
    index = {f"P{i}": i for i in range(10)}
    served, unknown = histories_from_ids([["P6", "P7", "P5"], ["P2"], ["nope"]], index, length=2)
    assert np.array_equal(served.items, trained.items) and np.array_equal(served.mask, trained.mask)
    assert unknown == [[], [], ["nope"]]


def test_feature_schema_hash_detects_tampering():
    schema = FeatureSchema("recipe", "tok", 32, "mean", 50, 128, 10)
    document = schema.to_json()
    assert FeatureSchema.from_json(document) == schema
    with pytest.raises(ValueError, match="hash mismatch"):
        FeatureSchema.from_json({**document, "max_seq_length": 64})


def test_each_positive_gets_its_own_users_negatives():
    rng = np.random.default_rng(1)
    pos_users = np.array([2, 0, 2, 1, 0, 2])
    pos_items = np.array([0, 1, 2, 3, 4, 5])
    samples = click_samples(pos_users, pos_items, np.zeros(6), np.array([2]), np.array([9]), np.arange(30), 30,
                            negatives=3, rng=rng)
    from recops.data.samples import negatives_by_positive

    paired = negatives_by_positive(samples, pos_users, 3)
    assert paired.shape == (6, 3)
    negatives = samples.click == 0
    for row, user in enumerate(pos_users):
        own = set(samples.items[negatives & (samples.users == user)].tolist())
        assert set(paired[row].tolist()) <= own
    # Every negative is used exactly once.
    assert sorted(paired.ravel().tolist()) == sorted(samples.items[negatives].tolist())
