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
            self.item_vectors = torch.as_tensor(loaded.item_index, device=self.device).contiguous()
            self.item_bias = self.model.item_biases().float().contiguous()
        # A NaN in the index would rank its item last forever, silently: refuse to serve it.
        broken = (~torch.isfinite(self.item_vectors).all(dim=1)).nonzero().flatten()
        if broken.numel():
            raise ValueError(
                f"the item index has {broken.numel()} rows with NaN or infinite values "
                f"(items {', '.join(loaded.item_ids[i] for i in broken[:5].tolist())}"
                f"{', ...' if broken.numel() > 5 else ''}): re-export the model"
            )
        self.scale = 1.0 / self.model.config.temperature

    @torch.inference_mode()
    def rank(
        self, requests: Sequence[RankInput], exclude_history: bool = True
    ) -> list[RankedIndices | RankRequestError]:
        """Answer a batch of requests in one pass; a request that cannot be answered gets its error instead."""
        # The per-request bookkeeping (valid history entries, what each user must not get, how many items are
        # left) is numpy on the host: on arrays this small a numpy call costs a fraction of a torch op.
        history = np.stack([r.history for r in requests])
        mask = np.stack([r.mask for r in requests])
        rows, columns = np.nonzero(mask)
        entries, entry_rows = self._tensor(history[rows, columns]), self._tensor(rows)
        counts = self._tensor(mask.sum(axis=1))
        users = self.model.user_vectors_of_entries(self.item_vectors, entries, entry_rows, counts)
        # The item-to-item residual makes each user's item bias their own (B × N); without one it is shared.
        residual = self.model.history_scores_of_entries(entries, entry_rows, counts)
        bias = self.item_bias if residual is None else (residual.float() + self.item_bias).contiguous()
        n_items = self.item_vectors.shape[0]
        excluded, left = None, np.full(len(requests), n_items)
        if exclude_history:
            excluded, distinct = _exclusions(history, mask)
            left = n_items - distinct
        answers: list[RankedIndices | RankRequestError | None] = [None] * len(requests)
        answerable = []
        for row, request in enumerate(requests):
            if request.candidates is not None:
                continue
            if request.k <= left[row]:
                answerable.append(row)
            else:
                answers[row] = RankRequestError(f"k={request.k} but only {int(left[row])} items are left to recommend")
        if answerable:
            # One top-k at the largest k; each row keeps its own first k (the answers are in order).
            k_max = max(requests[row].k for row in answerable)
            chosen, exclude, chosen_bias = users, excluded, bias
            if len(answerable) < len(requests):
                picked = self._tensor(np.array(answerable))
                chosen = users[picked]
                exclude = None if excluded is None else excluded[answerable]
                chosen_bias = bias if bias.dim() == 1 else bias[picked].contiguous()
            scores, top = kernels.retrieve_topk(
                chosen,
                self.item_vectors,
                k_max,
                bias=chosen_bias,
                scale=self.scale,
                exclude=self._tensor(exclude) if exclude is not None and exclude.size else None,
            )
            items, item_scores, click, like = self._with_heads(chosen, scores, top)
            for position, row in enumerate(answerable):
                k = requests[row].k
                answers[row] = RankedIndices(
                    items[position, :k], item_scores[position, :k], click[position, :k], like[position, :k]
                )
        for row, request in enumerate(requests):
            if request.candidates is not None:
                history_items = None if excluded is None else excluded[row]
                row_bias = bias if bias.dim() == 1 else bias[row]
                answers[row] = self._rank_pool(users[row : row + 1], request, history_items, row_bias)
        return answers  # type: ignore[return-value]  # every row was answered above

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the scorer's device (shared, not copied, on the CPU)."""
        return torch.from_numpy(array) if self.device.type == "cpu" else torch.as_tensor(array, device=self.device)

    def _rank_pool(
        self, user: torch.Tensor, request: RankInput, excluded: np.ndarray | None, bias: torch.Tensor
    ) -> RankedIndices | RankRequestError:
        """Rank a request's own candidates (less its history): retrieval over those rows of the index."""
        # Sorted and distinct: ties between pool rows then break by item index, as over the whole catalog.
        pool = np.unique(np.asarray(request.candidates))
        if excluded is not None and excluded.size:
            pool = pool[~np.isin(pool, excluded[excluded >= 0])]
        if request.k > pool.size:
            return RankRequestError(f"k={request.k} but only {pool.size} items are left to recommend")
        rows = self._tensor(pool)
        scores, top = kernels.retrieve_topk(
            user, self.item_vectors[rows].contiguous(), request.k, bias=bias[rows].contiguous(), scale=self.scale
        )
        items, item_scores, click, like = self._with_heads(user, scores, rows[top])
        return RankedIndices(items[0], item_scores[0], click[0], like[0])

    def _with_heads(
        self, users: torch.Tensor, scores: torch.Tensor, top: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Items, scores, click and like probabilities (each B × k) of each user's retrieved items; the heads'
        features assembled in one pass."""
        n_users, k = top.shape
        user_rows = self._tensor(np.repeat(np.arange(n_users, dtype=np.int64), k))
        features = kernels.head_features(users, self.item_vectors, user_rows, top.reshape(-1))
        click, like = (torch.sigmoid(logits).reshape(n_users, k).cpu().numpy() for logits in self.model.heads(features))
        return top.cpu().numpy(), scores.float().cpu().numpy(), click, like


def _exclusions(history: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What each user must not get, and how many distinct items that is.

    The history entries ascending, ``-1`` for padding (B × E), narrowed to the last E columns where every
    row's items are (the retrieval reads k + E candidates on a GPU); and each row's count of distinct item
    indices. One sort on the host serves both."""
    values = np.where(mask, history, -1)
    values.sort(axis=1, kind="stable")  # numpy's default sort is slow on the many equal -1s of padding
    valid = values >= 0
    n_valid = valid.sum(axis=1)
    distinct = n_valid - (valid[:, 1:] & (values[:, 1:] == values[:, :-1])).sum(axis=1)
    # Ascending, so padding comes first; anything below -1 (which the retrieval refuses) too: keep it all then.
    width = int(n_valid.max(initial=0))
    if values.size and values[:, 0].min() < -1:
        width = values.shape[1]
    return values[:, values.shape[1] - width :], distinct


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
