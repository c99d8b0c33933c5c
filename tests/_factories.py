"""Small :class:`InteractionData` objects built in code for the evaluation and baseline tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from recops.data.interactions import ITEM_IDX, LIKE, TIMESTAMP, USER_IDX, InteractionData

Pairs = Sequence[tuple[int, int]]


def frame(pairs: Pairs, likes: Sequence[int] | None = None) -> pl.DataFrame:
    """An interaction frame of (user_idx, item_idx) pairs; likes default to 0, timestamps count rows."""
    users = [u for u, _ in pairs]
    items = [i for _, i in pairs]
    return pl.DataFrame(
        {
            USER_IDX: pl.Series(users, dtype=pl.Int64),
            ITEM_IDX: pl.Series(items, dtype=pl.Int64),
            LIKE: pl.Series(list(likes) if likes is not None else [0] * len(pairs), dtype=pl.Int8),
            TIMESTAMP: pl.Series(range(len(pairs)), dtype=pl.Int64),
        }
    )


def make_data(
    n_users: int,
    n_items: int,
    train: Pairs = (),
    valid: Pairs = (),
    test: Pairs = (),
    cold_test: Pairs = (),
    cold_items: Sequence[int] = (),
    texts: Sequence[str] | None = None,
    test_likes: Sequence[int] | None = None,
) -> InteractionData:
    """An :class:`InteractionData` with the given pairs per split; item text defaults to ``"item <idx>"``."""
    items = pl.DataFrame(
        {
            ITEM_IDX: pl.Series(range(n_items), dtype=pl.Int64),
            "item_id": [f"i{i}" for i in range(n_items)],
            "text": list(texts) if texts is not None else [f"item {i}" for i in range(n_items)],
        }
    )
    return InteractionData(
        user_ids=[f"u{u}" for u in range(n_users)],
        items=items,
        train=frame(train),
        valid=frame(valid),
        test=frame(test, test_likes),
        cold_test=frame(cold_test),
        cold_items=np.asarray(cold_items, dtype=np.int64),
        protocol="synthetic",
    )


# Words of the two planted halves of the catalogue: each title takes three words of its half (so any
# two titles of a half share some) and one filler word shared by both halves.
_HALF_WORDS = (("space", "robot", "galaxy", "alien"), ("romance", "wedding", "love", "heart"))
_FILLER_WORDS = ("the", "story", "night", "return", "city", "day")


def planted_data(
    users_per_group: int = 30,
    warm_per_half: int = 20,
    cold_per_half: int = 5,
    train_per_user: int = 8,
    seed: int = 0,
) -> InteractionData:
    """Two user groups, each engaging only with its own half of the catalogue.

    Items ``[0, 2 * warm_per_half)`` are warm, the first half belonging to
    group 0; the ``2 * cold_per_half`` items after them are cold, again half
    per group. Item text carries words of its half plus a shared filler word. Users
    ``u`` with ``u % 2 == g`` are in group ``g``. Each user has
    ``train_per_user`` train items, one valid and one test item (all from its
    half) and one cold-test item from its half's cold items.
    """
    rng = np.random.default_rng(seed)
    n_users = 2 * users_per_group
    n_warm = 2 * warm_per_half
    halves_warm = [np.arange(h * warm_per_half, (h + 1) * warm_per_half) for h in (0, 1)]
    halves_cold = [n_warm + np.arange(h * cold_per_half, (h + 1) * cold_per_half) for h in (0, 1)]
    train: list[tuple[int, int]] = []
    valid: list[tuple[int, int]] = []
    test: list[tuple[int, int]] = []
    cold_test: list[tuple[int, int]] = []
    for user in range(n_users):
        half = user % 2
        chosen = rng.choice(halves_warm[half], size=train_per_user + 2, replace=False)
        train += [(user, int(i)) for i in chosen[:train_per_user]]
        valid.append((user, int(chosen[-2])))
        test.append((user, int(chosen[-1])))
        cold_test.append((user, int(rng.choice(halves_cold[half]))))
    half_of_item = np.concatenate([np.repeat([0, 1], warm_per_half), np.repeat([0, 1], cold_per_half)])
    texts = [
        " ".join([*rng.choice(_HALF_WORDS[h], size=3, replace=False), rng.choice(_FILLER_WORDS)])
        for h in half_of_item
    ]
    return make_data(
        n_users,
        n_warm + 2 * cold_per_half,
        train=train,
        valid=valid,
        test=test,
        cold_test=cold_test,
        cold_items=np.concatenate(halves_cold),
        texts=texts,
    )


def item_half(data: InteractionData, item: int) -> int:
    """Which planted half (0 or 1) an item of :func:`planted_data` belongs to."""
    n_cold = len(data.cold_items)
    n_warm = data.n_items - n_cold
    if item < n_warm:
        return int(item >= n_warm // 2)
    return int(item - n_warm >= n_cold // 2)
