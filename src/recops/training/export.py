"""The exported model directory, and loading it back.

Layout (DESIGN.md, "Export")::

    spec.yaml               the RecModel spec it was trained from
    backbone.json           backbone name/revision, and whether base weights are included
    base/                   base backbone weights, only for built-ins that are not in a package
    adapter/                the PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors)
    towers.safetensors      projection, ID embeddings, user MLP, heads, text cache
    item_index.npy          normalised item vectors, one row per item (float32)
    item_bias.npy           per-item retrieval bias: score = u·v / temperature + bias
    items.parquet           item_idx, item_id, text, and whether the item was warm
    feature_schema.json     the FeatureSchema and its hash
    metrics.json            evaluation metrics
    report.html             plots and tables

Loading rebuilds the exact model: scores after reload equal scores before export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import yaml
from safetensors.torch import load_file, save_file

from recops.api.loading import parse_recmodel_spec
from recops.api.recmodel import RecModelSpec
from recops.data.features import ITEM_TEXT_RECIPE, FeatureSchema
from recops.data.interactions import InteractionData
from recops.models.backbone import TINY_QWEN2, TextEncoder, apply_lora, load_base_model
from recops.models.two_tower import TwoTowerModel, tower_config

FEATURE_SCHEMA = "feature_schema.json"


def feature_schema(spec: RecModelSpec, n_items: int) -> FeatureSchema:
    """The feature schema a spec implies for a catalog of ``n_items``."""
    return FeatureSchema(
        item_text_recipe=ITEM_TEXT_RECIPE,
        tokenizer=spec.backbone.name,
        max_seq_length=spec.backbone.max_seq_length,
        pooling=spec.backbone.pooling,
        history_length=spec.data.history_length,
        embedding_dim=spec.training.width(spec.data.split),
        n_items=n_items,
    )


def _without_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's own weights under their own names: PEFT wraps each adapted layer (``q_proj`` →
    ``q_proj.base_layer`` + ``lora_A``/``lora_B``), names a fresh base model does not know."""
    return {name.replace(".base_layer.", "."): tensor for name, tensor in state.items() if ".lora_" not in name}


def _towers_state(model: TwoTowerModel) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("encoder.")}


def export_model(
    model: TwoTowerModel, spec: RecModelSpec, data: InteractionData, out: Path, metrics: dict | None = None
) -> Path:
    """Write the model directory; returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(yaml.safe_dump(spec.to_manifest_dict(), sort_keys=False))
    encoder = model.encoder
    assert encoder is not None
    include_base = spec.backbone.name == TINY_QWEN2  # random weights: nothing else can rebuild them
    (out / "backbone.json").write_text(
        json.dumps({"name": spec.backbone.name, "revision": spec.backbone.revision, "base_included": include_base})
    )
    peft_model = encoder.model
    if spec.lora.enabled:
        peft_model.save_pretrained(out / "adapter")
        if include_base:
            base = peft_model.get_base_model()
            base.save_pretrained(out / "base", state_dict=_without_lora(base.state_dict()))
    elif include_base:
        peft_model.save_pretrained(out / "base")
    save_file(_towers_state(model), out / "towers.safetensors")
    with torch.no_grad():
        np.save(out / "item_index.npy", model.item_vectors().float().numpy())
        np.save(out / "item_bias.npy", model.item_biases().float().numpy())
    data.items.select(
        "item_idx", "item_id", "text", pl.Series("warm", data.warm_mask)
    ).write_parquet(out / "items.parquet")
    (out / FEATURE_SCHEMA).write_text(json.dumps(feature_schema(spec, data.n_items).to_json(), indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics or {}, indent=2, default=float))
    return out


@dataclass
class LoadedModel:
    """A model directory read back: the model, its spec, catalog and feature schema."""

    model: TwoTowerModel
    spec: RecModelSpec
    items: pl.DataFrame
    schema: FeatureSchema
    item_index: np.ndarray

    @property
    def item_ids(self) -> list[str]:
        return self.items["item_id"].to_list()


def load_serving_metadata(directory: Path) -> tuple[pl.DataFrame, FeatureSchema]:
    """The catalog and feature schema of a model directory, checked against this code's schema.

    Serving refuses a model built with other features: the seed once lost 27% of its
    quality, silently, to a ranker reading features its model was not trained on.
    """
    directory = Path(directory)
    spec = parse_recmodel_spec(yaml.safe_load((directory / "spec.yaml").read_text()), str(directory / "spec.yaml"))
    items = pl.read_parquet(directory / "items.parquet")
    stored = FeatureSchema.from_json(json.loads((directory / FEATURE_SCHEMA).read_text()))
    expected = feature_schema(spec, items.height)
    if stored.digest() != expected.digest():
        raise ValueError(
            f"{directory / FEATURE_SCHEMA}: feature schema hash {stored.digest()[:12]} differs from this "
            f"recops' {expected.digest()[:12]}: the model was built with other features; retrain or use its version"
        )
    return items, stored


def load_model(directory: Path, with_backbone: bool = True) -> LoadedModel:
    """Rebuild the exported model; fails when the feature schema does not match this code's.

    ``with_backbone=False`` skips the language model: serving reads histories as item
    vectors from the exported index, so it never encodes text (and loads in a fraction
    of the memory and time).
    """
    directory = Path(directory)
    items, schema = load_serving_metadata(directory)
    spec = parse_recmodel_spec(yaml.safe_load((directory / "spec.yaml").read_text()), str(directory / "spec.yaml"))
    towers = load_file(directory / "towers.safetensors")
    config = tower_config(spec, items.height)
    if with_backbone:
        encoder = load_encoder(directory, spec)
        model = TwoTowerModel(encoder, encoder.hidden_size, config)
    else:
        model = TwoTowerModel(None, towers["text_projection.weight"].shape[1], config)
    model.load_state_dict(towers, strict=False)
    model.eval()
    return LoadedModel(model, spec, items, schema, np.load(directory / "item_index.npy"))


def load_encoder(directory: Path, spec: RecModelSpec) -> TextEncoder:
    """The backbone of an exported model with its trained LoRA adapter (base weights from the directory
    when it ships them, as for the random built-in backbone)."""
    backbone = json.loads((directory / "backbone.json").read_text())
    base_dir = directory / "base" if backbone["base_included"] else None
    base, tokenizer = load_base_model(spec.backbone, seed=spec.training.seed, local_dir=base_dir)
    if spec.lora.enabled:
        from peft import PeftModel

        wrapped = PeftModel.from_pretrained(base, directory / "adapter")
    else:
        wrapped = apply_lora(base, spec.lora)
    return TextEncoder(wrapped, tokenizer, spec.backbone.pooling, spec.backbone.max_seq_length)
