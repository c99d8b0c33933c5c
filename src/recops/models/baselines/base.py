"""The interface every baseline recommender implements."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import polars as pl

from recops.data.interactions import InteractionData

# A model's validation metric as it stands (the caller decides which; higher is better).
Validator = Callable[["Recommender"], float]


class Recommender(ABC):
    """A model fitted on an :class:`InteractionData` that scores every item for a user.

    ``fit`` may read ``data.train`` and ``data.items`` only, never the held-out
    frames. ``score_users`` returns float32 scores of shape ``(len(users),
    n_items)`` over all items, warm and cold, so a recommender satisfies
    :class:`recops.training.evaluation.Scorer`. Subclasses implement
    :meth:`_fit` and :meth:`_score`; the checks live here once.
    """

    name: ClassVar[str]

    def __init__(self) -> None:
        self.n_users: int | None = None
        self.n_items: int | None = None
        self._validate: Validator | None = None  # set during fit()

    def fit(self, data: InteractionData, validate: Validator | None = None) -> None:
        """Learn from ``data.train`` (and ``data.items`` for content).

        ``validate``: the caller's validation metric of this model as it is (higher is better); models
        trained by epochs read it to stop early and keep their best epoch, the others ignore it. A callback,
        so that the metric code (``recops.training.evaluation``) stays in its higher layer.
        """
        self.n_users = data.n_users
        self.n_items = data.n_items
        self._validate = validate
        try:
            self._fit(data)
        finally:
            self._validate = None

    def score_users(self, users: np.ndarray) -> np.ndarray:
        """Float32 scores of every item for each user in ``users``, shape ``(len(users), n_items)``."""
        if self.n_users is None or self.n_items is None:
            raise RuntimeError(f"{self.name}: call fit() before score_users()")
        users = np.asarray(users, dtype=np.int64).ravel()
        if users.size and (users.min() < 0 or users.max() >= self.n_users):
            raise IndexError(f"{self.name}: user indices must lie in [0, {self.n_users})")
        scores = np.asarray(self._score(users), dtype=np.float32)
        if scores.shape != (users.size, self.n_items):
            raise AssertionError(
                f"{self.name}: scored shape {scores.shape}, expected {(users.size, self.n_items)}"
            )
        return scores

    def conditioned(self, data: InteractionData, inputs: pl.DataFrame) -> Recommender:
        """A copy that scores each user from the interactions ``inputs`` instead of ``data.train`` (nothing is
        refitted): leave-one-out's test ranks from train + the valid item. Models that read no history at
        scoring time (popularity, BPR's learned user factors) return themselves."""
        model = copy.copy(self)
        return model if model._condition(data, inputs) else self

    def _condition(self, data: InteractionData, inputs: pl.DataFrame) -> bool:
        """Read ``inputs`` (an interaction frame of ``data``) at scoring time from now on; False when the model
        reads no history."""
        return False

    @abstractmethod
    def _fit(self, data: InteractionData) -> None:
        """Model-specific training; ``n_users`` and ``n_items`` are already set."""

    @abstractmethod
    def _score(self, users: np.ndarray) -> np.ndarray:
        """Model-specific scores for validated int64 ``users``."""
