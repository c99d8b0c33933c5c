"""Entry points of the serving hot path: the ranker calls these, never torch directly.

Each entry point validates its inputs once, then runs the CUDA kernel from ``kernels/`` when it is built,
the tensors are on a GPU and the shapes are within the kernel's limits, and the torch reference
(:mod:`recops.kernels.reference`) otherwise. Both give the same answer: the same items in the same order
(higher score first, equal scores by lower item index, NaN scores as ``-inf``), scores within float32
rounding of each other, and bit-identical feature rows.

``RECOPS_KERNELS`` chooses: ``auto`` (default), ``torch`` (never the CUDA kernels) or ``cuda`` (fail
rather than fall back when the kernels cannot be loaded). :func:`backend` says which one a call takes.
"""

from __future__ import annotations

import numpy as np
import torch

from recops.kernels import cuda, reference
from recops.kernels.cuda import KernelUnavailable

__all__ = ["KernelUnavailable", "backend", "head_features", "retrieve_topk"]

FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def backend(device: torch.device | str) -> str:
    """``"cuda"`` when tensors on ``device`` go through the CUDA kernels, ``"torch"`` otherwise."""
    return "cuda" if torch.device(device).type == "cuda" and cuda.extension() is not None else "torch"


def retrieve_topk(
    users: torch.Tensor,
    items: torch.Tensor,
    k: int,
    *,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of ``users @ items.T * scale + bias`` per user, without writing the B × N scores.

    ``users`` is B × d and ``items`` (the index) N × d, both float32, float16 or bfloat16 on one device;
    ``items`` must be contiguous (it is big: copying it per call would be a hidden cost). ``bias`` is an
    optional float32 vector of N, or B × N (each user's own: the item-to-item residual; the torch path).
    ``exclude`` is an optional B × E int64 tensor of item indices each user
    must not get (their history), ``-1`` for padding. Returns ``(scores, indices)``: float32 and int64,
    B × k, best first. An empty batch returns B = 0 results. Raises ``ValueError`` naming the argument
    for anything else, including a row left with fewer than ``k`` items after its exclusions.
    """
    _check_tables(users, items, "users", "items", index=True)
    n_items = items.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_items:
        raise ValueError(f"k must be an integer between 1 and the number of items ({n_items}), got {k!r}")
    if bias is not None:
        _check_tensor(bias, "bias", items.device)
        if bias.dtype != torch.float32 or bias.shape not in ((n_items,), (users.shape[0], n_items)):
            raise ValueError(
                f"bias must be float32 of shape ({n_items},) or ({users.shape[0]}, {n_items}), "
                f"got {bias.dtype} {tuple(bias.shape)}"
            )
    n_excluded = 0
    if exclude is not None:
        _check_tensor(exclude, "exclude", items.device)
        if exclude.dtype != torch.int64 or exclude.dim() != 2 or exclude.shape[0] != users.shape[0]:
            raise ValueError(
                f"exclude must be int64 of shape ({users.shape[0]}, E), got {exclude.dtype} {tuple(exclude.shape)}"
            )
        if exclude.numel():
            lowest, highest = _bounds(exclude)
            if lowest < -1 or highest >= n_items:
                raise ValueError(f"exclude holds an item index outside [0, {n_items}) (use -1 for padding)")
        n_excluded = exclude.shape[1]
    users = users.contiguous()
    # Exclusions are applied after selection: at most E excluded items can rank above a user's k-th
    # best, so the first k that survive among the top k + E are that user's answer. The kernel never
    # reads a B × N mask.
    wanted = min(k + n_excluded, n_items)
    if users.shape[0] == 0:
        return users.new_zeros((0, k), dtype=torch.float32), users.new_zeros((0, k), dtype=torch.int64)
    if n_excluded and users.device.type == "cpu":
        answer = _retrieve_excluding_on_cpu(users, items, bias, float(scale), k, exclude)  # type: ignore[arg-type]
        if answer is not None:
            return answer
    # The kernel reads one bias vector; per-user biases take the torch path (a B × N matmul anyway).
    if (bias is None or bias.dim() == 1) and _use_cuda_retrieval(users, wanted):
        scores, indices = cuda.extension().retrieve_topk(users, items, bias, float(scale), wanted)
    else:
        scores, indices = reference.retrieve_topk(users, items, bias, float(scale), wanted)
    if exclude is None:
        return scores, indices
    return _drop_excluded(scores, indices, exclude, k)


def head_features(
    users: torch.Tensor,
    items: torch.Tensor,
    user_rows: torch.Tensor | None = None,
    item_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[u, v, u⊙v]`` along the last dimension: the input of the click and like heads.

    Without row indices, ``users`` and ``items`` are aligned pairs of any (broadcastable) shape, as in
    training. With ``user_rows`` and ``item_rows`` (int64 vectors of one length M), row m is built from
    ``users[user_rows[m]]`` and ``items[item_rows[m]]`` (M × 3d), gathered in the same pass, as serving
    does for B users × k items. The CUDA kernel serves the gathered, gradient-free case on GPU.
    """
    if user_rows is None and item_rows is None:
        if torch.is_grad_enabled() and (users.requires_grad or items.requires_grad):
            return reference.head_features(users, items)  # training: the kernel has no backward
        if users.dim() != 2 or users.shape != items.shape:
            return reference.head_features(users, items)
    elif user_rows is None or item_rows is None:
        raise ValueError("user_rows and item_rows go together: give both or neither")
    _check_tables(users, items, "users", "items", index=False)
    if user_rows is not None and item_rows is not None:
        for rows, name, table in ((user_rows, "user_rows", users), (item_rows, "item_rows", items)):
            _check_tensor(rows, name, items.device)
            if rows.dtype != torch.int64 or rows.dim() != 1:
                raise ValueError(f"{name} must be an int64 vector, got {rows.dtype} {tuple(rows.shape)}")
            if rows.numel():
                lowest, highest = _bounds(rows)
                if lowest < 0 or highest >= table.shape[0]:
                    raise ValueError(f"{name} holds a row outside [0, {table.shape[0]})")
        if user_rows.shape != item_rows.shape:
            raise ValueError(f"user_rows and item_rows differ in length: {user_rows.numel()} and {item_rows.numel()}")
    if users.is_cuda and cuda.extension() is not None:
        return cuda.extension().head_features(users.contiguous(), items.contiguous(), user_rows, item_rows)
    return reference.head_features(users, items, user_rows, item_rows)


def _use_cuda_retrieval(users: torch.Tensor, k: int) -> bool:
    """The kernel keeps each user's k best in shared memory and a row's slice in registers."""
    if not users.is_cuda or cuda.extension() is None:
        return False
    row_bytes = users.shape[1] * users.element_size()
    return k <= cuda.MAX_K and row_bytes % 16 == 0 and row_bytes <= cuda.MAX_ROW_BYTES


def _drop_excluded(
    scores: torch.Tensor, indices: torch.Tensor, exclude: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` entries of each ranked row whose index is not in that row's ``exclude``."""
    banned, _ = torch.sort(exclude, dim=1)
    position = torch.searchsorted(banned, indices).clamp(max=max(banned.shape[1] - 1, 0))
    excluded = banned.gather(1, position) == indices if banned.shape[1] else torch.zeros_like(indices, dtype=torch.bool)
    left = (~excluded).sum(dim=1)
    if bool((left < k).any()):
        row = int(torch.nonzero(left < k)[0])
        raise ValueError(f"k={k} but row {row} has only {int(left[row])} items left after its exclusions")
    # A stable sort on the flag moves excluded entries back and keeps the ranked order of the rest.
    keep = torch.sort(excluded.to(torch.int8), dim=1, stable=True).indices[:, :k]
    return scores.gather(1, keep), indices.gather(1, keep)


def _retrieve_excluding_on_cpu(
    users: torch.Tensor,
    items: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    k: int,
    exclude: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The reference path with exclusions, in one selection: on the CPU the reference writes the B × N scores
    anyway, so each user's excluded items are set to ``-inf`` there and the top ``k`` taken, not k + E.

    That answer is the documented one when every row's k-th score is above ``-inf``: lowering excluded items
    changes no other item's place, and none of them can then be among the k. Otherwise (a row short of items,
    or ties with genuine ``-inf`` scores) ``None``: the general path decides, and raises where it must."""
    scores = reference.retrieval_scores(users, items, bias, scale)
    if scores.requires_grad:
        return None
    banned = exclude.numpy()
    rows, columns = np.nonzero(banned >= 0)
    scores.numpy()[rows, banned[rows, columns]] = -np.inf
    values, indices = reference.select_topk(scores, k)
    return None if np.isneginf(values.numpy()[:, -1]).any() else (values, indices)


def _bounds(tensor: torch.Tensor) -> tuple[int, int]:
    """The smallest and largest value of a non-empty integer tensor, read back once."""
    if tensor.device.type == "cpu":
        values = tensor.numpy()
        return int(values.min()), int(values.max())
    lowest, highest = torch.aminmax(tensor)
    return tuple(torch.stack([lowest, highest]).tolist())  # type: ignore[return-value]


def _check_tensor(tensor: object, name: str, device: torch.device) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the items are on {device}")


def _check_tables(users: torch.Tensor, items: torch.Tensor, users_name: str, items_name: str, index: bool) -> None:
    """Two 2-D float tables of one dtype and width on one device; an ``index`` is also contiguous and not empty."""
    for tensor, name in ((users, users_name), (items, items_name)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows × d), got shape {tuple(tensor.shape)}")
        if tensor.dtype not in FLOAT_TYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")
    if users.dtype != items.dtype:
        raise ValueError(f"{users_name} and {items_name} differ in dtype: {users.dtype} and {items.dtype}")
    if users.device != items.device:
        raise ValueError(f"{users_name} is on {users.device} but {items_name} is on {items.device}")
    if users.shape[1] != items.shape[1]:
        raise ValueError(f"{users_name} have d={users.shape[1]} but {items_name} have d={items.shape[1]}")
    if not index:
        return
    if not items.is_contiguous():
        raise ValueError(f"{items_name} must be contiguous (call .contiguous() once when loading the index)")
    if items.shape[0] == 0:
        raise ValueError(f"{items_name} is empty")
