"""Item-based collaborative filtering with sparse cosine similarity."""

from __future__ import annotations

import numpy as np
import polars as pl
import scipy.sparse as sp

from recops.data.interactions import InteractionData
from recops.models.baselines.base import Recommender


def top_k_per_row(matrix: sp.spmatrix, k: int) -> sp.csr_matrix:
    """``matrix`` with only the ``k`` largest stored values of each row kept (ties by column order)."""
    coo = sp.coo_matrix(matrix)
    order = np.lexsort((coo.col, -coo.data, coo.row))
    rows = coo.row[order]
    row_starts = np.searchsorted(rows, np.arange(coo.shape[0]))
    rank = np.arange(rows.size) - row_starts[rows]
    keep = order[rank < k]
    return sp.csr_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=coo.shape)


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
        cooccurrence = (history.T @ history).tocoo()
        norms = np.sqrt(cooccurrence.diagonal())
        off_diagonal = cooccurrence.row != cooccurrence.col
        rows, cols = cooccurrence.row[off_diagonal], cooccurrence.col[off_diagonal]
        cosine = cooccurrence.data[off_diagonal] / (norms[rows] * norms[cols] + self.shrink)
        # Row j holds the neighbours of target item j; scoring needs them as column j.
        neighbours = top_k_per_row(sp.coo_matrix((cosine, (rows, cols)), shape=cooccurrence.shape), self.k)
        self._history = history
        self._similarity = neighbours.T.tocsr().astype(np.float32)

    def _condition(self, data: InteractionData, inputs: pl.DataFrame) -> bool:
        self._history = data.matrix(inputs)
        return True

    def _score(self, users: np.ndarray) -> np.ndarray:
        assert self._history is not None and self._similarity is not None
        return (self._history[users] @ self._similarity).toarray()
