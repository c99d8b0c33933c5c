"""Training end to end on small data made in code: train → export → reload → identical scores.

These train real models (a tiny random Qwen2 with LoRA on q_proj/v_proj, and
the pretrained MiniLM from its wheel) on CPU; each takes seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recops.api.recmodel import RecModelSpec
from recops.data.prepare import prepare
from recops.training.evaluation import evaluate
from recops.training.export import load_model
from recops.training.run import run_training
from recops.training.trainer import CheckpointMismatch, ModelScorer, train

pytestmark = pytest.mark.slow


def _spec(backbone: str = "builtin:tiny-qwen2", **training) -> RecModelSpec:
    return RecModelSpec.model_validate(
        {
            "data": {"source": "synthetic", "synthetic": {"users": 150, "items": 80, "days": 10, "seed": 1}},
            "backbone": {"name": backbone, "maxSeqLength": 16},
            "lora": {"r": 4, "alpha": 8},
            "training": {"epochs": 2, "batchSize": 128, "embeddingDim": 32, "textItemsPerStep": 8,
                         "checkpointEverySteps": 2, **training},
        }
    )


@pytest.fixture(scope="module")
def data():
    return prepare(_spec().data)


def _scores(model, histories, users):
    return ModelScorer(model, histories).score_users(users)


def test_lora_wraps_the_qwen_attention_projections(data, tmp_path):
    result = train(_spec(epochs=1), data, tmp_path)
    names = [n for n, p in result.model.named_parameters() if p.requires_grad and n.startswith("encoder.")]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}


def test_train_export_reload_gives_identical_scores(data, tmp_path):
    spec = _spec()
    summary = run_training(spec, tmp_path / "model", baselines=["pop"], data=data)
    assert {"twotower", "pop"} <= set(summary["metrics"])
    loaded = load_model(tmp_path / "model")
    # The exported item index is what the model computes after reload.
    with torch.no_grad():
        assert np.allclose(loaded.model.item_vectors().numpy(), loaded.item_index, atol=1e-6)
    reloaded = evaluate(ModelScorer(loaded.model, _histories(data, spec)), data)
    assert reloaded["recall@20"] == pytest.approx(summary["metrics"]["twotower"]["recall@20"], abs=1e-9)
    for name in ("report.html", "metrics.json", "feature_schema.json", "adapter/adapter_config.json",
                 "towers.safetensors", "item_index.npy", "spec.yaml"):
        assert (tmp_path / "model" / name).is_file(), name


def _histories(data, spec):
    from recops.data.features import history_matrix

    return history_matrix(data.train, data.n_users, spec.data.history_length)


@pytest.mark.parametrize("tower", ["sequence", "pooled"])
def test_training_is_deterministic_and_resumes_where_it_stopped(data, tmp_path, tower):
    spec = _spec(userTower=tower, batchSize=48)
    users = np.arange(data.n_users)
    straight = train(spec, data, tmp_path / "straight")

    class Killed(Exception):
        pass

    def kill_after_five(done, total, losses):
        if done == 5:  # in the middle of the second epoch
            raise Killed

    with pytest.raises(Killed):
        train(spec, data, tmp_path / "resumed", on_step=kill_after_five)
    resumed = train(spec, data, tmp_path / "resumed")
    assert np.allclose(_scores(straight.model, straight.histories, users),
                       _scores(resumed.model, resumed.histories, users), atol=1e-5)
    assert len(resumed.state.losses) == len(straight.state.losses)


def test_a_checkpoint_of_another_spec_is_not_resumed(data, tmp_path):
    train(_spec(epochs=1), data, tmp_path)
    with pytest.raises(CheckpointMismatch, match="another spec"):
        train(_spec(epochs=1, learningRate=0.01), data, tmp_path)
    train(_spec(epochs=1, learningRate=0.01), data, tmp_path, restart=True)


def test_minilm_backbone_learns_the_hidden_synthetic_preferences(tmp_path):
    """Scores correlate with the generator's true click probabilities (a random model gives ~0)."""
    from scipy.stats import spearmanr

    from recops.data.synthetic import SyntheticConfig, generate

    # The pooled tower: the synthetic shop's users have fixed tastes, and its split is by time, where the
    # sequence tower learns less from so few users (mean correlation 0.094 against the pooled tower's > 0.1).
    spec = _spec("builtin:minilm", epochs=3, embeddingDim=64, userTower="pooled")
    spec = spec.model_copy(update={"data": spec.data.model_copy(
        update={"synthetic": spec.data.synthetic.model_copy(update={"users": 600, "items": 200, "days": 20})})})
    data = prepare(spec.data)
    result = train(spec, data, tmp_path)
    scores = ModelScorer(result.model, result.histories).score_users(np.arange(data.n_users))
    truth = generate(SyntheticConfig(n_users=600, n_items=200, days=20, seed=1))
    item_ids = data.items["item_id"].to_list()
    correlations = [
        spearmanr(scores[user], truth.click_probability([data.user_ids[user]], item_ids)).statistic
        for user in range(0, data.n_users, 3)
    ]
    assert np.nanmean(correlations) > 0.1
    metrics = evaluate(ModelScorer(result.model, result.histories), data)
    assert metrics["recall@20"] > 2 * 20 / data.warm_mask.sum()  # twice a random ranking
    assert metrics["cold_recall@10"] > 10 / len(data.cold_items)  # text places cold items
