"""MovieLens-100K from its original files (u.data, u.item) as an event log and a catalog.

Every rating is a click; a rating of 4 or 5 is also a like. Item text is the
title plus the genres. The files are never shipped with recops (their licence
forbids redistribution): point ``--data-dir`` at a copy.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recops.data.io import DataFormatError

GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
LIKE_RATING = 4


def _require(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise DataFormatError(f"{path}: missing; expected the MovieLens-100K folder with u.data and u.item")
    return path


def load_movielens(folder: str | Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Return ``(events, items)`` in recops' schemas from an ML-100K folder."""
    folder = Path(folder)
    ratings = pl.read_csv(
        _require(folder, "u.data"),
        separator="\t",
        has_header=False,
        new_columns=["user", "item", "rating", "timestamp"],
        schema_overrides={"user": pl.Int64, "item": pl.Int64, "rating": pl.Int64, "timestamp": pl.Int64},
    )
    item_columns = ["item", "title", "release", "video", "url", *GENRES]
    catalog = pl.read_csv(
        _require(folder, "u.item"),
        separator="|",
        has_header=False,
        new_columns=item_columns,
        encoding="latin1",
        quote_char=None,
        infer_schema=False,
    )
    genre_names = pl.concat_list(
        [pl.when(pl.col(g) == "1").then(pl.lit(g)).otherwise(None) for g in GENRES]
    ).list.drop_nulls()
    items = catalog.select(
        pl.col("item").alias("item_id"),
        pl.col("title").fill_null(""),
        genre_names.list.join(", ").alias("category"),
        pl.lit("").alias("description"),
        pl.lit(None, dtype=pl.Float64).alias("price"),
        pl.coalesce(  # the original files say 01-Jan-1995, some copies 01-01-1995
            pl.col("release").str.to_date(fmt, strict=False) for fmt in ("%d-%b-%Y", "%d-%m-%Y")
        )
        .cast(pl.Datetime("ms"))
        .dt.epoch("s")
        .alias("created_at"),
    )
    base = ratings.select(
        pl.col("user").cast(pl.String).alias("user_id"),
        pl.col("item").cast(pl.String).alias("item_id"),
        pl.col("timestamp"),
        pl.col("rating"),
    )
    clicks = base.with_columns(pl.lit("click").alias("event"))
    likes = base.filter(pl.col("rating") >= LIKE_RATING).with_columns(pl.lit("like").alias("event"))
    events = (
        pl.concat([clicks, likes])
        .select(
            "user_id",
            "item_id",
            "event",
            "timestamp",
            pl.lit(None, dtype=pl.String).alias("device"),
            pl.lit(None, dtype=pl.String).alias("request_id"),
            pl.lit(None, dtype=pl.Float64).alias("value"),
        )
        .sort("user_id", "timestamp")
    )
    return events, items
