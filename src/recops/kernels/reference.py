"""The torch reference implementations of the kernels: the CPU path, and the definition of a right answer.

Ordering is total and documented, so that every backend returns the same items in the same order:
higher score first; equal scores by lower item index; a NaN score ranks as ``-inf``.
"""

from __future__ import annotations

import torch


def retrieval_scores(users: torch.Tensor, items: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``users @ items.T * scale + bias`` in float32 (B × N), NaN replaced by ``-inf``."""
    scores = (users.float() @ items.float().T) * scale
    if bias is not None:
        scores = scores + bias
    return scores.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))


def retrieve_topk(
    users: torch.Tensor, items: torch.Tensor, bias: torch.Tensor | None, scale: float, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` items per user, ``(scores float32, indices int64)``, each B × k, in the documented order."""
    scores = retrieval_scores(users, items, bias, scale)
    # A stable descending sort keeps equal scores in index order: the tie rule, which topk does not promise.
    ordered, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    return ordered[:, :k].contiguous(), indices[:, :k].contiguous()


def head_features(
    users: torch.Tensor,
    items: torch.Tensor,
    user_rows: torch.Tensor | None = None,
    item_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[u, v, u⊙v]`` along the last dimension, with ``u = users[user_rows]`` and ``v = items[item_rows]``."""
    u = users if user_rows is None else users[user_rows]
    v = items if item_rows is None else items[item_rows]
    return torch.cat([u, v, u * v], dim=-1)
