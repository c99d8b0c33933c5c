"""Offline evaluation shared by every recommender: full-ranking top-K metrics and AUCs.

Ranking follows RecBole's full-sort protocol: every candidate item is scored,
the items a user is already known to have engaged with are masked out, and
Recall/NDCG/MRR are computed exactly as RecBole defines them, averaged over the
users with at least one ground-truth item. Warm evaluation ranks the warm items
only; cold evaluation ranks the cold items only, against ``cold_test``.

Everything here is numpy/scipy so that any model (a baseline, the two-tower
model, a served endpoint) can be evaluated the same way through :class:`Scorer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import polars as pl
import scipy.sparse as sp
from scipy.stats import rankdata

from recops.data.interactions import ITEM_IDX, LIKE, USER_IDX, InteractionData
from recops.data.samples import contains_keys, pair_keys, sample_unseen_items

DEFAULT_KS = (10, 20, 50, 100)
NEGATIVES_PER_POSITIVE = 4
SPLITS = ("valid", "test")
# Bounds on one batch of the score matrix: at most this many users, and about
# 2**24 float64 cells (128 MiB) so that large catalogues still fit in memory.
_MAX_BATCH_USERS = 1024
_MAX_BATCH_CELLS = 1 << 24
# score_pairs is called on chunks of this many pairs for the same reason.
_PAIR_CHUNK = 1 << 16


@runtime_checkable
class Scorer(Protocol):
    """Anything that scores every item for a batch of users.

    ``score_users`` returns a float32 array of shape ``(len(users), n_items)``
    over all items (warm and cold); higher means more relevant.
    """

    def score_users(self, users: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class PairScorer(Scorer, Protocol):
    """A :class:`Scorer` that also scores given (user, item) pairs for clicks and likes.

    ``score_pairs`` returns ``(click_scores, like_scores)``, each of shape
    ``(len(users),)``. Scorers without it are scored on pairs by gathering
    ``score_users``, which then serves as both the click and the like score.
    """

    def score_pairs(self, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@runtime_checkable
class ConditionableScorer(Scorer, Protocol):
    """A :class:`Scorer` that can score from other interactions than those it was trained on (no refit)."""

    def conditioned(self, data: InteractionData, inputs: pl.DataFrame) -> Scorer: ...


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney U / (n_pos * n_neg)).

    Tied scores count as half a correctly ordered pair. Returns NaN when either
    class is empty.
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores differ in length: {labels.size} vs {scores.size}")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks are what makes ties count one half
    u_statistic = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_statistic / (n_pos * n_neg))


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    cutoffs = tuple(sorted({int(k) for k in ks}))
    if not cutoffs or cutoffs[0] < 1:
        raise ValueError(f"ks must be positive cut-offs, got {tuple(ks)}")
    return cutoffs


def _metric_names(ks: Sequence[int]) -> list[str]:
    return [f"{metric}@{k}" for k in ks for metric in ("recall", "ndcg", "mrr")]


def _top_columns(scores: np.ndarray, depth: int) -> np.ndarray:
    """Each row's ``depth`` highest-scoring columns, in no particular order (torch's top-k: about 20 times
    numpy's argpartition on a 1,000 × 12,000 block)."""
    import torch

    return torch.topk(torch.from_numpy(np.ascontiguousarray(scores)), depth, dim=1, sorted=False).indices.numpy()


