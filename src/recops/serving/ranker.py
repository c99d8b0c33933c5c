"""The ranker: an exported model directory answering "what should these users see next".

One request goes through three steps, and Triton's ensemble runs each in its own
model (``recops_preprocess`` → ``recops_ranker`` → ``recops_postprocess``):

1. :meth:`Catalog.features` — request item ids to the training feature code's
   padded history indices (``histories_from_ids``), with every check that can
   refuse a request (unknown items, oversized history, k out of range);
2. :meth:`Scorer.rank` — user vectors, top-k retrieval through ``recops.kernels``
   and the click/like heads, for a whole batch of requests at once;
3. :meth:`Catalog.item_ids_of` — item indices back to item ids.

:class:`Ranker` composes the three in-process: it is the reference the Triton
repository is tested against, and the router's local mode. Bad requests raise
:class:`RankRequestError` naming what was wrong; the ranker itself stays usable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recops import kernels
from recops.data.features import FeatureSchema, histories_from_ids
from recops.training.export import LoadedModel, load_model, load_serving_metadata

NO_CANDIDATES = np.array([-1], dtype=np.int64)  # "retrieve from the whole catalog" on the wire


class RankRequestError(ValueError):
    """A request the ranker refuses (unknown items, oversized history, k out of range)."""


@dataclass(frozen=True)
class RankInput:
    """One request in index space: padded history (oldest first), k, and an optional candidate pool."""

    history: np.ndarray  # int64 [L]
    mask: np.ndarray  # bool [L]
    k: int
    candidates: np.ndarray | None  # int64 [c], or None for the whole catalog


@dataclass(frozen=True)
class RankedIndices:
    """One request's answer in index space, best first."""

    items: np.ndarray  # int64 [k]
    scores: np.ndarray  # float32 [k]
    click: np.ndarray  # float32 [k]
    like: np.ndarray  # float32 [k]


@dataclass(frozen=True)
class Recommendation:
    """One user's ranked items, best first, with retrieval score and click/like probabilities."""

    item_ids: list[str]
    scores: np.ndarray
    click: np.ndarray
    like: np.ndarray


class Catalog:
    """Item ids ↔ indices and the request checks: steps 1 and 3, no torch needed."""

    def __init__(self, item_ids: Sequence[str], schema: FeatureSchema, max_k: int = 1000, max_history: int = 1000):
        self.item_ids = np.array(item_ids, dtype=object)
        self.item_index = {item_id: i for i, item_id in enumerate(item_ids)}
        self.schema = schema
        self.max_k = min(max_k, len(item_ids))
        self.max_history = max_history

    @classmethod
    def load(cls, directory: Path, **limits: int) -> Catalog:
        """The catalog of a model directory; fails when its feature schema is not this code's."""
        items, schema = load_serving_metadata(directory)
        return cls(items["item_id"].to_list(), schema, **limits)

    def features(self, history: Sequence[str], k: int, candidates: Sequence[str] | None = None) -> RankInput:
        """Check one request and turn it into indices with the training feature code."""
        if not 1 <= k <= self.max_k:
            raise RankRequestError(f"k must be between 1 and {self.max_k}, got {k}")
        if len(history) > self.max_history:
            raise RankRequestError(f"history has {len(history)} items; at most {self.max_history}")
        features, (unknown,) = histories_from_ids([history], self.item_index, self.schema.history_length)
        if unknown:
            raise RankRequestError(f"history has unknown item ids: {', '.join(unknown[:5])}")
        pool = None
        if candidates is not None:
            if not candidates:
                raise RankRequestError("candidates is empty; leave it out to rank the whole catalog")
            missing = [c for c in candidates if c not in self.item_index]
            if missing:
                raise RankRequestError(f"candidates has unknown item ids: {', '.join(missing[:5])}")
            pool = np.array([self.item_index[c] for c in candidates], dtype=np.int64)
        return RankInput(features.items[0], features.mask[0], k, pool)

    def item_ids_of(self, indices: np.ndarray) -> list[str]:
        """Item ids of item indices, in order."""
        return self.item_ids[indices].tolist()


