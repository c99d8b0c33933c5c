"""Most-popular baseline: every user gets the items ranked by train interaction count."""

from __future__ import annotations

import numpy as np

from recops.data.interactions import ITEM_IDX, InteractionData
from recops.models.baselines.base import Recommender


class Popularity(Recommender):
    """Scores each item by its number of train interactions, the same for every user."""

    name = "pop"

    def __init__(self) -> None:
        super().__init__()
        self._counts: np.ndarray | None = None

    def _fit(self, data: InteractionData) -> None:
        items = data.train[ITEM_IDX].to_numpy()
        self._counts = np.bincount(items, minlength=data.n_items).astype(np.float32)

    def _score(self, users: np.ndarray) -> np.ndarray:
        assert self._counts is not None
        return np.tile(self._counts, (users.size, 1))
