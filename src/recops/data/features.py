"""The feature code path shared by training and serving, and the schema that pins it.

Training builds user histories with :func:`history_matrix`; serving builds the
same tensors from request item ids with :func:`histories_from_ids`. The
:class:`FeatureSchema` written next to a model records every choice that shapes
features; serving recomputes its hash and refuses to start on a mismatch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl

from recops.data.interactions import ITEM_IDX, TIMESTAMP, USER_IDX

FEATURE_SCHEMA_VERSION = 1
# How item text is assembled; recops.data.schema.item_text implements it.
ITEM_TEXT_RECIPE = "title | category | description (stripped of empty parts)"


@dataclass(frozen=True)
class FeatureSchema:
    """Every choice that shapes a model's inputs."""

    item_text_recipe: str
    tokenizer: str
    max_seq_length: int
    pooling: str
    history_length: int
    embedding_dim: int
    n_items: int
    version: int = FEATURE_SCHEMA_VERSION

    def digest(self) -> str:
        """sha256 of the schema's canonical JSON."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def to_json(self) -> dict:
        return {**asdict(self), "hash": self.digest()}

    @classmethod
    def from_json(cls, document: Mapping) -> FeatureSchema:
        """Read a schema back, checking the stored hash against a fresh one."""
        fields = {k: v for k, v in document.items() if k != "hash"}
        schema = cls(**fields)
        if document.get("hash") != schema.digest():
            raise ValueError(
                f"feature schema hash mismatch: file says {document.get('hash')}, contents hash to {schema.digest()}"
            )
        return schema


@dataclass(frozen=True)
class Histories:
    """Padded history item indices (B × L, most recent last) and their validity mask."""

    items: np.ndarray
    mask: np.ndarray


def history_matrix(frame: pl.DataFrame, n_users: int, length: int) -> Histories:
    """Each user's ``length`` most recent items from an interaction frame, oldest first."""
    recent = (
        frame.sort(USER_IDX, TIMESTAMP, ITEM_IDX)
        .with_columns((pl.len().over(USER_IDX) - pl.int_range(pl.len()).over(USER_IDX)).alias("_from_end"))
        .filter(pl.col("_from_end") <= length)
    )
    items = np.zeros((n_users, length), dtype=np.int64)
    mask = np.zeros((n_users, length), dtype=bool)
    users = recent[USER_IDX].to_numpy()
    # Right-align: the newest item sits in the last column for every user.
    column = length - recent["_from_end"].to_numpy()
    items[users, column] = recent[ITEM_IDX].to_numpy()
    mask[users, column] = True
    return Histories(items, mask)


@dataclass(frozen=True)
class Sequences:
    """Each user's newest training items, laid out as :func:`history_matrix` lays them out (left-padded,
    newest last), with each entry's row in the frame: what the sequence objective trains on (the entry at
    column t + 1 is the target of the history up to column t)."""

    items: np.ndarray  # int64 [users, length]
    mask: np.ndarray  # bool [users, length]
    rows: np.ndarray  # int64 [users, length]: the entry's row in the frame, -1 for padding
    lengths: np.ndarray  # int64 [users]: entries per user

    def trainable(self) -> np.ndarray:
        """Users with a target: two entries or more."""
        return np.flatnonzero(self.lengths >= 2)


def sequence_matrix(frame: pl.DataFrame, n_users: int, length: int) -> Sequences:
    """:class:`Sequences` of each user's ``length`` newest rows of ``frame``."""
    histories = history_matrix(frame, n_users, length)
    columns = history_columns(frame, length)
    rows = np.full((n_users, length), -1, dtype=np.int64)
    kept = np.flatnonzero(columns >= 0)
    rows[frame[USER_IDX].to_numpy()[kept], columns[kept]] = kept
    return Sequences(histories.items, histories.mask, rows, histories.mask.sum(axis=1))


def history_columns(frame: pl.DataFrame, length: int) -> np.ndarray:
    """Each row's column in :func:`history_matrix` of the same frame (-1: older than its ``length`` items).

    What a next-item sample needs: the entries left of its target's column are what came before it.
    """
    ranked = (
        frame.with_row_index("_row")
        .sort(USER_IDX, TIMESTAMP, ITEM_IDX)
        .with_columns((pl.len().over(USER_IDX) - pl.int_range(pl.len()).over(USER_IDX)).alias("_from_end"))
    )
    from_end = ranked["_from_end"].to_numpy()
    columns = np.empty(frame.height, dtype=np.int64)
    columns[ranked["_row"].to_numpy()] = np.where(from_end <= length, length - from_end, -1)
    return columns


def histories_from_ids(
    histories: Sequence[Sequence[str]], item_index: Mapping[str, int], length: int
) -> tuple[Histories, list[list[str]]]:
    """Request histories (item ids, oldest first) to padded indices; also the unknown ids per row."""
    items = np.zeros((len(histories), length), dtype=np.int64)
    mask = np.zeros((len(histories), length), dtype=bool)
    unknown: list[list[str]] = []
    for row, history in enumerate(histories):
        known = [item_index[i] for i in history if i in item_index]
        unknown.append([i for i in history if i not in item_index])
        recent = known[-length:]
        if recent:
            items[row, length - len(recent) :] = recent
            mask[row, length - len(recent) :] = True
    return Histories(items, mask), unknown
