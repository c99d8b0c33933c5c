"""Sessions, per-user histories and item statistics, all computed column-wise."""

from __future__ import annotations

import polars as pl

from recops.data.schema import ENGAGEMENT_EVENTS


def sessionize(events: pl.DataFrame, gap_minutes: float = 30.0) -> pl.DataFrame:
    """Add ``session_id`` (per user, from 0): a new session starts after ``gap_minutes`` of inactivity."""
    gap = int(gap_minutes * 60)
    ordered = events.sort("user_id", "timestamp", maintain_order=True)
    new_session = (pl.col("timestamp").diff().over("user_id") > gap).fill_null(False)
    return ordered.with_columns(new_session.cast(pl.Int32).cum_sum().over("user_id").alias("session_id"))


def engagements(events: pl.DataFrame) -> pl.DataFrame:
    """One row per (user, item) the user engaged with, at the first engagement's time.

    ``click`` is 1 for every row (a like, cart or purchase implies the item was
    clicked); ``like`` is 1 where the user liked the item.
    """
    return (
        events.filter(pl.col("event").is_in(ENGAGEMENT_EVENTS))
        .group_by("user_id", "item_id")
        .agg(
            pl.col("timestamp").min(),
            (pl.col("event") == "like").any().cast(pl.Int8).alias("like"),
            (pl.col("event") == "purchase").any().cast(pl.Int8).alias("purchase"),
        )
        .with_columns(pl.lit(1, dtype=pl.Int8).alias("click"))
        .sort("user_id", "timestamp", "item_id")
    )


def user_histories(events: pl.DataFrame, max_length: int = 50) -> pl.DataFrame:
    """Each user's most recent engaged items, oldest first, at most ``max_length``."""
    return (
        engagements(events)
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id").tail(max_length).alias("history"))
    )


def item_statistics(events: pl.DataFrame) -> pl.DataFrame:
    """Per item: impressions, clicks, likes, carts, purchases, revenue, CTR and first/last seen."""
    counts = [(pl.col("event") == name).sum().alias(f"{name}s") for name in ("impression", "click", "like", "cart")]
    return (
        events.group_by("item_id")
        .agg(
            *counts,
            (pl.col("event") == "purchase").sum().alias("purchases"),
            pl.col("value").filter(pl.col("event") == "purchase").sum().alias("revenue"),
            pl.col("user_id").n_unique().alias("users"),
            pl.col("timestamp").min().alias("first_seen"),
            pl.col("timestamp").max().alias("last_seen"),
        )
        .with_columns(
            pl.when(pl.col("impressions") > 0)
            .then(pl.col("clicks") / pl.col("impressions"))
            .otherwise(None)
            .alias("ctr")
        )
        .sort("item_id")
    )
