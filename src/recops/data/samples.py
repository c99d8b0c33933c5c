"""Click-head samples: click positives with their like label, and negatives.

Negatives are exposures the user did not click (4 per positive by default),
topped up with random catalog items where exposures run out. The retrieval
loss adds in-batch negatives on top of these (see recops.models.losses).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class ClickSamples:
    """Parallel arrays: one row per (user, item) sample."""

    users: np.ndarray
    items: np.ndarray
    click: np.ndarray
    like: np.ndarray

    def __len__(self) -> int:
        return len(self.users)


def _pair_keys(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    return users.astype(np.int64) * n_items + items.astype(np.int64)


def sample_negatives(
    users: np.ndarray,
    known_pairs: np.ndarray,
    candidate_items: np.ndarray,
    n_items: int,
    rng: np.random.Generator,
    max_rounds: int = 8,
) -> np.ndarray:
    """For each entry of ``users``, a random item from ``candidate_items`` the user has no known pair with.

    ``known_pairs`` are sorted keys ``user * n_items + item``. Collisions are
    redrawn up to ``max_rounds`` times; a user who knows almost every item may keep one.
    """
    items = candidate_items[rng.integers(0, len(candidate_items), size=len(users))]
    for _ in range(max_rounds):
        keys = _pair_keys(users, items, n_items)
        position = np.searchsorted(known_pairs, keys)
        clash = (position < len(known_pairs)) & (known_pairs[np.minimum(position, len(known_pairs) - 1)] == keys)
        if not clash.any():
            break
        items[clash] = candidate_items[rng.integers(0, len(candidate_items), size=int(clash.sum()))]
    return items


def click_samples(
    pos_users: np.ndarray,
    pos_items: np.ndarray,
    pos_likes: np.ndarray,
    exposure_users: np.ndarray,
    exposure_items: np.ndarray,
    candidate_items: np.ndarray,
    n_items: int,
    negatives: int,
    rng: np.random.Generator,
) -> ClickSamples:
    """Positives plus ``negatives`` negatives per positive (exposures first, then catalog)."""
    known = np.unique(_pair_keys(pos_users, pos_items, n_items))
    wanted = np.bincount(pos_users, minlength=int(pos_users.max(initial=-1)) + 1) * negatives

    # Exposures without a click: shuffle, then keep each user's first `wanted[u]`.
    exposure_keys = np.unique(_pair_keys(exposure_users, exposure_items, n_items))
    exposure_keys = exposure_keys[~np.isin(exposure_keys, known)]
    exposure_keys = exposure_keys[rng.permutation(len(exposure_keys))]
    exp_users = exposure_keys // n_items
    exp_items = exposure_keys % n_items
    order = np.argsort(exp_users, kind="stable")
    exp_users, exp_items = exp_users[order], exp_items[order]
    starts = np.searchsorted(exp_users, exp_users, side="left")
    rank = np.arange(len(exp_users)) - starts
    limit = np.zeros(len(exp_users), dtype=np.int64)
    in_range = exp_users < len(wanted)
    limit[in_range] = wanted[exp_users[in_range]]
    keep = rank < limit
    neg_users, neg_items = exp_users[keep], exp_items[keep]

    # Top up from the catalog where a user has too few exposures.
    have = np.bincount(neg_users, minlength=len(wanted))[: len(wanted)]
    missing = np.maximum(wanted - have, 0)
    top_users = np.repeat(np.arange(len(wanted)), missing)
    top_items = sample_negatives(top_users, known, candidate_items, n_items, rng)

    users = np.concatenate([pos_users, neg_users, top_users]).astype(np.int64)
    items = np.concatenate([pos_items, neg_items, top_items]).astype(np.int64)
    n_neg = len(neg_users) + len(top_users)
    click = np.concatenate([np.ones(len(pos_users)), np.zeros(n_neg)]).astype(np.float32)
    like = np.concatenate([pos_likes.astype(np.float32), np.zeros(n_neg, dtype=np.float32)])
    return ClickSamples(users=users, items=items, click=click, like=like)


def negatives_by_positive(samples: ClickSamples, pos_users: np.ndarray, negatives: int) -> np.ndarray:
    """Pair each positive with ``negatives`` of its own user's negatives: a (positives × negatives) item array.

    :func:`click_samples` gives every user exactly ``negatives`` negatives per
    positive, so the pairing is exact; the heads then reuse the user vector of
    the positive instead of computing one per negative.
    """
    is_negative = samples.click == 0
    neg_users, neg_items = samples.users[is_negative], samples.items[is_negative]
    order = np.argsort(neg_users, kind="stable")
    neg_users, neg_items = neg_users[order], neg_items[order]
    first_negative = np.searchsorted(neg_users, pos_users)
    by_user = np.argsort(pos_users, kind="stable")
    sorted_users = pos_users[by_user]
    rank = np.empty(len(pos_users), dtype=np.int64)
    rank[by_user] = np.arange(len(pos_users)) - np.searchsorted(sorted_users, sorted_users)
    index = first_negative[:, None] + rank[:, None] * negatives + np.arange(negatives)
    return neg_items[index]


def pair_keys(matrix: sp.spmatrix) -> np.ndarray:
    """Sorted, unique ``row * n_cols + col`` keys of the stored non-zero entries of ``matrix``."""
    csr = sp.csr_matrix(matrix, copy=True)
    csr.eliminate_zeros()
    csr.sum_duplicates()  # canonical CSR: rows ascending, columns sorted, so the keys come out sorted
    rows = np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr))
    return rows * csr.shape[1] + csr.indices.astype(np.int64)


def contains_keys(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Boolean mask: which of ``keys`` occur in ``sorted_keys``."""
    if sorted_keys.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    return sorted_keys[pos] == keys


def sample_unseen_items(
    users: np.ndarray,
    seen: sp.spmatrix,
    pool: np.ndarray,
    rng: np.random.Generator,
    max_rounds: int = 100,
) -> np.ndarray:
    """For each of ``users``, an item drawn uniformly from ``pool`` that is not in the user's row of ``seen``.

    Rejection sampling, vectorised over all entries: clashes are redrawn up to
    ``max_rounds`` times. Entries still without an item (a user who has seen the
    whole pool) get -1.
    """
    users = np.asarray(users, dtype=np.int64)
    pool = np.asarray(pool, dtype=np.int64)
    seen_keys = pair_keys(seen)
    n_cols = seen.shape[1]
    items = np.full(users.size, -1, dtype=np.int64)
    pending = np.arange(users.size)
    for _ in range(max_rounds):
        if pending.size == 0 or pool.size == 0:
            break
        draws = pool[rng.integers(0, pool.size, size=pending.size)]
        clash = contains_keys(seen_keys, users[pending] * n_cols + draws)
        items[pending[~clash]] = draws[~clash]
        pending = pending[clash]
    return items