def _top_items(
    scores: np.ndarray, depth: int, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and scores of each row's ``depth`` highest scores, best first; with ``rng``, exact ties
    are ordered at random (:func:`_break_ties`), otherwise arbitrarily."""
    n_rows, n_cols = scores.shape
    top = _top_columns(scores, depth) if depth < n_cols else np.broadcast_to(np.arange(n_cols), (n_rows, n_cols))
    top_scores = np.take_along_axis(scores, top, axis=1)
    if rng is None:
        order = np.argsort(-top_scores, axis=1, kind="stable")
        return np.take_along_axis(top, order, axis=1), np.take_along_axis(top_scores, order, axis=1)
    # Ties only matter where they are: inside the top (ordered here by a random key) and across its edge
    # (a row whose depth-th score also occurs outside the top). Only the rows tied across the edge are
    # ranked again with jittered scores: jittering every score cost more than the ranking itself.
    order = np.lexsort((rng.random(top_scores.shape), -top_scores), axis=1)
    top, top_scores = np.take_along_axis(top, order, axis=1), np.take_along_axis(top_scores, order, axis=1)
    if depth < n_cols:
        edge = top_scores[:, -1:]
        crossing = np.flatnonzero(np.isfinite(edge[:, 0]) & ((scores >= edge).sum(axis=1) > depth))
        if crossing.size:
            broken = _break_ties(scores[crossing], rng)
            again = _top_columns(broken, depth)
            again = np.take_along_axis(again, np.argsort(-np.take_along_axis(broken, again, axis=1), axis=1), axis=1)
            top[crossing] = again
            top_scores[crossing] = np.take_along_axis(scores[crossing], again, axis=1)
    return top, top_scores


def ranking_metrics(
    scores: np.ndarray, truth: sp.spmatrix, ks: Sequence[int], rng: np.random.Generator | None = None
) -> dict[str, np.ndarray]:
    """Per-user Recall@K, NDCG@K and MRR@K of a full ranking, with RecBole's definitions.

    ``scores`` is ``(n_users, n_candidates)``; ``-inf`` marks a masked item,
    which is never counted as a hit. ``truth`` is a binary matrix of the same
    shape holding each user's ground-truth items. Exact ties are ordered
    at random with ``rng`` (:func:`evaluate` passes one), arbitrarily without.

    * Recall@K = hits in the top K / number of ground-truth items.
    * NDCG@K = DCG@K / IDCG@K with binary relevance, IDCG over min(|truth|, K) items.
    * MRR@K = 1 / rank of the first hit within the top K, else 0.

    Returns ``{"recall@K", "ndcg@K", "mrr@K"}`` for every K, each a float64
    array of length ``n_users``; NaN for users without ground truth.
    """
    scores = np.asarray(scores)
    n_users, n_candidates = scores.shape
    if truth.shape != scores.shape:
        raise ValueError(f"truth has shape {truth.shape}, scores {scores.shape}")
    cutoffs = _check_ks(ks)
    depth = min(cutoffs[-1], n_candidates)
    if depth == 0:
        return {name: np.full(n_users, np.nan) for name in _metric_names(cutoffs)}
    top, top_scores = _top_items(scores, depth, rng)
    truth_keys = pair_keys(truth)
    rows = np.arange(n_users, dtype=np.int64)[:, None]
    hits = contains_keys(truth_keys, rows * n_candidates + top) & (top_scores > -np.inf)
    n_truth = np.bincount(truth_keys // n_candidates, minlength=n_users).astype(np.float64)

    discounts = 1.0 / np.log2(np.arange(2, depth + 2))
    cum_hits = np.cumsum(hits, axis=1)
    cum_dcg = np.cumsum(hits * discounts, axis=1)
    ideal = np.cumsum(discounts)
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), depth)
    has_truth = n_truth > 0
    metrics: dict[str, np.ndarray] = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in cutoffs:
            at = min(k, depth) - 1
            ideal_at = np.clip(np.minimum(n_truth, k).astype(np.int64) - 1, 0, depth - 1)
            metrics[f"recall@{k}"] = np.where(has_truth, cum_hits[:, at] / n_truth, np.nan)
            metrics[f"ndcg@{k}"] = np.where(has_truth, cum_dcg[:, at] / ideal[ideal_at], np.nan)
            reciprocal = np.where(first_hit <= at, 1.0 / (first_hit + 1), 0.0)
            metrics[f"mrr@{k}"] = np.where(has_truth, reciprocal, np.nan)
    return metrics


def _break_ties(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A float64 copy of float32 ``scores`` in which exact ties are ordered at random.

    Each finite score is raised by a random amount below a quarter of its own
    float32 spacing: distinct float32 scores keep their order, equal ones are
    shuffled. Without this a scorer that gives many items the same score (cold
    items under a collaborative model, say) would have them ranked in one fixed
    order (argpartition's) for every user, which looks like signal whenever the
    ground truth happens to sit early in that order.
    """
    base = np.asarray(scores, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        # In float64: a quarter of the spacing of 0 (a float32 subnormal) would round to 0 in float32.
        jitter = np.abs(np.spacing(base)).astype(np.float64)
    jitter *= 0.25 * rng.random(base.shape)
    broken = base.astype(np.float64)
    broken += jitter
    if not np.isfinite(jitter).all():  # ±inf scores stay as they are (their spacing is NaN)
        infinite = ~np.isfinite(base)
        broken[infinite] = base[infinite]
    return broken


def _batch_size(n_items: int) -> int:
    return max(1, min(_MAX_BATCH_USERS, _MAX_BATCH_CELLS // max(n_items, 1)))


def _score_batch(scorer: Scorer, users: np.ndarray, n_items: int) -> np.ndarray:
    scores = np.asarray(scorer.score_users(users))
    if scores.shape != (users.size, n_items):
        raise ValueError(f"score_users returned shape {scores.shape}, expected {(users.size, n_items)}")
    return scores


def _rank_candidates(
    scorer: Scorer,
    n_items: int,
    truth: sp.csr_matrix,
    known: sp.csr_matrix,
    candidates: np.ndarray,
    ks: tuple[int, ...],
    rng: np.random.Generator,
) -> dict[str, float]:
    """Mean ranking metrics over the users with ground truth among ``candidates``, plus ``users``."""
    truth = truth[:, candidates].tocsr()
    known = known[:, candidates].tocsr()
    users = np.flatnonzero(truth.getnnz(axis=1) > 0)
    totals: dict[str, float] = {}
    batch = _batch_size(n_items)
    for start in range(0, users.size, batch):
        batch_users = users[start : start + batch]
        scores = np.array(_score_batch(scorer, batch_users, n_items)[:, candidates], dtype=np.float32)
        rows, cols = known[batch_users].nonzero()
        scores[rows, cols] = -np.inf
        for key, values in ranking_metrics(scores, truth[batch_users], ks, rng).items():
            totals[key] = totals.get(key, 0.0) + float(values.sum())
    means = {name: totals[name] / users.size if users.size else float("nan") for name in _metric_names(ks)}
    return {**means, "users": float(users.size)}


def _pair_scores(
    scorer: Scorer, users: np.ndarray, items: np.ndarray, n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """Click and like scores of (user, item) pairs, from ``score_pairs`` when the scorer has it."""
    if isinstance(scorer, PairScorer):
        click = np.empty(users.size, dtype=np.float64)
        like = np.empty(users.size, dtype=np.float64)
        for start in range(0, users.size, _PAIR_CHUNK):
            chunk = slice(start, start + _PAIR_CHUNK)
            click[chunk], like[chunk] = scorer.score_pairs(users[chunk], items[chunk])
        return click, like
    gathered = np.empty(users.size, dtype=np.float64)
    order = np.argsort(users, kind="stable")
    sorted_users = users[order]
    distinct = np.unique(users)
    batch = _batch_size(n_items)
    for start in range(0, distinct.size, batch):
        batch_users = distinct[start : start + batch]
        lo = np.searchsorted(sorted_users, batch_users[0], side="left")
        hi = np.searchsorted(sorted_users, batch_users[-1], side="right")
        pairs = order[lo:hi]
        scores = _score_batch(scorer, batch_users, n_items)
        gathered[pairs] = scores[np.searchsorted(batch_users, users[pairs]), items[pairs]]
    return gathered, gathered


def _auc_metrics(
    scorer: Scorer, data: InteractionData, frame: pl.DataFrame, rng: np.random.Generator
) -> dict[str, float]:
    """Click and like AUCs on the split's interactions plus sampled unseen warm items as negatives."""
    pos_users = frame[USER_IDX].to_numpy().astype(np.int64)
    pos_items = frame[ITEM_IDX].to_numpy().astype(np.int64)
    pos_likes = frame[LIKE].to_numpy().astype(bool)
    seen = data.matrix(data.train) + data.matrix(data.valid) + data.matrix(data.test)
    neg_users = np.repeat(pos_users, NEGATIVES_PER_POSITIVE)
    neg_items = sample_unseen_items(neg_users, seen, np.flatnonzero(data.warm_mask), rng)
    drawn = neg_items >= 0
    neg_users, neg_items = neg_users[drawn], neg_items[drawn]
    users = np.concatenate([pos_users, neg_users])
    items = np.concatenate([pos_items, neg_items])
    click_scores, like_scores = _pair_scores(scorer, users, items, data.n_items)
    n_pos, n_neg = pos_users.size, neg_users.size
    click_labels = np.concatenate([np.ones(n_pos, dtype=bool), np.zeros(n_neg, dtype=bool)])
    like_labels = np.concatenate([pos_likes, np.zeros(n_neg, dtype=bool)])
    return {
        "click_auc": auc(click_labels, click_scores),
        "like_auc": auc(like_labels, like_scores),
        "like_auc_clicked": auc(pos_likes, like_scores[:n_pos]),
    }


def evaluate(
    scorer: Scorer,
    data: InteractionData,
    ks: Sequence[int] = DEFAULT_KS,
    split: str = "test",
    seed: int = 0,
    with_auc: bool = True,
) -> dict[str, float]:
    """Evaluate ``scorer`` on one split of ``data``: warm and cold full-ranking metrics and AUCs.

    Warm: the warm items are ranked, with each user's train items masked (and,
    for ``split="test"``, valid items too, as RecBole does); ground truth is the
    split's frame. As in RecBole, a ground-truth item the user already had in a
    masked split stays in the recall denominator but can never be a hit. Keys
    ``recall@K`` and ``ndcg@K`` for every K in ``ks``, ``mrr@K0`` for the
    smallest cut-off K0, and ``users`` (users evaluated).

    Cold (only when ``data`` has cold items): the cold items are ranked with the
    same masking, against ``data.cold_test`` whatever the split. Keys
    ``cold_recall@K`` for the two smallest cut-offs (cold pools are small, so
    deep cut-offs say little), ``cold_ndcg@K0`` and ``cold_users``.

    AUC: every interaction of the split is a positive (click 1, like its
    ``like``), with ``NEGATIVES_PER_POSITIVE`` items per positive drawn
    uniformly from the warm items that user never engaged with in
    train/valid/test (click 0, like 0). Keys ``click_auc``, ``like_auc`` (all
    pairs) and ``like_auc_clicked`` (positives only: liked vs merely clicked).

    Ties in the ranking are broken by a tiny random jitter seeded by ``seed``
    (see :func:`_break_ties`), which also seeds the negative sampling, so the
    result is deterministic for a deterministic scorer. Users are processed in
    batches, so memory stays bounded for large catalogues.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cutoffs = _check_ks(ks)
    head = cutoffs[0]
    warm_rng, cold_rng, auc_rng = np.random.default_rng(seed).spawn(3)
    frame = data.valid if split == "valid" else data.test
    known = data.matrix(data.train)
    if split == "test":
        known = known + data.matrix(data.valid)
        # Leave-one-out's test input is train + the valid item, as the sequential-recommendation papers
        # evaluate; the other protocols rank from train alone.
        if data.protocol == "loo" and isinstance(scorer, ConditionableScorer):
            scorer = scorer.conditioned(data, pl.concat([data.train, data.valid]))

    warm = _rank_candidates(
        scorer, data.n_items, data.matrix(frame), known, np.flatnonzero(data.warm_mask), cutoffs, warm_rng
    )
    results = {f"recall@{k}": warm[f"recall@{k}"] for k in cutoffs}
    results.update({f"ndcg@{k}": warm[f"ndcg@{k}"] for k in cutoffs})
    results[f"mrr@{head}"] = warm[f"mrr@{head}"]
    results["users"] = warm["users"]

    if len(data.cold_items):
        cold_cutoffs = cutoffs[:2]
        cold_candidates = np.unique(np.asarray(data.cold_items, dtype=np.int64))
        cold = _rank_candidates(
            scorer, data.n_items, data.matrix(data.cold_test), known, cold_candidates, cold_cutoffs, cold_rng
        )
        results.update({f"cold_recall@{k}": cold[f"recall@{k}"] for k in cold_cutoffs})
        results[f"cold_ndcg@{head}"] = cold[f"ndcg@{head}"]
        results["cold_users"] = cold["users"]

    if with_auc:  # training's per-epoch validation needs the ranking only
        results.update(_auc_metrics(scorer, data, frame, auc_rng))
    return results
