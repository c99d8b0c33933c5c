"""The indexed form of a dataset that every model trains and is evaluated on.

Raw logs (string ids, event rows) are turned into this once by
:func:`recops.data.prepare.prepare`; baselines, the two-tower model and the
evaluation all read this form and nothing else, so they see the same split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
import scipy.sparse as sp

# Columns of every interaction frame (train/valid/test/cold_test).
USER_IDX = "user_idx"
ITEM_IDX = "item_idx"
LIKE = "like"
TIMESTAMP = "timestamp"
INTERACTION_COLUMNS = (USER_IDX, ITEM_IDX, LIKE, TIMESTAMP)


def interaction_matrix(frame: pl.DataFrame, n_users: int, n_items: int) -> sp.csr_matrix:
    """Binary user × item CSR matrix of the (user_idx, item_idx) pairs in ``frame``."""
    users = frame[USER_IDX].to_numpy()
    items = frame[ITEM_IDX].to_numpy()
    data = np.ones(len(users), dtype=np.float32)
    matrix = sp.csr_matrix((data, (users, items)), shape=(n_users, n_items), dtype=np.float32)
    matrix.data[:] = 1.0  # repeated pairs count once
    return matrix


@dataclass(frozen=True)
class InteractionData:
    """A split dataset with users and items mapped to dense indices.

    ``items`` has one row per item, ordered by ``item_idx``, with at least the
    columns ``item_idx``, ``item_id`` and ``text`` (what the item tower reads).
    Interaction frames have the columns :data:`INTERACTION_COLUMNS`; ``like`` is
    0/1. Items in ``cold_items`` never occur in ``train`` or ``valid``: warm
    evaluation ranks the warm items only, cold evaluation ranks the cold items
    only, against ``cold_test``.
    """

    user_ids: list[str]
    items: pl.DataFrame
    train: pl.DataFrame
    valid: pl.DataFrame
    test: pl.DataFrame
    cold_test: pl.DataFrame
    cold_items: np.ndarray
    protocol: str
    drops: dict[str, int] = field(default_factory=dict)
    # (user_idx, item_idx) shown to the user without an engagement: click-head negatives.
    exposures: pl.DataFrame | None = None

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return self.items.height

    @property
    def item_texts(self) -> list[str]:
        return self.items["text"].to_list()

    @property
    def warm_mask(self) -> np.ndarray:
        """Boolean mask over items: True for items that may appear in training."""
        mask = np.ones(self.n_items, dtype=bool)
        mask[self.cold_items] = False
        return mask

    def matrix(self, frame: pl.DataFrame) -> sp.csr_matrix:
        """User × item CSR matrix of one of this dataset's interaction frames."""
        return interaction_matrix(frame, self.n_users, self.n_items)

    def train_matrix(self) -> sp.csr_matrix:
        return self.matrix(self.train)

    def summary(self) -> dict[str, int | str]:
        return {
            "protocol": self.protocol,
            "users": self.n_users,
            "items": self.n_items,
            "cold_items": len(self.cold_items),
            "train": self.train.height,
            "valid": self.valid.height,
            "test": self.test.height,
            "cold_test": self.cold_test.height,
        }