class Scorer:
    """The towers and the item index: step 2, batched."""

    def __init__(self, loaded: LoadedModel, device: str | torch.device = "cpu") -> None:
        self.model = loaded.model.to(device)
        self.device = torch.device(device)
        with torch.no_grad():
            self.item_vectors = torch.as_tensor(loaded.item_index, device=self.device)
            self.item_bias = self.model.item_biases()
        self.scale = 1.0 / self.model.config.temperature

    @torch.no_grad()
    def rank(
        self, requests: Sequence[RankInput], exclude_history: bool = True
    ) -> list[RankedIndices | RankRequestError]:
        """Answer a batch of requests in one pass; a request that cannot be answered gets its error instead."""
        n_items = self.item_vectors.shape[0]
        history = torch.as_tensor(np.stack([r.history for r in requests]), device=self.device)
        mask = torch.as_tensor(np.stack([r.mask for r in requests]), device=self.device)
        users = self.model.user_vectors(self.item_vectors, history, mask)
        exclude = torch.zeros(len(requests), n_items, dtype=torch.bool, device=self.device)
        if exclude_history:
            rows = mask.nonzero(as_tuple=True)[0]
            exclude[rows, history[mask]] = True
        for row, request in enumerate(requests):
            if request.candidates is not None:
                allowed = torch.zeros(n_items, dtype=torch.bool, device=self.device)
                allowed[torch.as_tensor(request.candidates, device=self.device)] = True
                exclude[row] |= ~allowed
        available = (~exclude).sum(dim=1).tolist()
        answerable = [row for row, r in enumerate(requests) if r.k <= available[row]]
        answers: list[RankedIndices | RankRequestError] = [
            RankRequestError(f"k={r.k} but only {available[row]} items are left to recommend")
            for row, r in enumerate(requests)
        ]
        if not answerable:
            return answers
        # One top-k at the largest k; each row keeps its own first k (top-k is sorted).
        k_max = max(requests[row].k for row in answerable)
        selected = torch.as_tensor(answerable, device=self.device)
        scores, top = kernels.retrieve_topk(
            users[selected], self.item_vectors, self.item_bias, self.scale, k_max, exclude[selected]
        )
        chosen_users = users[selected]
        click, like = self.model.head_logits(chosen_users.unsqueeze(1).expand(-1, k_max, -1), self.item_vectors[top])
        click, like = torch.sigmoid(click).cpu().numpy(), torch.sigmoid(like).cpu().numpy()
        top, scores = top.cpu().numpy(), scores.float().cpu().numpy()
        for position, row in enumerate(answerable):
            k = requests[row].k
            answers[row] = RankedIndices(
                top[position, :k], scores[position, :k], click[position, :k], like[position, :k]
            )
        return answers


class Ranker:
    """Recommendations from an exported model directory (the three steps in-process)."""

    def __init__(self, loaded: LoadedModel, max_k: int = 1000, max_history: int = 1000) -> None:
        self.loaded = loaded
        self.catalog = Catalog(loaded.item_ids, loaded.schema, max_k=max_k, max_history=max_history)
        self.scorer = Scorer(loaded)

    @property
    def item_index(self) -> dict[str, int]:
        return self.catalog.item_index

    @classmethod
    def load(cls, directory: Path, **limits: int) -> Ranker:
        """Load a model directory for serving (no backbone; the feature-schema hash is checked on load)."""
        return cls(load_model(directory, with_backbone=False), **limits)

    def recommend(
        self,
        histories: Sequence[Sequence[str]],
        k: int = 10,
        candidates: Sequence[str] | None = None,
        exclude_history: bool = True,
    ) -> list[Recommendation]:
        """Top-``k`` items for each history (item ids, oldest first); ``candidates`` restricts the pool."""
        inputs = []
        for row, history in enumerate(histories):
            try:
                inputs.append(self.catalog.features(history, k, candidates))
            except RankRequestError as error:
                raise RankRequestError(str(error).replace("history", f"history[{row}]", 1)) from None
        answers = self.scorer.rank(inputs, exclude_history=exclude_history)
        for answer in answers:
            if isinstance(answer, RankRequestError):
                raise answer
        return [
            Recommendation(self.catalog.item_ids_of(a.items), a.scores, a.click, a.like)
            for a in answers
            if isinstance(a, RankedIndices)
        ]

