"""The torch reference implementations of the kernels: the CPU path, and the definition of a right answer.

Ordering is total and documented, so that every backend returns the same items in the same order:
higher score first; equal scores by lower item index; a NaN score ranks as ``-inf``.
"""

from __future__ import annotations

import numpy as np
import torch

NEG_INF, POS_INF = float("-inf"), float("inf")


def retrieval_scores(users: torch.Tensor, items: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``users @ items.T * scale + bias`` in float32 (B × N), NaN replaced by ``-inf``."""
    tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (users, items, bias))
    if tracked or (bias is not None and bias.dtype != torch.float32):
        scores = (users.float() @ items.float().T) * scale
        return (scores if bias is None else scores + bias).nan_to_num(nan=NEG_INF, posinf=POS_INF, neginf=NEG_INF)
    # The same arithmetic in place on the product: a serving call allocates one B × N buffer, not four.
    scores = (users.float() @ items.float().T).mul_(scale)
    if bias is not None:
        scores.add_(bias)
    return scores.nan_to_num_(nan=NEG_INF, posinf=POS_INF, neginf=NEG_INF)


def retrieve_topk(
    users: torch.Tensor, items: torch.Tensor, bias: torch.Tensor | None, scale: float, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` items per user, ``(scores float32, indices int64)``, each B × k, in the documented order."""
    return select_topk(retrieval_scores(users, items, bias, scale), k)


def select_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of each row of B × N scores (NaN already ``-inf``) in the documented order, with their indices."""
    if 4 * k <= scores.shape[1]:
        # A partial selection costs a fraction of sorting every score; its answer is taken only when ties
        # cannot have changed it.
        selected = _topk_if_untied(scores, k)
        if selected is not None:
            return selected
    # A stable descending sort keeps equal scores in index order: the tie rule, which topk does not promise.
    ordered, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    return ordered[:, :k].contiguous(), indices[:, :k].contiguous()


def _topk_if_untied(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``torch.topk``'s answer where it is the documented one, else ``None``.

    topk promises neither the order of equal scores nor which of the items tied with the k-th it keeps. Its
    answer is the documented one when each row has exactly k scores at or above its k-th (no tie across the
    cut) and no two equal scores among its k (strictly decreasing: one order only)."""
    values, indices = torch.topk(scores, k, dim=1)
    if scores.device.type == "cpu" and not scores.requires_grad:
        full, top = scores.numpy(), values.numpy()  # the same comparisons, without a torch op each
        tied = (np.count_nonzero(full >= top[:, -1:], axis=1) != k).any() or (top[:, 1:] == top[:, :-1]).any()
    else:
        tied = bool(((scores >= values[:, -1:]).sum(dim=1) != k).any() | (values[:, 1:] == values[:, :-1]).any())
    return None if tied else (values, indices)


def head_features(
    users: torch.Tensor,
    items: torch.Tensor,
    user_rows: torch.Tensor | None = None,
    item_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[u, v, u⊙v]`` along the last dimension, with ``u = users[user_rows]`` and ``v = items[item_rows]``."""
    u = users if user_rows is None else users.index_select(0, user_rows)
    v = items if item_rows is None else items.index_select(0, item_rows)
    return torch.cat([u, v, u * v], dim=-1)
