"""Baseline recommenders that the two-tower model is compared against.

``make_baseline("ease", lam=250.0)`` builds one by its registry name.
"""

from __future__ import annotations

from typing import Any

from recops.models.baselines.base import Recommender
from recops.models.baselines.bpr import BPR
from recops.models.baselines.ease import EASE
from recops.models.baselines.itemcf import ItemCF
from recops.models.baselines.popularity import Popularity
from recops.models.baselines.sasrec import SASRec
from recops.models.baselines.tfidf import TfIdf

BASELINES: dict[str, type[Recommender]] = {
    model.name: model for model in (Popularity, ItemCF, BPR, EASE, TfIdf, SASRec)
}


def make_baseline(name: str, **params: Any) -> Recommender:
    """An unfitted baseline by registry name, constructed with ``params``."""
    try:
        model = BASELINES[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(sorted(BASELINES))}") from None
    return model(**params)


__all__ = ["BASELINES", "BPR", "EASE", "ItemCF", "Popularity", "Recommender", "SASRec", "TfIdf", "make_baseline"]
