"""Content baseline: TF-IDF of item text, user profile = mean of the user's item vectors."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import polars as pl
import scipy.sparse as sp

from recops.data.interactions import InteractionData
from recops.models.baselines.base import Recommender

# Runs of letters or digits in any script; lower-cased before matching.
_TOKEN = re.compile(r"[^\W_]+")


def tokenize(text: str | None) -> list[str]:
    """Lower-cased runs of letters/digits of ``text`` (``None`` gives no tokens)."""
    return _TOKEN.findall(text.lower()) if text else []


def l2_normalize_rows(matrix: sp.spmatrix) -> sp.csr_matrix:
    """``matrix`` with every non-zero row scaled to unit Euclidean norm (zero rows stay zero)."""
    csr = sp.csr_matrix(matrix, dtype=np.float64)
    norms = np.sqrt(np.asarray(csr.multiply(csr).sum(axis=1)).ravel())
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return sp.csr_matrix(sp.diags(scale) @ csr)


def tfidf_vectors(texts: Sequence[str | None], min_df: int = 1, sublinear_tf: bool = True) -> sp.csr_matrix:
    """L2-normalised TF-IDF rows (documents × vocabulary) of ``texts``.

    IDF is the smoothed ``log((1 + n) / (1 + df)) + 1``; with ``sublinear_tf``
    a term counted c times weighs ``1 + log(c)``. Terms in fewer than
    ``min_df`` documents are dropped.
    """
    tokens = [tokenize(text) for text in texts]
    doc_of_token = np.repeat(np.arange(len(tokens)), [len(t) for t in tokens])
    vocabulary, term_of_token = np.unique(
        np.array([w for t in tokens for w in t], dtype=str), return_inverse=True
    )
    counts = sp.csr_matrix(
        (np.ones(doc_of_token.size), (doc_of_token, term_of_token)), shape=(len(tokens), vocabulary.size)
    )
    counts.sum_duplicates()
    document_frequency = np.diff(counts.tocsc().indptr)
    counts = counts[:, np.flatnonzero(document_frequency >= min_df)].tocsr()
    document_frequency = document_frequency[document_frequency >= min_df]
    if sublinear_tf:
        counts.data = 1.0 + np.log(counts.data)
    idf = np.log((1.0 + len(tokens)) / (1.0 + document_frequency)) + 1.0
    return l2_normalize_rows(counts @ sp.diags(idf))


class TfIdf(Recommender):
    """Cosine between a user's text profile and every item's TF-IDF vector.

    The profile is the mean of the L2-normalised TF-IDF rows of the user's train
    items. It needs only an item's text, so unlike the collaborative baselines
    it can rank cold items: the honest cold-start baseline.
    """

    name = "tfidf"

    def __init__(self, min_df: int = 1, sublinear_tf: bool = True) -> None:
        super().__init__()
        self.min_df = min_df
        self.sublinear_tf = sublinear_tf
        self._profiles: sp.csr_matrix | None = None
        self._vectors: sp.csr_matrix | None = None
        self._item_vectors_t: sp.csr_matrix | None = None

    def _fit(self, data: InteractionData) -> None:
        self._vectors = tfidf_vectors(data.item_texts, self.min_df, self.sublinear_tf)
        self._item_vectors_t = self._vectors.T.tocsr()
        self._condition(data, data.train)

    def _condition(self, data: InteractionData, inputs: pl.DataFrame) -> bool:
        history = data.matrix(inputs)
        counts = np.asarray(history.sum(axis=1)).ravel()
        inverse_counts = np.divide(1.0, counts, out=np.zeros_like(counts, dtype=np.float64), where=counts > 0)
        mean_profiles = sp.diags(inverse_counts) @ history @ self._vectors
        # Unit profiles turn the dot product with unit item vectors into a cosine.
        self._profiles = l2_normalize_rows(mean_profiles)
        return True

    def _score(self, users: np.ndarray) -> np.ndarray:
        assert self._profiles is not None and self._item_vectors_t is not None
        return (self._profiles[users] @ self._item_vectors_t).toarray()
