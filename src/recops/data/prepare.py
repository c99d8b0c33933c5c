"""From a DataSpec to the indexed, split dataset every model trains on.

``load_logs`` reads (or generates) the events and the catalog and cleans them;
``index_logs`` turns engagements into dense indices and splits them.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from recops.api.recmodel import DataSpec
from recops.data.cleaning import CleanResult, clean_events
from recops.data.interactions import InteractionData
from recops.data.io import read_events, read_items, typed_items
from recops.data.schema import item_text
from recops.data.sessions import engagements
from recops.data.splits import SplitFrames, leave_one_out_split, recbole_split, time_split


@dataclass(frozen=True)
class CleanLogs:
    """Cleaned events, the catalog, and what cleaning dropped."""

    events: pl.DataFrame
    items: pl.DataFrame
    drops: dict[str, int]
    rows_read: int


def load_logs(spec: DataSpec) -> CleanLogs:
    """Read the spec's source and clean it (every drop counted)."""
    raw_events, items = source_logs(spec)
    result: CleanResult = clean_events(raw_events, items, spec.cleaning)
    return CleanLogs(events=result.events, items=items, drops=result.drops, rows_read=result.rows_read)


def source_logs(spec: DataSpec) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The spec's raw events (not yet cleaned) and its item catalog."""
    if spec.source == "synthetic":
        from recops.data.synthetic import SyntheticConfig, generate

        synthetic = spec.synthetic
        dataset = generate(
            SyntheticConfig(n_users=synthetic.users, n_items=synthetic.items, days=synthetic.days, seed=synthetic.seed)
        )
        raw_events, items = dataset.events, typed_items(dataset.items)
    elif spec.source == "movielens":
        from recops.data.movielens import load_movielens

        assert spec.movielens_dir is not None  # the spec validator guarantees it
        raw_events, items = load_movielens(spec.movielens_dir)
    elif spec.source == "amazon-beauty":
        from recops.data.amazon_beauty import load_amazon_beauty

        assert spec.amazon_beauty_dir is not None  # the spec validator guarantees it
        raw_events, items = load_amazon_beauty(spec.amazon_beauty_dir)
    else:
        assert spec.events is not None and spec.items is not None
        items = read_items(spec.items)
        raw_events = read_events(spec.events)
    return raw_events, items


def _indexed(frame: pl.DataFrame, users: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    return (
        frame.join(users, on="user_id", how="inner")
        .join(items.select("item_id", "item_idx"), on="item_id", how="inner")
        .select(
            pl.col("user_idx").cast(pl.Int64),
            pl.col("item_idx").cast(pl.Int64),
            pl.col("like").cast(pl.Int8),
            pl.col("timestamp").cast(pl.Int64),
        )
    )


def index_logs(
    logs: CleanLogs, split: str = "time", seed: int = 0, cold_item_fraction: float = 0.05
) -> InteractionData:
    """Engagements → dense indices → train/valid/test (+ cold) frames."""
    engaged = engagements(logs.events)
    if engaged.height == 0:
        raise ValueError("no engagement events (click, like, cart, purchase) left after cleaning")
    if split == "recbole":
        parts: SplitFrames = recbole_split(engaged, seed=seed, cold_item_fraction=cold_item_fraction)
        exposure_before = None
    elif split == "time":
        parts = time_split(engaged)
        exposure_before = parts.valid["timestamp"].min() if parts.valid.height else None
    elif split == "loo":
        parts = leave_one_out_split(engaged)
        exposure_before = None
    else:
        raise ValueError(f"unknown split {split!r}: expected 'time', 'recbole' or 'loo'")

    items = logs.items.with_columns(item_text(logs.items).alias("text")).with_row_index("item_idx")
    users = engaged.select("user_id").unique().sort("user_id").with_row_index("user_idx")
    is_cold = pl.col("item_id").is_in(pl.Series(parts.cold_items, dtype=pl.String).implode())
    cold = items.filter(is_cold)

    impressions = logs.events.filter(pl.col("event") == "impression")
    if exposure_before is not None:
        impressions = impressions.filter(pl.col("timestamp") < exposure_before)
    exposures = (
        impressions.join(engaged.select("user_id", "item_id"), on=["user_id", "item_id"], how="anti")
        .filter(~is_cold)
        .with_columns(pl.lit(0, dtype=pl.Int8).alias("like"))
    )
    drops = dict(logs.drops)
    if parts.dropped_cold_valid:
        drops["cold_valid_not_evaluated"] = parts.dropped_cold_valid
    return InteractionData(
        user_ids=users["user_id"].to_list(),
        items=items.with_columns(pl.col("item_idx").cast(pl.Int64)),
        train=_indexed(parts.train, users, items),
        valid=_indexed(parts.valid, users, items),
        test=_indexed(parts.test, users, items),
        cold_test=_indexed(parts.cold_test, users, items),
        cold_items=cold["item_idx"].cast(pl.Int64).to_numpy(),
        protocol=split,
        drops=drops,
        exposures=_indexed(exposures, users, items).select("user_idx", "item_idx").unique(),
    )


def prepare(spec: DataSpec, seed: int = 0) -> InteractionData:
    """Load, clean, index and split the data a spec names."""
    return index_logs(load_logs(spec), split=spec.split, seed=seed, cold_item_fraction=spec.cold_item_fraction)

