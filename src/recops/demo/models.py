"""The demo's two models: a small control and the LLM two-tower treatment, on the same data.

Control: a two-tower whose item text comes from a tiny randomly initialised Qwen2 (so it learns
from IDs and co-occurrence alone, like a collaborative baseline). Treatment: the product default,
MiniLM (shipped in a wheel) with LoRA, which reads item text and so learns the shop's hidden
preferences over categories and words. ``worse_treatment`` swaps them: the rollout must then
roll back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from recops.api.recmodel import RecModelSpec

# One shop size for both: on the 2,000-user shop every model, popularity included, reaches about the
# same Recall@10 (0.20-0.21) and the online A/B shows no difference to promote; on this one the
# text model is clearly better (Recall@10 0.29 vs 0.18), which is what the demo is there to show.
SHOP = {"full": {"users": 500, "items": 300, "days": 20}, "quick": {"users": 500, "items": 300, "days": 20}}


# The demo's towers keep the settings its A/B figures were measured with (mean-pooled user tower, no
# item-to-item residual): a control that learns co-occurrence from a residual is no longer the weak
# collaborative arm the demo contrasts with text.
DEMO_TOWER = {"userTower": "pooled", "temperature": 0.07, "historyDropout": 0.3, "recencyPositions": 0,
              "nextItemFraction": 0.0, "neighbours": 0}


@dataclass(frozen=True)
class DemoModels:
    """The two RecModel specs the demo trains, by arm."""

    control: RecModelSpec
    treatment: RecModelSpec


def _spec(data: dict[str, Any], backbone: str, epochs: int, text_items: int, lora_r: int, seed: int,
          batch_size: int = 256) -> RecModelSpec:
    return RecModelSpec.model_validate({
        "data": data,
        "backbone": {"name": backbone, "maxSeqLength": 32},
        "lora": {"r": lora_r, "alpha": 2 * lora_r},
        "training": {"epochs": epochs, "batchSize": batch_size, "embeddingDim": 64, "textItemsPerStep": text_items,
                     "seed": seed, **DEMO_TOWER},
        "serving": {"maxBatchSize": 64, "maxQueueDelayMicroseconds": 1000},
    })


def synthetic_data_spec(quick: bool, seed: int) -> dict[str, Any]:
    """The ``spec.data`` of the demo's synthetic shop."""
    size = SHOP["quick" if quick else "full"]
    return {"source": "synthetic", "synthetic": {**size, "seed": seed}, "split": "time"}


def movielens_data_spec(data_dir: str) -> dict[str, Any]:
    """The ``spec.data`` of MovieLens-100K (ratings as clicks, ≥ 4 as likes), split by time.

    Users read their last 50 ratings (not 200): 80,000 training ratings make 160 times the
    synthetic shop's steps, and the history is most of a step's cost on CPU."""
    return {"source": "movielens", "movielensDir": data_dir, "split": "time", "historyLength": 50}


def demo_models(data: dict[str, Any], quick: bool, worse_treatment: bool = False, seed: int = 0) -> DemoModels:
    """Control and treatment specs; ``worse_treatment`` makes the treatment the weaker model.

    On MovieLens (80,000 training ratings against the shop's few thousand) the treatment trains
    one epoch with frozen text (``--quick``) or two with 8 texts re-encoded per step, in batches
    of 1,024, so that the demo stays within ten minutes on two cores."""
    if data["source"] == "movielens":
        weak = _spec(data, "builtin:tiny-qwen2", epochs=1, text_items=0, lora_r=4, seed=seed, batch_size=1024)
        strong = _spec(data, "builtin:minilm", epochs=1 if quick else 2, text_items=0 if quick else 8, lora_r=16,
                       seed=seed, batch_size=1024)
        return DemoModels(control=strong, treatment=weak) if worse_treatment else DemoModels(weak, strong)
    weak = _spec(data, "builtin:tiny-qwen2", epochs=1, text_items=0, lora_r=4, seed=seed)
    strong = _spec(data, "builtin:minilm", epochs=2 if quick else 3, text_items=16 if quick else 32, lora_r=16,
                   seed=seed)
    return DemoModels(control=strong, treatment=weak) if worse_treatment else DemoModels(control=weak, treatment=strong)
