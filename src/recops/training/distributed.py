"""Training on several processes: PyTorch DistributedDataParallel under ``torchrun``.

``torchrun`` (``python -m torch.distributed.run``) starts one process per GPU (or per CPU worker) and
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; in a cluster the operator's
indexed Job does the same through a headless Service. Every process builds the same model from the same
seed and walks the same global batches; each takes every ``WORLD_SIZE``-th sample of a batch (its shard)
and DDP averages the gradients, so a step sees the whole batch, as a single process would. The random
draws of a step (ID dropout, history dropout, which item texts are re-encoded) are made for the whole
batch on every process and then sharded, so the processes agree and match a single-process run up to
float rounding. Rank 0 alone writes checkpoints, the export and the report.

The loss of a step runs inside the DDP module's ``forward`` (:class:`StepModule`): the training step
calls several of the model's methods, and DDP synchronises the gradients of whatever ``forward`` used.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: np.ndarray) -> np.ndarray:
        """This process's samples of a global batch: every ``size``-th, starting at ``rank``."""
        return batch[self.rank :: self.size]


def world_from_env(env: dict[str, str] | None = None) -> World:
    """The world torchrun describes in the environment (one process when it does not)."""
    env = dict(os.environ) if env is None else env
    try:
        world = World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    except ValueError as error:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {error}") from None
    if world.size < 1 or not 0 <= world.rank < world.size:
        raise ValueError(f"RANK={world.rank} is not within WORLD_SIZE={world.size}")
    return world


def start(world: World, device: torch.device) -> None:
    """Join the process group (gloo on CPU, NCCL on GPUs); nothing for a single process.

    Under torchrun the group meets in the agent's store, under a prefix of its own for each restart:
    after a worker dies torchrun restarts them all, and the new ones must not read the addresses the
    dead ones published (they would try to connect to them and fail).
    """
    if world.size == 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world.size, is_master=False)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"recops/attempt-{attempt}", agent)
        dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.size)
    else:
        dist.init_process_group(backend, rank=world.rank, world_size=world.size)


def stop(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.barrier()


class StepModule(nn.Module):
    """Runs a training step's loss function on the model, so that DDP sees it as ``forward``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, step: Callable[[nn.Module], Any]) -> Any:
        return step(self.model)


def stepper(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """``stepper(loss_fn)`` computes a step's loss; with several processes, through DDP."""
    module = StepModule(model)
    if world.size == 1:
        return module
    device_ids = [device.index] if device.type == "cuda" and device.index is not None else None
    # Some parameters sit out some steps (the backbone when no text is re-encoded, the like head's
    # unused branches): DDP must not wait for their gradients.
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)
