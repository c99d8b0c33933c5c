"""Cleaning keeps good rows and counts every drop under exactly one reason."""

from __future__ import annotations

import json

import polars as pl

from recops.api.recmodel import CleaningSpec
from recops.data.cleaning import DROP_REASONS, clean_events
from recops.data.io import read_events

CATALOG = pl.DataFrame({"item_id": ["P1", "P2"], "title": ["a", "b"], "category": ["c", "c"], "description": ["", ""]})


def _row(**fields):
    base = {"user_id": "U1", "item_id": "P1", "event": "click", "timestamp": 1_000_000, "request_id": "R1"}
    return json.dumps({**base, **fields})


def _clean(tmp_path, lines, spec=None):
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return clean_events(read_events(path), CATALOG, spec)


def test_each_reason_is_counted_once_and_counts_add_up(tmp_path):
    lines = [
        _row(),  # kept
        _row(user_id="U2", event="impression", timestamp=1_000_001),  # kept
        "{not json",  # malformed
        _row(user_id=""),  # malformed: empty user id
        _row(event="view"),  # unknown_event
        _row(timestamp="yesterday"),  # bad_timestamp
        _row(timestamp=-5),  # bad_timestamp
        _row(),  # duplicate of the first
        _row(item_id="P999"),  # unknown_item
    ]
    result = _clean(tmp_path, lines)
    assert result.drops == {
        "malformed": 2, "unknown_event": 1, "bad_timestamp": 2, "duplicate": 1,
        "unknown_item": 1, "outside_window": 0, "bot": 0,
    }
    assert result.rows_kept + sum(result.drops.values()) == result.rows_read == len(lines)
    assert set(result.drops) == set(DROP_REASONS)


def test_timestamps_in_seconds_milliseconds_and_iso(tmp_path):
    lines = [
        _row(timestamp=1_719_023_456, request_id="a"),
        _row(timestamp=1_719_023_456_000, request_id="b"),
        _row(timestamp="2024-06-22T02:30:56Z", request_id="c"),
        _row(timestamp="1719023456.7", request_id="d"),
    ]
    result = _clean(tmp_path, lines)
    assert result.events["timestamp"].to_list() == [1_719_023_456] * 4


def test_bots_are_dropped_whole(tmp_path):
    humans = [_row(user_id="U1", timestamp=1_000_000 + 120 * i, request_id=str(i)) for i in range(5)]
    bot = [_row(user_id="B", timestamp=1_000_020, request_id=f"b{i}", item_id="P2") for i in range(40)]
    result = _clean(tmp_path, humans + bot, CleaningSpec(bot_max_events_per_minute=30))
    assert result.drops["bot"] == 40
    assert set(result.events["user_id"]) == {"U1"}


def test_window(tmp_path):
    lines = [_row(timestamp=t, request_id=str(t)) for t in (100, 200, 86_400 * 3, 86_400 * 10)]
    result = _clean(tmp_path, lines, CleaningSpec(window_start=150, window_days=8))
    assert result.events["timestamp"].to_list() == [86_400 * 3, 86_400 * 10]
    assert result.drops["outside_window"] == 2


def test_synthetic_bots_and_duplicates_are_found(small_synthetic):
    result = clean_events(small_synthetic.events, small_synthetic.items)
    assert result.drops["bot"] > 0
    assert set(small_synthetic.bot_user_ids).isdisjoint(result.events["user_id"].to_list())
    assert result.drops["duplicate"] > 0
    assert result.rows_kept + sum(result.drops.values()) == small_synthetic.events.height
    assert result.events.schema["timestamp"] == pl.Int64
