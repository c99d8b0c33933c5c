"""EASE^R (Steck, 2019): a closed-form item-item linear autoencoder."""

from __future__ import annotations

import numpy as np
import polars as pl
import scipy.sparse as sp
from scipy import linalg

from recops.data.interactions import InteractionData
from recops.models.baselines.base import Recommender


class EASE(Recommender):
    """B = argmin ||X - XB||² + λ||B||² with diag(B) = 0, solved in closed form; score = X_u B.

    Works on a dense item × item matrix, inverted in place: one matrix of memory,
    n_items² × 8 bytes up to ``float64_items`` items, × 4 above (float32: the ridge
    ``lam`` keeps the system well conditioned). Past ``max_items`` it models only the
    ``max_items`` most popular training items (20,000 by default: 1.6 GB); the others
    score 0 like cold items, whose rows and columns of B are zero (no interactions).
    """

    name = "ease"

    def __init__(self, lam: float = 250.0, max_items: int = 20_000, float64_items: int = 10_000) -> None:
        super().__init__()
        if lam <= 0:
            raise ValueError(f"lam must be positive, got {lam}")
        if max_items < 1 or float64_items < 0:
            raise ValueError(f"max_items must be >= 1 and float64_items >= 0, got {max_items}, {float64_items}")
        self.lam, self.max_items, self.float64_items = lam, max_items, float64_items
        self._history: sp.csr_matrix | None = None
        self._weights: np.ndarray | None = None
        self._modelled: np.ndarray | None = None  # item indices B covers, None: every item

    def _fit(self, data: InteractionData) -> None:
        history = data.train_matrix().tocsc()
        modelled = None
        if history.shape[1] > self.max_items:
            counts = np.asarray(history.getnnz(axis=0))
            modelled = np.sort(np.argsort(-counts, kind="stable")[: self.max_items])
            history = history[:, modelled]
        dtype = np.float64 if history.shape[1] <= self.float64_items else np.float32
        gram = (history.T @ history).astype(dtype).toarray()  # cast while sparse: no float64 dense copy
        diagonal = np.diag_indices_from(gram)
        gram[diagonal] += self.lam
        # In place (no second matrix) needs Fortran order: the Gram matrix is symmetric, so its transpose is it.
        precision = linalg.inv(gram.T, overwrite_a=True, check_finite=False).T
        del gram
        precision /= -np.diag(precision).copy()
        precision[diagonal] = 0.0
        self._history = history.tocsr()
        self._weights = precision.astype(np.float32, copy=False)
        self._modelled = modelled
        self._n_items = data.n_items

    def _condition(self, data: InteractionData, inputs: pl.DataFrame) -> bool:
        history = data.matrix(inputs)
        self._history = history if self._modelled is None else history.tocsc()[:, self._modelled].tocsr()
        return True

    def _score(self, users: np.ndarray) -> np.ndarray:
        assert self._history is not None and self._weights is not None
        scores = np.asarray(self._history[users] @ self._weights)
        if self._modelled is None:
            return scores
        full = np.zeros((len(users), self._n_items), dtype=scores.dtype)
        full[:, self._modelled] = scores
        return full
