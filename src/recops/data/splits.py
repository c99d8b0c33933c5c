"""Train/valid/test splits: by time, and RecBole's random-ordered 8:1:1 per user."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl


@dataclass(frozen=True)
class SplitFrames:
    """Engagement rows split three ways, plus the rows on cold items and the cold item ids."""

    train: pl.DataFrame
    valid: pl.DataFrame
    test: pl.DataFrame
    cold_test: pl.DataFrame
    cold_items: list[str]
    dropped_cold_valid: int = 0


def recbole_split_sizes(total: int, ratios: tuple[float, ...]) -> list[int]:
    """Group sizes exactly as RecBole's ``_calcu_split_ids`` computes them for one user."""
    counts = [int(r * total) for r in ratios]
    counts[0] = total - sum(counts[1:])
    for i in range(1, len(ratios)):
        if counts[0] <= 1:
            break
        if 0 < ratios[-i] * total < 1:
            counts[-i] += 1
            counts[0] -= 1
    return counts


def _user_bounds(frame: pl.DataFrame, ratios: tuple[float, float, float]) -> pl.DataFrame:
    """Per user: the position where train ends and where valid ends."""
    sizes = frame.group_by("user_id").len()
    bounds = np.array([recbole_split_sizes(int(n), ratios) for n in sizes["len"].to_list()], dtype=np.int64)
    return sizes.with_columns(
        pl.Series("train_end", bounds[:, 0]), pl.Series("valid_end", bounds[:, 0] + bounds[:, 1])
    ).drop("len")


def recbole_split(
    engagements: pl.DataFrame,
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    cold_item_fraction: float = 0.0,
) -> SplitFrames:
    """RecBole's ``RS [0.8,0.1,0.1]`` with ``order: RO``, grouped by user.

    Each user's engagements are shuffled (seeded) and cut into train/valid/test.
    With ``cold_item_fraction``, that fraction of items is first held out
    entirely: their rows form ``cold_test`` and never reach training.
    """
    rng = np.random.default_rng(seed)
    items = engagements["item_id"].unique().sort()
    n_cold = round(cold_item_fraction * len(items))
    cold = sorted(rng.choice(items.to_numpy(), size=n_cold, replace=False).tolist()) if n_cold else []
    is_cold = pl.col("item_id").is_in(pl.Series(cold, dtype=pl.String).implode())
    cold_rows = engagements.filter(is_cold)
    warm = engagements.filter(~is_cold)
    shuffled = warm.with_columns(pl.Series("_order", rng.permutation(warm.height))).sort("user_id", "_order")
    bounds = _user_bounds(shuffled, ratios)
    ranked = shuffled.with_columns(pl.int_range(pl.len()).over("user_id").alias("_pos")).join(
        bounds, on="user_id", how="left"
    )
    part = (
        pl.when(pl.col("_pos") < pl.col("train_end"))
        .then(0)
        .when(pl.col("_pos") < pl.col("valid_end"))
        .then(1)
        .otherwise(2)
    )
    ranked = ranked.with_columns(part.alias("_part"))
    columns = engagements.columns
    return SplitFrames(
        train=ranked.filter(pl.col("_part") == 0).select(columns),
        valid=ranked.filter(pl.col("_part") == 1).select(columns),
        test=ranked.filter(pl.col("_part") == 2).select(columns),
        cold_test=cold_rows,
        cold_items=cold,
    )


def time_split(engagements: pl.DataFrame, valid_at: float = 0.8, test_at: float = 0.9) -> SplitFrames:
    """Global cut by time at the ``valid_at`` and ``test_at`` quantiles of the timeline.

    Items never engaged with before the first cut are cold: their test rows form
    ``cold_test``, their valid rows are dropped (counted in ``dropped_cold_valid``).
    """
    if not 0 < valid_at < test_at < 1:
        raise ValueError(f"need 0 < valid_at < test_at < 1, got {valid_at}, {test_at}")
    t_valid = engagements["timestamp"].quantile(valid_at, interpolation="lower")
    t_test = engagements["timestamp"].quantile(test_at, interpolation="lower")
    train = engagements.filter(pl.col("timestamp") < t_valid)
    warm_items = train["item_id"].unique()
    is_warm = pl.col("item_id").is_in(warm_items.implode())
    valid_all = engagements.filter((pl.col("timestamp") >= t_valid) & (pl.col("timestamp") < t_test))
    test_all = engagements.filter(pl.col("timestamp") >= t_test)
    valid = valid_all.filter(is_warm)
    cold_test = test_all.filter(~is_warm)
    cold_items = sorted(set(cold_test["item_id"].to_list()) | set(valid_all.filter(~is_warm)["item_id"].to_list()))
    return SplitFrames(
        train=train,
        valid=valid,
        test=test_all.filter(is_warm),
        cold_test=cold_test,
        cold_items=cold_items,
        dropped_cold_valid=valid_all.height - valid.height,
    )


def leave_one_out_split(engagements: pl.DataFrame) -> SplitFrames:
    """Leave-one-out, as sequential recommenders report: per user, the last engagement is test, the one
    before it valid, the rest train (users with fewer than three engage in train only, as SASRec's code
    does). Order is each user's time order, ties broken by item id. No item is cold: every split is warm.
    """
    ordered = engagements.sort("user_id", "timestamp", "item_id")
    ranked = ordered.with_columns(
        (pl.len().over("user_id") - 1 - pl.int_range(pl.len()).over("user_id")).alias("_from_end"),
        pl.len().over("user_id").alias("_n"),
    )
    held_out = pl.col("_n") >= 3
    columns = engagements.columns
    return SplitFrames(
        train=ranked.filter(~held_out | (pl.col("_from_end") >= 2)).select(columns),
        valid=ranked.filter(held_out & (pl.col("_from_end") == 1)).select(columns),
        test=ranked.filter(held_out & (pl.col("_from_end") == 0)).select(columns),
        cold_test=ordered.clear(),
        cold_items=[],
    )
