"""Column names and types of the two input contracts: the event log and the item catalog."""

from __future__ import annotations

import polars as pl

EVENT_TYPES = ("impression", "click", "like", "cart", "purchase")
# Events that show the user engaged with the item: they build histories and positives.
ENGAGEMENT_EVENTS = ("click", "like", "cart", "purchase")

REQUIRED_EVENT_COLUMNS = ("user_id", "item_id", "event", "timestamp")
OPTIONAL_EVENT_COLUMNS = ("device", "request_id", "value")

EVENT_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.String(),
    "item_id": pl.String(),
    "event": pl.String(),
    "timestamp": pl.Int64(),
    "device": pl.String(),
    "request_id": pl.String(),
    "value": pl.Float64(),
}

REQUIRED_ITEM_COLUMNS = ("item_id", "title", "category", "description")
OPTIONAL_ITEM_COLUMNS = ("price", "created_at")

ITEM_SCHEMA: dict[str, pl.DataType] = {
    "item_id": pl.String(),
    "title": pl.String(),
    "category": pl.String(),
    "description": pl.String(),
    "price": pl.Float64(),
    "created_at": pl.Int64(),
}


def item_text(items: pl.DataFrame) -> pl.Series:
    """The text the item tower reads: title, category and description.

    Training and serving both call this, so a catalog change cannot make the two
    read different text for the same item.
    """
    return items.select(
        pl.concat_str(
            [
                pl.col("title").fill_null(""),
                pl.lit(" | "),
                pl.col("category").fill_null(""),
                pl.lit(" | "),
                pl.col("description").fill_null(""),
            ]
        )
        .str.strip_chars(" |")
        .alias("text")
    )["text"]
