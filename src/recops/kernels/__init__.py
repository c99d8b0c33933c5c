"""Entry points of the serving hot path: the ranker calls these, never torch directly.

Today they are the torch reference implementations; the CUDA versions (issue 7) will be chosen
here when built and a GPU is present, with the same signatures and results.
"""

from __future__ import annotations

import torch


def retrieve_topk(
    users: torch.Tensor, items: torch.Tensor, bias: torch.Tensor, scale: float, k: int, exclude: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of ``users @ items.T * scale + bias`` per user, skipping ``exclude`` (B × N bool).

    Returns ``(scores, indices)``, each B × k, best first.
    """
    if k < 1 or k > items.shape[0]:
        raise ValueError(f"k must be between 1 and the number of items ({items.shape[0]}), got {k}")
    scores = users @ items.T * scale + bias
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
    return torch.topk(scores, k, dim=1)


def head_features(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """``[u, v, u⊙v]`` along the last dimension: the input of the click and like heads."""
    return torch.cat([users, items, users * items], dim=-1)
