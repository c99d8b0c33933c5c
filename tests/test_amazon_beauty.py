"""Amazon Beauty 5-core as recops reads it, and the leave-one-out protocol sequential recommenders report.

Files made in code for the loader's rules and refusals; the real files (../shared/data/amazon-beauty,
never committed: research-only licence) for the published counts.
"""

from __future__ import annotations

import json
import re

import polars as pl
import pytest
from pydantic import ValidationError

from recops.api.recmodel import DataSpec
from recops.data.amazon_beauty import DAY, EPOCH, load_amazon_beauty
from recops.data.io import DataFormatError
from recops.data.prepare import prepare
from recops.data.splits import leave_one_out_split


def beauty_folder(tmp_path, sequences: str, ids: dict | str | None = None, titles: str | None = None):
    (tmp_path / "user_sequence.txt").write_text(sequences)
    ids = {"B1": 1, "B2": 2, "B3": 3, "B4": 4, "B5": 5} if ids is None else ids
    (tmp_path / "item_id_to_int.json").write_text(ids if isinstance(ids, str) else json.dumps(ids))
    (tmp_path / "products_lookup.csv").write_text(
        titles if titles is not None else ',global_product_id,name\n0,1,"Rose Lip Balm, 2 pack"\n1,2,Shampoo\n'
        "2,3,Conditioner\n3,4,Nail Polish\n")
    return tmp_path


def test_each_review_is_a_click_a_day_after_the_users_previous_one(tmp_path):
    folder = beauty_folder(tmp_path, "U1 B3 B1 B2 B4 B5\nU2 B2 B1 B3 B5 B4\n")
    events, items = load_amazon_beauty(folder)
    first = events.filter(pl.col("user_id") == "U1")
    assert first["item_id"].to_list() == ["B3", "B1", "B2", "B4", "B5"]  # the file's order is kept
    assert first["timestamp"].to_list() == [EPOCH + DAY * n for n in range(5)]
    assert set(events["event"]) == {"click"} and events.height == 10
    titles = dict(zip(items["item_id"], items["title"], strict=True))
    assert titles == {"B1": "Rose Lip Balm, 2 pack", "B2": "Shampoo", "B3": "Conditioner", "B4": "Nail Polish",
                      "B5": ""}  # a product without a title reads as empty text, not as missing


@pytest.mark.parametrize(("sequences", "ids", "titles", "message"), [
    ("U1 B1 B9\n", None, None, "1 products not in item_id_to_int.json, e.g. 'B9'"),
    ("U1 B1 B2\nU2\n", None, None, "user_sequence.txt:2: a user with no items"),
    ("", None, None, "no user sequences"),
    ("U1 B1\n", "{not json", None, "item_id_to_int.json: not JSON"),
    ("U1 B1\n", {"B1": "one"}, None, "expected an object of ASIN → integer product id"),
    ("U1 B1\n", None, "id,title\n1,x\n", "expected columns global_product_id and name"),
])
def test_malformed_files_are_refused_naming_the_file_and_the_fault(tmp_path, sequences, ids, titles, message):
    with pytest.raises(DataFormatError, match=re.escape(message)):
        load_amazon_beauty(beauty_folder(tmp_path, sequences, ids, titles))


def test_a_missing_file_is_named(tmp_path):
    beauty_folder(tmp_path, "U1 B1\n")
    (tmp_path / "products_lookup.csv").unlink()
    with pytest.raises(DataFormatError, match=re.escape("products_lookup.csv: missing")):
        load_amazon_beauty(tmp_path)


def test_leave_one_out_holds_out_each_users_last_two_engagements():
    frame = pl.DataFrame({
        "user_id": ["a"] * 5 + ["b"] * 2 + ["c"] * 3,
        "item_id": ["i1", "i2", "i3", "i4", "i5", "i1", "i2", "i9", "i8", "i7"],
        "timestamp": [5, 1, 2, 3, 4, 1, 2, 7, 7, 1],  # c's last two tie in time: the item id orders them
    })
    parts = leave_one_out_split(frame)
    by_user = {name: {u: sorted(g["item_id"]) for (u,), g in part.group_by("user_id")}
               for name, part in (("train", parts.train), ("valid", parts.valid), ("test", parts.test))}
    assert by_user["test"] == {"a": ["i1"], "c": ["i9"]}
    assert by_user["valid"] == {"a": ["i5"], "c": ["i8"]}
    assert by_user["train"] == {"a": ["i2", "i3", "i4"], "b": ["i1", "i2"], "c": ["i7"]}  # b: too few to hold out
    assert parts.cold_items == [] and parts.cold_test.height == 0


def test_the_spec_names_the_folder_and_refuses_a_time_split():
    with pytest.raises(ValidationError, match="needs 'amazonBeautyDir'"):
        DataSpec(source="amazon-beauty", split="loo")
    with pytest.raises(ValidationError, match="no timestamps, only each user's order"):
        DataSpec(source="amazon-beauty", amazon_beauty_dir="/data")


def test_the_real_files_give_the_published_counts_and_one_test_item_per_user(amazon_beauty):
    events, items = load_amazon_beauty(amazon_beauty)
    assert (events.height, events["user_id"].n_unique(), items.height) == (198_502, 22_363, 12_101)
    assert (items["title"] == "").sum() == 7  # as the dataset's README says
    data = prepare(DataSpec(source="amazon-beauty", amazon_beauty_dir=str(amazon_beauty), split="loo"))
    assert data.summary() | {"train": None} == {"protocol": "loo", "users": 22_363, "items": 12_101,
                                                 "cold_items": 0, "train": None, "valid": 22_363,
                                                 "test": 22_363, "cold_test": 0}
    assert data.train.height == 198_502 - 2 * 22_363  # 5-core: every user has a valid and a test item
    last = data.test.join(data.train, on="user_idx", suffix="_train").filter(
        pl.col("timestamp_train") >= pl.col("timestamp"))
    assert last.height == 0  # the test item is each user's latest
