"""Warm start: a retrain begins from the last revision's weights, item rows matched by id; a revision
that cannot seed this spec is refused with the reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recops.models.two_tower import TwoTowerConfig, TwoTowerModel
from recops.training.export import load_model
from recops.training.trainer import build_model, train
from recops.training.warm_start import WarmStartMismatch, apply_warm_start

pytestmark = pytest.mark.slow


def test_a_fresh_model_warm_started_scores_as_the_last_revision(tiny_model):
    data, result, model_dir = tiny_model
    spec = load_model(model_dir, with_backbone=False).spec
    reseeded = spec.model_copy(update={"training": spec.training.model_copy(update={"seed": 9})})
    model, tokens = build_model(reseeded, data)
    before = model.item_vectors().detach().clone()
    summary = apply_warm_start(model, spec, data.items["item_id"].to_list(), model_dir)
    assert summary.backbone and summary.items_kept == data.n_items and summary.items_new == 0
    exported = np.load(model_dir / "item_index.npy")
    with torch.no_grad():
        model.text_cache.copy_(model.encoder.encode_all(tokens))
        assert not np.allclose(before.numpy(), exported, atol=1e-3)  # the seed really made other weights
        np.testing.assert_allclose(model.item_vectors().numpy(), exported, atol=1e-5)
        lora = {n: p for n, p in model.encoder.named_parameters() if "lora_" in n}
        trained = dict(result.model.encoder.named_parameters())
        assert lora and all(torch.equal(p, trained[n]) for n, p in lora.items())


def test_items_are_matched_by_id_and_new_items_start_from_their_text(tiny_model):
    data, result, model_dir = tiny_model
    spec = load_model(model_dir, with_backbone=False).spec
    old_ids = data.items["item_id"].to_list()
    new_ids = [*old_ids[5:], "BRAND-NEW-1", "BRAND-NEW-2"]  # five items gone, two added, order shifted
    config = TwoTowerConfig(len(new_ids), spec.training.embedding_dim, spec.training.temperature)
    model = TwoTowerModel(None, result.model.text_projection.in_features, config)
    fresh_bias = model.item_bias.detach().clone()
    summary = apply_warm_start(model, spec, new_ids, model_dir)
    assert (summary.items_kept, summary.items_new, summary.items_dropped) == (len(old_ids) - 5, 2, 5)
    with torch.no_grad():
        assert torch.equal(model.id_embedding.weight[:-2], result.model.id_embedding.weight[5:])
        assert torch.equal(model.item_bias[:-2], result.model.item_bias[5:])
        assert torch.equal(model.item_bias[-2:], fresh_bias[-2:])
        assert torch.equal(model.click_head.net[0].weight, result.model.click_head.net[0].weight)


def test_a_revision_of_another_shape_or_backbone_is_refused(tiny_model):
    data, result, model_dir = tiny_model
    spec = load_model(model_dir, with_backbone=False).spec
    ids = data.items["item_id"].to_list()
    wider = TwoTowerModel(None, result.model.text_projection.in_features, TwoTowerConfig(len(ids), 48))
    with pytest.raises(WarmStartMismatch, match=r"is \(.*32.*\) in .* but \(.*48.*\) for this spec"):
        apply_warm_start(wider, spec, ids, model_dir)
    other = spec.model_copy(update={"backbone": spec.backbone.model_copy(update={"name": "builtin:minilm"})})
    with pytest.raises(WarmStartMismatch, match="trained on backbone 'builtin:tiny-qwen2'"):
        apply_warm_start(wider, other, ids, model_dir)
    with pytest.raises(WarmStartMismatch, match="not an exported model directory"):
        apply_warm_start(wider, spec, ids, model_dir.parent)


def test_training_from_a_warm_start_continues_from_the_last_revision(tiny_model, tmp_path):
    data, result, model_dir = tiny_model
    spec = load_model(model_dir, with_backbone=False).spec
    again = train(spec, data, tmp_path / "checkpoints", warm_start=model_dir)
    assert again.warm_start is not None and again.warm_start.items_kept == data.n_items
    # One more epoch from the trained weights: the validation recall does not start over.
    assert again.state.valid[0]["recall@20"] >= result.state.valid[0]["recall@20"] - 0.05
