"""Item-item neighbourhoods from co-occurrence: what ItemCF scores with and the two-tower's residual reads."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def top_k_per_row(matrix: sp.spmatrix, k: int) -> sp.csr_matrix:
    """``matrix`` with only the ``k`` largest stored values of each row kept (ties by column order)."""
    coo = sp.coo_matrix(matrix)
    order = np.lexsort((coo.col, -coo.data, coo.row))
    rows = coo.row[order]
    row_starts = np.searchsorted(rows, np.arange(coo.shape[0]))
    rank = np.arange(rows.size) - row_starts[rows]
    keep = order[rank < k]
    return sp.csr_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=coo.shape)


def cosine_neighbours(history: sp.spmatrix, k: int, shrink: float = 0.0) -> sp.csr_matrix:
    """Row i: the ``k`` items most similar to item i, by cosine on the binary user × item ``history``.

    Similarity of items i and j is ``|U_i ∩ U_j| / (sqrt(|U_i| |U_j|) + shrink)``; an item is not its
    own neighbour, and items that co-occur with nothing have none. The sparse product costs what
    the co-occurrences cost, so it scales with the data rather than with the catalog squared.
    """
    history = sp.csr_matrix(history)
    cooccurrence = (history.T @ history).tocoo()
    norms = np.sqrt(cooccurrence.diagonal())
    off_diagonal = cooccurrence.row != cooccurrence.col
    rows, cols = cooccurrence.row[off_diagonal], cooccurrence.col[off_diagonal]
    cosine = cooccurrence.data[off_diagonal] / (norms[rows] * norms[cols] + shrink)
    return top_k_per_row(sp.coo_matrix((cosine, (rows, cols)), shape=cooccurrence.shape), k)


def neighbour_table(neighbours: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``neighbours`` as dense N × k tables: each row's neighbour indices (best first), which are real and
    their similarity.

    Rows with fewer than ``k`` neighbours are padded with their own index, marked not real.
    """
    coo = sp.coo_matrix(neighbours)
    n = coo.shape[0]
    order = np.lexsort((coo.col, -coo.data, coo.row))
    rows = coo.row[order]
    rank = np.arange(rows.size) - np.searchsorted(rows, np.arange(n))[rows]
    keep = rank < k
    index = np.repeat(np.arange(n, dtype=np.int64)[:, None], k, axis=1)
    real = np.zeros((n, k), dtype=bool)
    similarity = np.zeros((n, k), dtype=np.float32)
    index[rows[keep], rank[keep]] = coo.col[order][keep]
    real[rows[keep], rank[keep]] = True
    similarity[rows[keep], rank[keep]] = coo.data[order][keep]
    return index, real, similarity
