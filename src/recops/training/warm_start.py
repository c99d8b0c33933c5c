"""Warm start: a new revision begins from the weights of the last one (continuous learning).

Everything learned carries over: the LoRA adapter, the text projection, the user MLP, the heads, and
the per-item rows (ID and history embeddings, retrieval bias) of every item still in the catalog,
matched by item id, so a catalog that gained or lost items is fine. New items start from their text
alone, as cold items do at serving time; their bias is the warm items' mean. What is derived from the
new data (which items are warm, the text cache) is not copied: the caller re-encodes the catalog with
the carried-over backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
import yaml
from safetensors.torch import load_file

from recops.api import parse_recmodel_spec
from recops.api.recmodel import RecModelSpec
from recops.models.two_tower import TwoTowerModel

# Tensors with one row per item, in the catalog's order.
ITEM_ROWS = frozenset({"id_embedding.weight", "history_embedding.weight", "item_bias"})
# Recomputed from the new catalog and data.
# The residual's neighbours are item indices of the old catalog: recomputed, their weights learned again.
DERIVED = frozenset({"text_cache", "warm", "neighbour_index", "neighbour_real", "neighbour_prior", "neighbour_weight"})


class WarmStartMismatch(ValueError):
    """The last revision cannot seed this one (another backbone, another model shape)."""


@dataclass(frozen=True)
class WarmStart:
    """What was carried over from the last revision."""

    source: str
    tensors: int
    items_kept: int
    items_new: int
    items_dropped: int
    backbone: bool  # the backbone's weights (LoRA adapter) were carried over too


def apply_warm_start(model: TwoTowerModel, spec: RecModelSpec, item_ids: list[str], previous: Path) -> WarmStart:
    """Load the exported model in ``previous`` into ``model`` (built for ``spec`` over ``item_ids``)."""
    previous = Path(previous)
    if not (previous / "towers.safetensors").is_file():
        raise WarmStartMismatch(f"{previous}: not an exported model directory (no towers.safetensors)")
    previous_spec = parse_recmodel_spec(yaml.safe_load((previous / "spec.yaml").read_text()))
    if previous_spec.backbone.name != spec.backbone.name:
        raise WarmStartMismatch(
            f"{previous} was trained on backbone {previous_spec.backbone.name!r}, this spec uses "
            f"{spec.backbone.name!r}: train from scratch"
        )
    towers = load_file(previous / "towers.safetensors")
    old_ids = pl.read_parquet(previous / "items.parquet").sort("item_idx")["item_id"].to_list()
    old_row = {item_id: row for row, item_id in enumerate(old_ids)}
    kept_new = [row for row, item_id in enumerate(item_ids) if item_id in old_row]
    kept_old = [old_row[item_ids[row]] for row in kept_new]
    state = model.state_dict()
    carried = 0
    with torch.no_grad():
        for name, tensor in towers.items():
            if name in DERIVED or name not in state:
                continue
            target = state[name]
            if name in ITEM_ROWS:
                if target.shape[1:] != tensor.shape[1:]:
                    raise _shape_mismatch(previous, name, tensor, target)
                target[kept_new] = tensor[kept_old].to(target.dtype)
            elif target.shape == tensor.shape:
                target.copy_(tensor)
            else:
                raise _shape_mismatch(previous, name, tensor, target)
            carried += 1
    adapter = _load_encoder_weights(model, previous, previous_spec)
    return WarmStart(str(previous), carried, len(kept_new), len(item_ids) - len(kept_new),
                     len(old_ids) - len(kept_old), adapter)


def _shape_mismatch(previous: Path, name: str, old: torch.Tensor, new: torch.Tensor) -> WarmStartMismatch:
    return WarmStartMismatch(
        f"{name} is {tuple(old.shape)} in {previous} but {tuple(new.shape)} for this spec "
        "(the model's shape changed): train from scratch"
    )


def _load_encoder_weights(model: TwoTowerModel, previous: Path, previous_spec: RecModelSpec) -> bool:
    """The last revision's backbone weights (its LoRA adapter; the base too when the directory ships it)."""
    if model.encoder is None:
        return False
    from recops.training.export import load_encoder

    weights = load_encoder(previous, previous_spec).state_dict()
    try:
        model.encoder.load_state_dict(weights, strict=True)
    except RuntimeError as error:  # another LoRA rank, target set or backbone configuration
        first = str(error).strip().splitlines()[:3]
        raise WarmStartMismatch(f"the backbone in {previous} does not fit this spec: {' '.join(first)}") from error
    return True
