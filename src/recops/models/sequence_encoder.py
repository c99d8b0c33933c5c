"""The sequence user tower: a small transformer over a user's history of item vectors (SASRec's shape).

HLLM's split of the work: the item tower reads text (and an ID embedding) into one vector per item;
this tower reads the history as those vectors, newest last, and its output at each position is the
user's vector after that position. Trained at every position of every sequence in one pass (the
next item at each position, full softmax), it learns as much from one user as SASRec does.

Two modes, from the split the data declares:

* ``causal`` (leave-one-out, time split: the next item is what is held out): position embeddings and a
  causal mask, so position t reads the items up to t only;
* set (a random hold-out: order says nothing about what is held out): no positions, no causal mask;
  every entry reads every other.

Padding is on the left (the newest item in the last column, as :func:`recops.data.features.history_matrix`
lays histories out). A padded key is never read; every position may read itself, so no row of the
attention is empty (torch's attention returns NaN for a row with every key masked).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SequenceEncoder(nn.Module):
    """``blocks`` pre-norm transformer layers of width ``dim`` over the newest ``max_length`` history entries."""

    def __init__(self, dim: int, blocks: int, heads: int, max_length: int, dropout: float, causal: bool) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"the sequence tower's width {dim} must be a multiple of its heads {heads}")
        self.dim, self.heads, self.max_length, self.causal = dim, heads, max_length, causal
        self.positions = nn.Embedding(max_length, dim)
        # Small (as SASRec's): the history's item vectors lead at the start.
        nn.init.normal_(self.positions.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=dim, dropout=dropout, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, entries: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """States (B × L × dim) of left-padded histories: ``entries`` (B × L × dim) item vectors, ``mask``
        (B × L) which of them are real; L is at most ``max_length``. Padded positions' states are zero."""
        length = entries.shape[1]
        if length > self.max_length:
            raise ValueError(f"the sequence tower reads at most {self.max_length} entries, got {length}")
        present = mask.unsqueeze(-1).to(entries.dtype)
        # Unit item vectors scaled to unit-variance entries, as SASRec scales its embeddings by √dim.
        x = entries * math.sqrt(self.dim)
        if self.causal:
            x = x + self.positions.weight[self.max_length - length :]
        x = self.dropout(x) * present
        x = self.encoder(x, mask=self._blocked(mask))
        return self.norm(x) * present

    def _blocked(self, mask: torch.Tensor) -> torch.Tensor:
        """(B·heads) × L × L, True where a query must not read a key: padding and, when causal, the future."""
        length = mask.shape[1]
        diagonal = torch.eye(length, dtype=torch.bool, device=mask.device)
        blocked = ~mask.unsqueeze(1) & ~diagonal  # B × L(query) × L(key)
        if self.causal:
            blocked = blocked | torch.triu(torch.ones_like(diagonal), 1)
        return blocked.repeat_interleave(self.heads, dim=0)
