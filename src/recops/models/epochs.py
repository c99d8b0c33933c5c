"""What models trained by epochs share: early stopping on a validation metric and length-bucketed batches.

Used by the SASRec baseline and by the two-tower trainer's sequence objective, so that both stop by the
same rule and batch their sequences the same way.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class EarlyStopping:
    """Keeps the best epoch's state; says stop once ``patience`` epochs have passed without a better score.

    A score equal to the best counts as no better: a plateau ends the run, as in RecBole's ``stopping_step``.
    """

    patience: int
    best_score: float = -math.inf
    best_epoch: int = -1
    best_state: Mapping[str, Any] | None = field(default=None, repr=False)

    def update(self, epoch: int, score: float, state: Mapping[str, Any]) -> bool:
        """Record ``epoch``'s validation ``score`` (``state`` is copied when it is the best); True: stop now."""
        if score > self.best_score:
            self.best_score, self.best_epoch = score, epoch
            self.best_state = copy.deepcopy(dict(state))
        return epoch - self.best_epoch >= self.patience


def length_batches(
    lengths: np.ndarray, rows: np.ndarray, batch_size: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """``rows`` in batches of about the same ``lengths[row]``, the batches in random order.

    Most users have a few items: padding every batch to the longest sequence made an epoch several times
    slower. Rows are shuffled within a length, so batches differ from epoch to epoch.
    """
    order = rows[np.lexsort((rng.random(rows.size), lengths[rows]))]
    batches = [order[start : start + batch_size] for start in range(0, order.size, batch_size)]
    for index in rng.permutation(len(batches)):
        yield batches[index]
