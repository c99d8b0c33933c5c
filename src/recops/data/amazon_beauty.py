"""Amazon Beauty 5-core (with product titles) from its three files, as an event log and a catalog.

The benchmark sequential recommenders are judged on (SASRec, TIGER, P5...): ``user_sequence.txt`` has one
user a line, ``USER_ID ITEM ITEM ...``, the user's reviewed products oldest first; ``item_id_to_int.json``
maps each product (ASIN) to a global id and ``products_lookup.csv`` that id to its title.

Every review is a click; there are no ratings, likes, prices or descriptions, so an item's text is its
title alone. The files carry no timestamps, only each user's order: a user's n-th review is dated
``EPOCH`` + n days (a day apart, so that cleaning's per-minute bot check never fires). The order within
a user is therefore exact, and there is no global time: split it per user (``split: loo`` or
``recbole``), never by ``time``. The files are never
shipped with recops (their licence forbids redistribution): point ``amazonBeautyDir`` at a copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from recops.data.io import DataFormatError

SEQUENCES, ITEM_IDS, TITLES = "user_sequence.txt", "item_id_to_int.json", "products_lookup.csv"
EPOCH = 1_388_534_400  # 2014-01-01 UTC, the data's release year: every user's first review
DAY = 86_400


def _require(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise DataFormatError(f"{path}: missing; expected the Amazon Beauty folder with {SEQUENCES}, {ITEM_IDS} "
                              f"and {TITLES}")
    return path


def read_sequences(path: Path) -> pl.DataFrame:
    """``user_id, item_id, timestamp`` (``EPOCH`` + the position in the user's sequence, in days)."""
    users, items, positions = [], [], []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise DataFormatError(f"{path}:{number}: a user with no items ({line.strip()!r})")
            user, sequence = fields[0], fields[1:]
            users.extend([user] * len(sequence))
            items.extend(sequence)
            positions.extend(range(EPOCH, EPOCH + DAY * len(sequence), DAY))
    if not users:
        raise DataFormatError(f"{path}: no user sequences")
    return pl.DataFrame({"user_id": users, "item_id": items, "timestamp": positions},
                        schema={"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64})


def read_titles(folder: Path) -> pl.DataFrame:
    """``item_id, title`` for every product of ``item_id_to_int.json`` (an empty title where none is known)."""
    try:
        ids = json.loads(_require(folder, ITEM_IDS).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{folder / ITEM_IDS}: not JSON ({error})") from None
    if not isinstance(ids, dict) or not all(isinstance(v, int) for v in ids.values()):
        raise DataFormatError(f"{folder / ITEM_IDS}: expected an object of ASIN → integer product id")
    products = pl.DataFrame({"item_id": list(ids), "product": list(ids.values())},
                            schema={"item_id": pl.String, "product": pl.Int64})
    lookup = pl.read_csv(_require(folder, TITLES), infer_schema=False)
    if "global_product_id" not in lookup.columns or "name" not in lookup.columns:
        raise DataFormatError(f"{folder / TITLES}: expected columns global_product_id and name, got {lookup.columns}")
    titles = lookup.select(pl.col("global_product_id").cast(pl.Int64).alias("product"), pl.col("name").alias("title"))
    return products.join(titles.unique("product", keep="first"), on="product", how="left").select(
        "item_id", pl.col("title").fill_null(""))


def load_amazon_beauty(folder: str | Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Return ``(events, items)`` in recops' schemas from an Amazon Beauty folder."""
    folder = Path(folder)
    sequences = read_sequences(_require(folder, SEQUENCES))
    items = read_titles(folder)
    unknown = sequences.join(items, on="item_id", how="anti")["item_id"].unique()
    if len(unknown):
        raise DataFormatError(f"{folder / SEQUENCES}: {len(unknown)} products not in {ITEM_IDS}, e.g. {unknown[0]!r}")
    events = sequences.select(
        "user_id", "item_id", pl.lit("click").alias("event"), "timestamp",
        pl.lit(None, dtype=pl.String).alias("device"), pl.lit(None, dtype=pl.String).alias("request_id"),
        pl.lit(None, dtype=pl.Float64).alias("value"),
    )
    catalog = items.select(
        "item_id", "title", pl.lit("").alias("category"), pl.lit("").alias("description"),
        pl.lit(None, dtype=pl.Float64).alias("price"), pl.lit(None, dtype=pl.Int64).alias("created_at"),
    )
    return events, catalog
