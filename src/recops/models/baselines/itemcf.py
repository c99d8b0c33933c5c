"""Item-based collaborative filtering with sparse cosine similarity."""

from __future__ import annotations

import numpy as np
import polars as pl
import scipy.sparse as sp

from recops.data.interactions import InteractionData
from recops.models.baselines.base import Recommender
from recops.models.neighbours import cosine_neighbours, top_k_per_row

__all__ = ["ItemCF", "top_k_per_row"]


class ItemCF(Recommender):
    """Score = train history @ item-item cosine similarity, pruned to each item's ``k`` nearest neighbours.

    Similarity of items i and j on the binary train matrix is
    ``|U_i ∩ U_j| / (sqrt(|U_i| |U_j|) + shrink)``; the shrinkage term damps
    similarities resting on few co-occurrences. Cold items co-occur with
    nothing, so they score 0.
    """

    name = "itemcf"

    def __init__(self, k: int = 100, shrink: float = 0.0) -> None:
        super().__init__()
        if k < 1 or shrink < 0:
            raise ValueError(f"need k >= 1 and shrink >= 0, got k={k}, shrink={shrink}")
        self.k = k
        self.shrink = shrink
        self._history: sp.csr_matrix | None = None
        self._similarity: sp.csr_matrix | None = None

    def _fit(self, data: InteractionData) -> None:
        history = data.train_matrix()
        # Row j holds the neighbours of target item j; scoring needs them as column j.
        neighbours = cosine_neighbours(history, self.k, self.shrink)
        self._history = history
        self._similarity = neighbours.T.tocsr().astype(np.float32)

    def _condition(self, data: InteractionData, inputs: pl.DataFrame) -> bool:
        self._history = data.matrix(inputs)
        return True

    def _score(self, users: np.ndarray) -> np.ndarray:
        assert self._history is not None and self._similarity is not None
        return (self._history[users] @ self._similarity).toarray()
