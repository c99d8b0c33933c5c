"""The ranker: an exported model directory answering "what should these users see next".

This is the in-process reference of what Triton's ``recops_ranker`` serves: it
reads request histories with the training feature code (``histories_from_ids``),
retrieves the top-k items through ``recops.kernels`` and scores them with the
click and like heads. Bad requests raise :class:`RankRequestError` naming what
was wrong; the ranker itself stays usable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recops import kernels
from recops.data.features import histories_from_ids
from recops.training.export import LoadedModel, load_model


class RankRequestError(ValueError):
    """A request the ranker refuses (unknown items, oversized history, k out of range)."""


@dataclass(frozen=True)
class Recommendation:
    """One user's ranked items, best first, with retrieval score and click/like probabilities."""

    item_ids: list[str]
    scores: np.ndarray
    click: np.ndarray
    like: np.ndarray


class Ranker:
    """Recommendations from an exported model directory."""

    def __init__(self, loaded: LoadedModel, max_k: int = 1000, max_history: int = 1000) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.max_k = min(max_k, loaded.items.height)
        self.max_history = max_history
        self.item_index = {item_id: i for i, item_id in enumerate(loaded.item_ids)}
        self.item_ids = np.array(loaded.item_ids, dtype=object)
        with torch.no_grad():
            self.item_vectors = torch.as_tensor(loaded.item_index)
            self.item_bias = self.model.item_biases()

    @classmethod
    def load(cls, directory: Path, **limits: int) -> Ranker:
        """Load a model directory (the feature-schema hash is checked on load)."""
        return cls(load_model(directory), **limits)

    def _check(self, histories: Sequence[Sequence[str]], k: int) -> None:
        if not 1 <= k <= self.max_k:
            raise RankRequestError(f"k must be between 1 and {self.max_k}, got {k}")
        for row, history in enumerate(histories):
            if len(history) > self.max_history:
                raise RankRequestError(f"history[{row}] has {len(history)} items; at most {self.max_history}")

    @torch.no_grad()
    def recommend(
        self,
        histories: Sequence[Sequence[str]],
        k: int = 10,
        candidates: Sequence[str] | None = None,
        exclude_history: bool = True,
    ) -> list[Recommendation]:
        """Top-``k`` items for each history (item ids, oldest first); ``candidates`` restricts the pool."""
        self._check(histories, k)
        length = self.loaded.schema.history_length
        features, unknown = histories_from_ids(histories, self.item_index, length)
        bad = [(row, ids) for row, ids in enumerate(unknown) if ids]
        if bad:
            row, ids = bad[0]
            raise RankRequestError(f"history[{row}] has unknown item ids: {', '.join(ids[:5])}")
        users = self.model.user_vectors(
            self.item_vectors, torch.as_tensor(features.items), torch.as_tensor(features.mask)
        )
        exclude = torch.zeros(len(histories), len(self.item_ids), dtype=torch.bool)
        if exclude_history:
            rows = np.repeat(np.arange(len(histories)), features.mask.sum(axis=1))
            exclude[torch.as_tensor(rows), torch.as_tensor(features.items[features.mask])] = True
        if candidates is not None:
            missing = [c for c in candidates if c not in self.item_index]
            if missing:
                raise RankRequestError(f"candidates has unknown item ids: {', '.join(missing[:5])}")
            allowed = torch.zeros(len(self.item_ids), dtype=torch.bool)
            allowed[torch.as_tensor([self.item_index[c] for c in candidates], dtype=torch.long)] = True
            exclude |= ~allowed
        available = int((~exclude).sum(dim=1).min())
        if k > available:
            raise RankRequestError(f"k={k} but only {available} items are left to recommend")
        scores, top = kernels.retrieve_topk(
            users, self.item_vectors, self.item_bias, 1.0 / self.model.config.temperature, k, exclude
        )
        click, like = self.model.head_logits(users.unsqueeze(1).expand(-1, k, -1), self.item_vectors[top])
        return [
            Recommendation(
                item_ids=self.item_ids[top[row].numpy()].tolist(),
                scores=scores[row].numpy(),
                click=torch.sigmoid(click[row]).numpy(),
                like=torch.sigmoid(like[row]).numpy(),
            )
            for row in range(len(histories))
        ]
