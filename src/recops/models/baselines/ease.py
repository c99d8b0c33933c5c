"""EASE^R (Steck, 2019): a closed-form item-item linear autoencoder."""

from __future__ import annotations

import numpy as np
import polars as pl
import scipy.sparse as sp

from recops.data.interactions import InteractionData
from recops.models.baselines.base import Recommender


class EASE(Recommender):
    """B = argmin ||X - XB||² + λ||B||² with diag(B) = 0, solved in closed form; score = X_u B.

    Works on the dense item × item Gram matrix, so memory grows with n_items²
    (fine up to a few tens of thousands of items). Cold items have no train
    interactions, so their rows and columns of B are zero and they score 0.
    """

    name = "ease"

    def __init__(self, lam: float = 250.0) -> None:
        super().__init__()
        if lam <= 0:
            raise ValueError(f"lam must be positive, got {lam}")
        self.lam = lam
        self._history: sp.csr_matrix | None = None
        self._weights: np.ndarray | None = None

    def _fit(self, data: InteractionData) -> None:
        history = data.train_matrix()
        gram = (history.T @ history).toarray().astype(np.float64)
        diagonal = np.diag_indices_from(gram)
        gram[diagonal] += self.lam
        precision = np.linalg.inv(gram)
        weights = precision / -np.diag(precision)
        weights[diagonal] = 0.0
        self._history = history
        self._weights = weights.astype(np.float32)

    def _condition(self, data: InteractionData, inputs: pl.DataFrame) -> bool:
        self._history = data.matrix(inputs)
        return True

    def _score(self, users: np.ndarray) -> np.ndarray:
        assert self._history is not None and self._weights is not None
        return np.asarray(self._history[users] @ self._weights)
