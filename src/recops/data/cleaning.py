"""Cleaning: typed events out, and a count for every row that was dropped and why.

Each row is dropped for the first reason that applies, in the order of
:data:`DROP_REASONS`, so the counts add up to the rows that were read.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from recops.api.recmodel import CleaningSpec
from recops.data.schema import EVENT_SCHEMA, EVENT_TYPES

DROP_REASONS = (
    "malformed",  # line not parseable, or user_id/item_id/event missing
    "unknown_event",  # event not one of EVENT_TYPES
    "bad_timestamp",  # missing, unparseable or not positive
    "duplicate",  # same user, item, event, timestamp and request as an earlier row
    "unknown_item",  # item_id not in the catalog
    "outside_window",  # outside windowStart/windowEnd/windowDays
    "bot",  # the user's event rate in some minute is above the limit
)

# Timestamps above this are taken to be milliseconds (1e11 s is the year 5138).
_MILLISECONDS_ABOVE = 100_000_000_000


@dataclass(frozen=True)
class CleanResult:
    """The kept events (typed, sorted by user and time) and the drops per reason."""

    events: pl.DataFrame
    drops: dict[str, int]
    rows_read: int

    @property
    def rows_kept(self) -> int:
        return self.events.height


def _parsed_timestamp(raw: pl.Series) -> pl.Series:
    """Seconds since the epoch from integers, floats, milliseconds or ISO-8601 strings; null if none fits."""
    if raw.dtype.is_integer():
        seconds = raw
    else:
        text = raw.cast(pl.String).str.strip_chars()
        seconds = text.cast(pl.Float64, strict=False)
        # ISO parsing is slow, so only the rows that are not numbers go through it.
        not_numeric = seconds.is_null() & text.is_not_null()
        if not_numeric.any():
            iso = text.filter(not_numeric).str.to_datetime(strict=False, time_zone="UTC").dt.epoch("s")
            seconds = seconds.scatter(not_numeric.arg_true(), iso.cast(pl.Float64))
        seconds = seconds.floor().cast(pl.Int64, strict=False)
    return pl.select(
        pl.when(seconds > _MILLISECONDS_ABOVE).then(seconds // 1000).otherwise(seconds).alias("timestamp")
    ).to_series()


def _typed(raw: pl.DataFrame) -> pl.DataFrame:
    frame = raw
    for column in EVENT_SCHEMA:
        if column not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=pl.String).alias(column))
    if "malformed" not in frame.columns:
        frame = frame.with_columns(pl.lit(False).alias("malformed"))
    return frame.with_columns(
        pl.col("user_id").cast(pl.String).str.strip_chars(),
        pl.col("item_id").cast(pl.String).str.strip_chars(),
        pl.col("event").cast(pl.String).str.strip_chars().str.to_lowercase(),
        _parsed_timestamp(frame["timestamp"]),
        pl.col("device").cast(pl.String),
        pl.col("request_id").cast(pl.String),
        pl.col("value").cast(pl.Float64, strict=False),
    )


def _first_reason(frame: pl.DataFrame, catalog: pl.Series | None, spec: CleaningSpec) -> pl.DataFrame:
    """Add a ``reason`` column: the first drop reason of each row, null for kept rows."""
    missing_field = pl.any_horizontal(
        pl.col(c).is_null() | (pl.col(c).str.len_chars() == 0) for c in ("user_id", "item_id", "event")
    )
    conditions: list[tuple[str, pl.Expr]] = [
        ("malformed", pl.col("malformed") | missing_field),
        ("unknown_event", ~pl.col("event").is_in(EVENT_TYPES)),
        ("bad_timestamp", pl.col("timestamp").is_null() | (pl.col("timestamp") <= 0)),
    ]
    reason = pl.lit(None, dtype=pl.String)
    for name, condition in reversed(conditions):
        reason = pl.when(condition).then(pl.lit(name)).otherwise(reason)
    frame = frame.with_columns(reason.alias("reason"))

    # Every row after the first of its (user, item, event, time, request) group is a duplicate.
    duplicate = pl.col("reason").is_null() & ~pl.struct(
        "user_id", "item_id", "event", "timestamp", "request_id"
    ).is_first_distinct()
    frame = frame.with_columns(pl.when(duplicate).then(pl.lit("duplicate")).otherwise("reason").alias("reason"))

    if catalog is not None:
        unknown = pl.col("reason").is_null() & ~pl.col("item_id").is_in(catalog.implode())
        frame = frame.with_columns(pl.when(unknown).then(pl.lit("unknown_item")).otherwise("reason").alias("reason"))

    frame = frame.with_columns(
        pl.when(pl.col("reason").is_null() & ~_inside_window(frame, spec))
        .then(pl.lit("outside_window"))
        .otherwise("reason")
        .alias("reason")
    )

    bots = (
        frame.filter(pl.col("reason").is_null())
        .group_by("user_id", pl.col("timestamp") // 60)
        .len()
        .filter(pl.col("len") > spec.bot_max_events_per_minute)["user_id"]
        .unique()
    )
    return frame.with_columns(
        pl.when(pl.col("reason").is_null() & pl.col("user_id").is_in(bots.implode()))
        .then(pl.lit("bot"))
        .otherwise("reason")
        .alias("reason")
    )


def _inside_window(frame: pl.DataFrame, spec: CleaningSpec) -> pl.Expr:
    inside = pl.lit(True)
    if spec.window_start is not None:
        inside = inside & (pl.col("timestamp") >= spec.window_start)
    if spec.window_end is not None:
        inside = inside & (pl.col("timestamp") < spec.window_end)
    if spec.window_days is not None:
        candidates = frame.filter(pl.col("reason").is_null())
        if spec.window_end is not None:
            candidates = candidates.filter(pl.col("timestamp") < spec.window_end)
        newest = candidates["timestamp"].max()
        if newest is not None:
            inside = inside & (pl.col("timestamp") > newest - int(spec.window_days * 86400))
    return inside


def clean_events(
    raw: pl.DataFrame, items: pl.DataFrame | None = None, spec: CleaningSpec | None = None
) -> CleanResult:
    """Type, validate and de-duplicate raw events; count every dropped row by reason.

    ``raw`` is what :func:`recops.data.io.read_events` returns (strings and a
    ``malformed`` flag) or an already typed frame. With ``items``, events on
    items missing from the catalog are dropped as ``unknown_item``.
    """
    spec = spec or CleaningSpec()
    frame = _first_reason(_typed(raw), items["item_id"] if items is not None else None, spec)
    counts = dict(frame.group_by("reason").len().iter_rows())
    drops = {reason: int(counts.get(reason, 0)) for reason in DROP_REASONS}
    kept = (
        frame.filter(pl.col("reason").is_null())
        .select(list(EVENT_SCHEMA))
        .sort("user_id", "timestamp", maintain_order=True)
    )
    return CleanResult(events=kept, drops=drops, rows_read=raw.height)
