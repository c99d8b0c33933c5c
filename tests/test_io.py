"""Reading event logs and catalogs: every format, every bad input named."""

from __future__ import annotations

import json

import polars as pl
import pytest

from recops.data.io import DataFormatError, read_events, read_items, resolve_uri, write_events, write_items

GOOD = {"user_id": "U1", "item_id": "P1", "event": "click", "timestamp": 1719023456, "device": "iOS14.2"}


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_round_trip_in_every_format(tmp_path, small_synthetic, suffix):
    path = tmp_path / f"events{suffix}"
    write_events(small_synthetic.events, path)
    raw = read_events(path)
    assert raw.height == small_synthetic.events.height
    assert not raw["malformed"].any()
    assert raw["user_id"].to_list() == small_synthetic.events["user_id"].to_list() or suffix == ".jsonl"
    items_path = tmp_path / f"items{suffix}"
    write_items(small_synthetic.items, items_path)
    items = read_items(items_path)
    assert items["item_id"].to_list() == small_synthetic.items["item_id"].to_list()
    assert items.schema["price"] == pl.Float64


def test_malformed_lines_are_flagged_not_lost(tmp_path):
    lines = [
        json.dumps(GOOD),
        '{"user_id": "U2", "item_id": "P1", "event": "click", "timestamp": 17',  # truncated
        "[1, 2, 3]",  # not an object
        '{"user_id": "U3", "item_id": }',  # looks like an object, is not JSON
        "",  # blank lines are not records
        json.dumps({**GOOD, "user_id": "U4", "extra": {"nested": True}}),
    ]
    raw = read_events(_write_lines(tmp_path / "e.jsonl", lines))
    assert raw.height == 5
    assert raw["malformed"].sum() == 3
    assert sorted(raw.filter(~pl.col("malformed"))["user_id"].to_list()) == ["U1", "U4"]


def test_numbers_and_strings_both_read_as_text(tmp_path):
    lines = [json.dumps({**GOOD, "item_id": 42, "timestamp": "2024-06-22T02:30:56Z"})]
    raw = read_events(_write_lines(tmp_path / "e.jsonl", lines))
    assert raw["item_id"].to_list() == ["42"]
    assert raw["timestamp"].to_list() == ["2024-06-22T02:30:56Z"]


def test_a_file_that_is_not_an_event_log_names_the_file_and_the_columns(tmp_path):
    path = _write_lines(tmp_path / "orders.jsonl", [json.dumps({"order": 1, "total": 9.5})] * 3)
    with pytest.raises(DataFormatError) as error:
        read_events(path)
    message = str(error.value)
    assert "orders.jsonl" in message and "user_id, item_id, event, timestamp" in message
    assert "order" in message  # what was found instead


def test_binary_garbage_is_refused(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(DataFormatError, match=r"e\.jsonl"):
        read_events(path)


def test_csv_missing_required_column(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("user_id,item_id,timestamp\nU1,P1,5\n")
    with pytest.raises(DataFormatError, match="event"):
        read_events(path)


@pytest.mark.parametrize(
    ("name", "match"),
    [("missing.jsonl", r"no such file"), ("events.txt", r"unknown file type"), ("empty.jsonl", r"empty")],
)
def test_unreadable_inputs_are_named(tmp_path, name, match):
    if name == "empty.jsonl":
        (tmp_path / name).write_text("")
    with pytest.raises(DataFormatError, match=match):
        read_events(tmp_path / name)


def test_catalog_that_is_an_event_log_is_refused(tmp_path):
    path = _write_lines(tmp_path / "items.jsonl", [json.dumps(GOOD)])
    with pytest.raises(DataFormatError, match="not an item catalog"):
        read_items(path)


def test_uri_schemes(monkeypatch):
    monkeypatch.setenv("RECOPS_PVC_ROOT", "/data")
    assert resolve_uri("file:///tmp/x.jsonl") == "/tmp/x.jsonl"
    assert resolve_uri("pvc://logs/2026/x.parquet") == "/data/logs/2026/x.parquet"
    assert resolve_uri("s3://bucket/x.parquet") == "s3://bucket/x.parquet"
    with pytest.raises(DataFormatError, match="unsupported URI scheme"):
        resolve_uri("ftp://host/x.jsonl")
