"""Training the two-tower model: what ``recops train`` and the trainer image run.

The loop is deterministic for a seed and resumable: every random draw of a
step comes from a generator seeded by (seed, epoch, step), and a checkpoint
holds the model, the optimiser and the position, so a restarted run continues
exactly where the killed one stopped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from recops.api.recmodel import LossWeights, RecModelSpec
from recops.data.features import Histories, Sequences, history_columns, history_matrix, sequence_matrix
from recops.data.interactions import ITEM_IDX, LIKE, USER_IDX, InteractionData
from recops.data.samples import click_samples, negatives_by_positive
from recops.models.backbone import TextEncoder, TokenizedTexts, build_text_encoder
from recops.models.epochs import length_batches
from recops.models.neighbours import cosine_neighbours, neighbour_table
from recops.models.two_tower import TwoTowerModel, tower_config
from recops.training.distillation import Teacher, distilled_bce, distilled_softmax, load_teacher
from recops.training.distributed import World, barrier, stepper, world_from_env
from recops.training.evaluation import evaluate
from recops.training.warm_start import WarmStart, apply_warm_start

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
# Above this many items the retrieval softmax uses in-batch negatives instead of the whole catalog.
FULL_SOFTMAX_MAX_ITEMS = 50_000
# What each epoch's validation selects the best epoch by and early stopping watches: NDCG@10 for the sequence
# tower (what the sequential-recommendation papers select on); Recall@20 for the pooled one, as it was tuned
# (selecting it by NDCG@10 kept later epochs that ranked cold items worse on the synthetic shop).
VALIDATION_METRIC = "ndcg@10"
POOLED_VALIDATION_METRIC = "recall@20"


@dataclass
class TrainState:
    """Where a run is: what a checkpoint stores besides the tensors."""

    epoch: int = 0
    step: int = 0  # steps done within ``epoch``
    losses: list[dict[str, float]] = field(default_factory=list)
    valid: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = -math.inf


@dataclass
class TrainResult:
    """A trained model with what the report needs."""

    model: TwoTowerModel
    tokens: TokenizedTexts
    histories: Histories
    state: TrainState
    seconds: float
    warm_start: WarmStart | None = None


def spec_digest(spec: RecModelSpec) -> str:
    """Hash of the settings that shape training: a checkpoint only resumes the same spec."""
    relevant = spec.model_dump(mode="json", include={"data", "backbone", "lora", "training"})
    relevant["training"].pop("checkpointEverySteps", None)
    relevant["training"].pop("checkpoint_every_steps", None)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def training_device(spec: RecModelSpec, world: World | None = None) -> torch.device:
    """The GPU of this process (``LOCAL_RANK`` under torchrun) when the spec asks for GPUs, else the CPU."""
    if torch.cuda.is_available() and spec.training.resources.gpu > 0:
        return torch.device("cuda", world.local_rank if world is not None else 0)
    return torch.device("cpu")


class ModelScorer:
    """Adapts a trained model to the evaluation's Scorer protocol."""

    def __init__(self, model: TwoTowerModel, histories: Histories) -> None:
        self.model = model
        self.histories = histories
        with torch.no_grad():
            self.item_vectors = model.item_vectors()

    def conditioned(self, data: InteractionData, inputs: pl.DataFrame) -> ModelScorer:
        """The same model reading each user's history from ``inputs`` (leave-one-out's test: train + valid)."""
        scorer = copy.copy(self)
        scorer.histories = history_matrix(inputs, data.n_users, self.histories.items.shape[1])
        return scorer

    def user_vectors(self, users: np.ndarray) -> torch.Tensor:
        history = torch.as_tensor(self.histories.items[users])
        mask = torch.as_tensor(self.histories.mask[users])
        return self.model.user_vectors(self.item_vectors, history, mask)

    @torch.no_grad()
    def score_users(self, users: np.ndarray) -> np.ndarray:
        history = torch.as_tensor(self.histories.items[users])
        residual = self.model.history_scores(history, torch.as_tensor(self.histories.mask[users]))
        logits = self.model.retrieval_logits(self.user_vectors(users), self.item_vectors, residual=residual)
        return logits.float().numpy()

    @torch.no_grad()
    def score_pairs(self, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Pairs repeat users many times: encode each distinct user once (memory is users × history × dim).
        distinct, inverse = np.unique(users, return_inverse=True)
        user_vectors = self.user_vectors(distinct)[torch.as_tensor(inverse)]
        click, like = self.model.head_logits(user_vectors, self.item_vectors[torch.as_tensor(items)])
        return click.float().numpy(), like.float().numpy()


def build_model(spec: RecModelSpec, data: InteractionData) -> tuple[TwoTowerModel, TokenizedTexts]:
    """A fresh model for a spec and dataset (backbone + LoRA + towers), text cache filled."""
    encoder: TextEncoder = build_text_encoder(spec.backbone, spec.lora, seed=spec.training.seed)
    tokens = encoder.tokenize(data.item_texts)
    config = tower_config(spec, data.n_items)
    torch.manual_seed(spec.training.seed)
    model = TwoTowerModel(encoder, encoder.hidden_size, config)
    model.warm.copy_(torch.as_tensor(data.warm_mask))
    model.text_cache.copy_(encoder.encode_all(tokens))
    if config.neighbours:
        tables = neighbour_table(cosine_neighbours(data.train_matrix(), config.neighbours), config.neighbours)
        model.set_neighbours(*(torch.as_tensor(table) for table in tables))
    return model, tokens


def _optimizer(model: TwoTowerModel, spec: RecModelSpec) -> torch.optim.Optimizer:
    backbone = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("encoder.")]
    others = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.")]
    groups = [{"params": others, "lr": spec.training.learning_rate}]
    if backbone:
        groups.append({"params": backbone, "lr": spec.training.backbone_learning_rate})
    return torch.optim.AdamW(groups, weight_decay=spec.training.weight_decay)


def _save_checkpoint(path: Path, model: TwoTowerModel, optimizer, state: TrainState, digest: str, best) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {"model": model.trainable_state(), "optimizer": optimizer.state_dict(), "state": state.__dict__,
         "digest": digest, "best": best},
        tmp,
    )
    tmp.replace(path)  # atomic: a kill during the write leaves the previous checkpoint intact


class CheckpointMismatch(RuntimeError):
    """The output folder holds a checkpoint of a different spec."""


def _load_checkpoint(path: Path, model: TwoTowerModel, optimizer, digest: str) -> tuple[TrainState, dict | None]:
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved["digest"] != digest:
        raise CheckpointMismatch(
            f"{path} was written for another spec (hash {saved['digest']}, this spec {digest}); "
            "use another --out, or --restart to discard it"
        )
    model.load_state_dict(saved["model"], strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    return TrainState(**saved["state"]), saved["best"]


def _seed_step(seed: int, epoch: int, step: int) -> torch.Generator:
    """Seed every random draw of one step (ours and the backbone's dropout) from its position."""
    step_seed = int(np.random.SeedSequence([seed, epoch, step]).generate_state(1)[0])
    torch.manual_seed(step_seed)
    return torch.Generator().manual_seed(step_seed)


def train(
    spec: RecModelSpec,
    data: InteractionData,
    out: Path,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    restart: bool = False,
    warm_start: Path | None = None,
) -> TrainResult:
    """Train a two-tower model on ``data``; checkpoints go to ``out`` and a rerun resumes.

    Under ``torchrun`` each process trains on its shard of every batch with DDP
    (:mod:`recops.training.distributed`); rank 0 writes the checkpoints.

    ``warm_start``: an exported model directory (the last revision) to start from instead of fresh
    weights (:mod:`recops.training.warm_start`); a checkpoint in ``out`` still wins, so a retrain
    that was interrupted resumes where it stopped.

    ``on_step(done, total, losses)`` is called after every step (progress bars).
    The returned model holds the weights of the epoch with the best validation
    Recall@20 (or the last epoch when there is no validation data).
    """
    started = time.perf_counter()
    cfg = spec.training
    world = world_from_env()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = training_device(spec, world)
    model, tokens = build_model(spec, data)
    started_from = None
    if warm_start is not None:
        started_from = apply_warm_start(model, spec, data.items["item_id"].to_list(), warm_start)
        with torch.no_grad():  # the catalog's text through the carried-over backbone
            model.text_cache.copy_(model.encoder.encode_all(tokens))
    model.to(device)
    optimizer = _optimizer(model, spec)
    digest = spec_digest(spec)
    checkpoint = out / CHECKPOINT
    state, best = TrainState(), None
    if checkpoint.exists() and not restart:
        state, best = _load_checkpoint(checkpoint, model, optimizer, digest)

    histories = history_matrix(data.train, data.n_users, spec.data.history_length)
    teacher = None
    if spec.distillation is not None:
        teacher = load_teacher(spec.distillation, data.items["item_id"].to_list(), histories).to(device)
    hist_items = torch.as_tensor(histories.items, device=device)
    hist_mask = torch.as_tensor(histories.mask, device=device)
    pos_users = data.train[USER_IDX].to_numpy()
    pos_items = data.train[ITEM_IDX].to_numpy()
    pos_likes = data.train[LIKE].to_numpy()
    pos_columns = history_columns(data.train, spec.data.history_length)  # each target's place in its history
    next_item_fraction = cfg.next_item(spec.data.split)
    exposures = data.exposures
    exp_users = exposures[USER_IDX].to_numpy() if exposures is not None else np.zeros(0, dtype=np.int64)
    exp_items = exposures[ITEM_IDX].to_numpy() if exposures is not None else np.zeros(0, dtype=np.int64)
    warm_items = np.flatnonzero(data.warm_mask)
    cold = torch.as_tensor(~data.warm_mask, device=device)
    full_softmax = data.n_items <= FULL_SOFTMAX_MAX_ITEMS
    # The user's other training positives are not negatives of this target: they leave the softmax.
    known = data.train_matrix().tocsr() if full_softmax else None
    # A causal sequence tower learns from every position of every sequence in one pass (as SASRec), unless
    # a teacher's per-sample scores are distilled: then, and for the other towers, one target per sample.
    sequences = None
    if model.config.sequence_blocks and model.config.causal and teacher is None:
        sequences = sequence_matrix(data.train, data.n_users, model.config.sequence_length + 1)
        trainable_users = sequences.trainable()
    n_units = len(trainable_users) if sequences is not None else len(pos_users)
    steps_per_epoch = max(1, math.ceil(n_units / cfg.batch_size))
    if world.size > 1 and n_units % cfg.batch_size and n_units % cfg.batch_size < world.size:
        steps_per_epoch -= 1  # a last batch too small to give every process a sample is left out
    max_epochs, patience = cfg.max_epochs(spec.data.split), cfg.stopping_patience()
    metric = VALIDATION_METRIC if model.config.sequence_blocks else POOLED_VALIDATION_METRIC
    total_steps = steps_per_epoch * max_epochs
    train_backbone = any(p.requires_grad for p in model.encoder.parameters()) and cfg.text_items_per_step > 0
    use_amp = device.type == "cuda"
    run_step = stepper(model, world, device)
    context = StepContext(hist_items, hist_mask, tokens, teacher, cfg.loss_weights, device, use_amp, cold)

    stopped = state.epoch > 0 and state.epoch - 1 - state.best_epoch >= patience  # a resumed, finished run
    for epoch in range(state.epoch, max_epochs if not stopped else state.epoch):
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(len(pos_users))
        samples = click_samples(
            pos_users, pos_items, pos_likes, exp_users, exp_items, warm_items, data.n_items, cfg.negatives, rng
        )
        paired_negatives = negatives_by_positive(samples, pos_users, cfg.negatives)
        if sequences is not None:
            # Under DDP a batch too small to give every process a sequence is left out (as above).
            user_batches = [b for b in length_batches(sequences.lengths, trainable_users, cfg.batch_size, rng)
                            if len(b) >= world.size]
        model.train()
        for step in range(state.step, steps_per_epoch):
            generator = _seed_step(cfg.seed, epoch, step)
            fresh_items = None
            if sequences is not None:
                id_keep = torch.rand(data.n_items, generator=generator).to(device) >= model.config.id_dropout
                step_users = user_batches[step]
                if train_backbone:
                    fresh_items = _pick_fresh(sequences.items[step_users][sequences.mask[step_users]],
                                              cfg.text_items_per_step, generator, device)
                seq_batch = _sequence_batch(sequences, step_users, world, paired_negatives, pos_likes, id_keep,
                                            fresh_items, device)
                loss, retrieval, click_loss, like_loss, fresh_text = run_step(
                    partial(_sequence_step_loss, batch=seq_batch, context=context))
            else:
                # The step's random draws are made for the whole global batch, on every process, then sharded.
                full = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                rows = slice(world.rank, None, world.size)
                batch = full[rows]
                users = torch.as_tensor(pos_users[batch], device=device)
                items = torch.as_tensor(pos_items[batch], device=device)
                likes = torch.as_tensor(pos_likes[batch], dtype=torch.float32, device=device)
                neg_items = torch.as_tensor(paired_negatives[batch], device=device)  # B × negatives
                if train_backbone:
                    fresh_items = _pick_fresh(pos_items[full], cfg.text_items_per_step, generator, device)
                id_keep = torch.rand(data.n_items, generator=generator).to(device) >= model.config.id_dropout
                hidden = torch.rand((len(full), hist_items.shape[1]), generator=generator)[rows].to(device)
                hidden = hidden < cfg.history_dropout
                # Next-item samples read only what came before their target; the others every other item.
                next_item = (torch.rand(len(full), generator=generator)[rows] < next_item_fraction).to(device)
                readable = None
                if next_item_fraction > 0:
                    target_columns = torch.as_tensor(pos_columns[batch], device=device).unsqueeze(1)
                    columns = torch.arange(hist_items.shape[1], device=device)
                    readable = ~next_item.unsqueeze(1) | (columns < target_columns)

                excluded = None
                if full_softmax:
                    excluded = torch.as_tensor(known[pos_users[batch]].toarray() > 0, device=device) | cold
                step_batch = StepBatch(users, items, likes, neg_items, fresh_items, id_keep, hidden, excluded,
                                       readable)
                loss, retrieval, click_loss, like_loss, fresh_text = run_step(partial(_step_loss, batch=step_batch,
                                                                                       context=context))

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if fresh_items is not None:
                model.text_cache[fresh_items] = fresh_text.detach()

            _record_step(state, epoch, step, steps_per_epoch, total_steps, loss, retrieval, click_loss, like_loss,
                         on_step)
            if state.step % cfg.checkpoint_every_steps == 0 and world.is_main:
                _save_checkpoint(checkpoint, model, optimizer, state, digest, best)

        if train_backbone:  # rows not re-encoded this epoch are stale: refresh them all
            model.text_cache.copy_(model.encoder.encode_all(tokens))
        model.eval()
        scores = {**_validation(model, histories, data, epoch), "seconds": time.perf_counter() - started}
        state.valid.append(scores)
        log.info("epoch %d: %s", epoch, scores)
        # The best epoch's weights are kept (a tie goes to the later epoch).
        if scores.get(metric, 0.0) >= state.best_score or data.valid.height == 0:
            state.best_score = scores.get(metric, 0.0)
            state.best_epoch = epoch
            best = copy.deepcopy(model.trainable_state())
        state.epoch, state.step = epoch + 1, 0
        if world.is_main:
            _save_checkpoint(checkpoint, model, optimizer, state, digest, best)
        barrier(world)  # a resumed run reads this checkpoint on every process
        if epoch - state.best_epoch >= patience:
            log.info("validation %s has not improved for %d epochs: stopping at epoch %d (best %d: %.4f)",
                     metric, patience, epoch, state.best_epoch, state.best_score)
            break

    if best is not None:
        model.load_state_dict(best, strict=False)
    model.eval()
    return TrainResult(model, tokens, histories, state, time.perf_counter() - started, started_from)


@dataclass(frozen=True)
class StepBatch:
    """One process's share of a step: its samples and the step's random draws."""

    users: torch.Tensor
    items: torch.Tensor
    likes: torch.Tensor
    negatives: torch.Tensor
    fresh_items: torch.Tensor | None  # items whose text is re-encoded this step (with gradients)
    id_keep: torch.Tensor
    hidden: torch.Tensor  # history entries dropped this step
    excluded: torch.Tensor | None  # full softmax: each row's other positives and the cold items
    readable: torch.Tensor | None = None  # history entries a sample may read (next-item: before its target)


@dataclass(frozen=True)
class StepContext:
    """What every step reads."""

    hist_items: torch.Tensor
    hist_mask: torch.Tensor
    tokens: TokenizedTexts
    teacher: Teacher | None
    weights: LossWeights
    device: torch.device
    use_amp: bool
    cold: torch.Tensor | None = None  # N: items without training interactions

    @property
    def any_cold(self) -> bool:
        return self.cold is not None and bool(self.cold.any())


def _step_loss(m: TwoTowerModel, *, batch: StepBatch, context: StepContext) -> tuple[torch.Tensor | None, ...]:
    """A step's loss (and its parts) on ``m``: the function DDP runs as ``forward``."""
    device = context.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=context.use_amp):
        fresh_text = _fresh_text(m, batch.fresh_items, context)
        vectors = m.item_vectors(batch.fresh_items, fresh_text, batch.id_keep)
        history, seen = context.hist_items[batch.users], context.hist_mask[batch.users]
        seen = seen & (history != batch.items.unsqueeze(1))  # the target is what is predicted, not read
        if batch.readable is not None:
            seen = seen & batch.readable
        read = seen & ~batch.hidden
        user_vec = m.user_vectors(vectors, history, read)
        teacher = context.teacher if context.teacher is not None and context.teacher.distils_retrieval else None
        retrieval = _retrieval_loss(m, user_vec, vectors, batch.items, batch.excluded, teacher, history, seen,
                                    m.history_scores(history, read))
        click, like = _head_losses(
            m, user_vec, vectors, batch.items, batch.negatives, batch.likes, context.teacher, batch.users
        )
        weights = context.weights
        total = weights.retrieval * retrieval + weights.click * click + weights.like * like
    return total, retrieval, click, like, fresh_text


def _retrieval_loss(
    model: TwoTowerModel,
    users: torch.Tensor,
    vectors: torch.Tensor,
    items: torch.Tensor,
    excluded: torch.Tensor | None,
    teacher: Teacher | None = None,
    history: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The retrieval softmax loss of user vectors ``users`` (B) against their targets ``items`` (B).

    ``residual``: the users' item-to-item scores (B × N, :meth:`TwoTowerModel.history_scores`).

    With ``excluded`` (B × N: cold items, the user's other positives) the softmax spans the whole
    catalog less those; without it (large catalogs), the batch's positives. With a ``teacher`` that
    distils retrieval, the loss also learns its ranking of the same candidates; it reads the users'
    ``history`` (B × L) where ``seen`` (history less the target, before dropout).
    """
    arange = torch.arange(len(items), device=items.device)
    if excluded is not None:
        excluded = excluded.clone()
        excluded[arange, items] = False  # never the target itself
        logits = model.retrieval_logits(users, vectors, residual=residual).masked_fill(excluded, -1e4)
        targets, columns, candidates = items, None, ~excluded
    else:
        logits = model.retrieval_logits(users, vectors[items], items, residual)
        targets, columns, candidates = arange, items, None
    if teacher is None or history is None or seen is None:
        return F.cross_entropy(logits.float(), targets)
    teacher_logits, known = teacher.retrieval_logits(history, seen, columns)
    candidates = known if candidates is None else candidates & known
    return distilled_softmax(logits.float(), targets, teacher_logits, candidates, teacher.spec)


def _head_losses(
    model: TwoTowerModel,
    users: torch.Tensor,
    vectors: torch.Tensor,
    items: torch.Tensor,
    negatives: torch.Tensor,
    likes: torch.Tensor,
    teacher: Teacher | None = None,
    user_idx: torch.Tensor | None = None,
    share: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Click and like BCE: column 0 is each positive, columns 1..k its user's negatives (same user vector).

    With a ``teacher`` (distillation), each loss also pulls towards the teacher's softened scores. With
    ``share``, each loss is its sum over this process's rows divided by ``share`` rows (and the columns),
    instead of its mean (see :class:`SequenceBatch`).
    """
    pair_items = torch.cat([items.unsqueeze(1), negatives], dim=1)
    head_items = vectors[pair_items]
    click_logit, like_logit = model.head_logits(users.unsqueeze(1).expand_as(head_items), head_items)
    click_label = torch.zeros_like(click_logit, dtype=torch.float32)
    click_label[:, 0] = 1.0
    like_label = torch.zeros_like(like_logit, dtype=torch.float32)
    like_label[:, 0] = likes
    if teacher is not None and user_idx is not None:
        teacher_click, teacher_like, known = teacher.logits(user_idx, pair_items)
        return (
            distilled_bce(click_logit.float(), click_label, teacher_click, known, teacher.spec),
            distilled_bce(like_logit.float(), like_label, teacher_like, known, teacher.spec),
        )
    if share is not None:
        cells = share * pair_items.shape[1]
        return (
            F.binary_cross_entropy_with_logits(click_logit.float(), click_label, reduction="sum") / cells,
            F.binary_cross_entropy_with_logits(like_logit.float(), like_label, reduction="sum") / cells,
        )
    return (
        F.binary_cross_entropy_with_logits(click_logit.float(), click_label),
        F.binary_cross_entropy_with_logits(like_logit.float(), like_label),
    )


def _validation(model: TwoTowerModel, histories: Histories, data: InteractionData, epoch: int) -> dict[str, float]:
    if data.valid.height == 0:
        return {"epoch": epoch}
    metrics = evaluate(ModelScorer(model, histories), data, ks=(10, 20), split="valid", with_auc=False)
    return {"epoch": epoch, **{k: float(metrics[k]) for k in ("recall@20", VALIDATION_METRIC)}}


def _record_step(state: TrainState, epoch: int, step: int, steps_per_epoch: int, total_steps: int,
                 loss: torch.Tensor, retrieval: torch.Tensor, click: torch.Tensor, like: torch.Tensor,
                 on_step: Callable[[int, int, dict[str, float]], None] | None) -> None:
    """A finished step's losses into the state (and the progress callback)."""
    losses = {
        "epoch": epoch, "step": epoch * steps_per_epoch + step, "loss": float(loss.detach()),
        "retrieval": float(retrieval.detach()), "click": float(click.detach()), "like": float(like.detach()),
    }
    state.losses.append(losses)
    state.step = step + 1
    if on_step:
        on_step(epoch * steps_per_epoch + step + 1, total_steps, losses)


@dataclass(frozen=True)
class SequenceBatch:
    """One process's share of a sequence step: left-padded inputs and the targets after each position."""

    inputs: torch.Tensor  # B × L item indices
    mask: torch.Tensor  # B × L
    has_target: torch.Tensor  # B × L: positions followed by an item
    targets: torch.Tensor  # P: the item after each such position (P = has_target.sum())
    negatives: torch.Tensor  # P × negatives: click-head negatives of each target's interaction
    likes: torch.Tensor  # P
    id_keep: torch.Tensor
    fresh_items: torch.Tensor | None  # items whose text is re-encoded this step (LoRA)
    # The step's targets over all processes, per process: each process's sums are divided by it, so that
    # DDP's mean of their gradients is the gradient of the whole batch's mean (shards differ in targets).
    targets_per_process: float


def _sequence_batch(sequences: Sequences, step_users: np.ndarray, world: World, paired_negatives: np.ndarray,
                    likes: np.ndarray, id_keep: torch.Tensor, fresh_items: torch.Tensor | None,
                    device: torch.device) -> SequenceBatch:
    """This process's share of the step's users' sequences, cut to the longest of them."""
    users = step_users[world.rank :: world.size]
    step_targets = int(np.clip(sequences.lengths[step_users] - 1, 0, None).sum())
    width = int(sequences.lengths[users].max())
    items, mask = sequences.items[users, -width:], sequences.mask[users, -width:]
    rows = sequences.rows[users, -width:]
    has_target = mask[:, 1:] & mask[:, :-1]
    target_rows = rows[:, 1:][has_target]

    def tensor(array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.as_tensor(array, dtype=dtype, device=device)

    return SequenceBatch(tensor(items[:, :-1]), tensor(mask[:, :-1]), tensor(has_target),
                         tensor(items[:, 1:][has_target]), tensor(paired_negatives[target_rows]),
                         tensor(likes[target_rows], torch.float32), id_keep, fresh_items,
                         max(1, step_targets) / world.size)


def _pick_fresh(items: np.ndarray, count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Up to ``count`` of the distinct ``items`` of a step, drawn at random: those whose text is re-encoded."""
    distinct = torch.unique(torch.as_tensor(items, device=device))
    return distinct[torch.randperm(len(distinct), generator=generator)[:count].to(device)]


def _fresh_text(m: TwoTowerModel, items: torch.Tensor | None, context: StepContext) -> torch.Tensor | None:
    """The backbone's output, with gradients, for ``items`` (those whose text is trained this step)."""
    if items is None:
        return None
    rows = items.cpu()
    tokens = context.tokens
    return m.encoder(tokens.input_ids[rows].to(context.device), tokens.attention_mask[rows].to(context.device)).float()


def _sequence_step_loss(m: TwoTowerModel, *, batch: SequenceBatch, context: StepContext
                        ) -> tuple[torch.Tensor | None, ...]:
    """A sequence step's loss: at every position with a next item, the full softmax over the warm items
    towards it, and the click/like heads on it against its interaction's negatives."""
    with torch.autocast(context.device.type, dtype=torch.bfloat16, enabled=context.use_amp):
        fresh_text = _fresh_text(m, batch.fresh_items, context)
        vectors = m.item_vectors(batch.fresh_items, fresh_text, batch.id_keep)
        states = m.sequence_states(vectors, batch.inputs, batch.mask)[batch.has_target]
        # Cold items never appear as targets: the softmax leaves them alone (their text places them).
        logits = m.retrieval_logits(states, vectors, excluded=context.cold if context.any_cold else None)
        share = batch.targets_per_process
        retrieval = F.cross_entropy(logits.float(), batch.targets, reduction="sum") / share
        click, like = _head_losses(m, states, vectors, batch.targets, batch.negatives, batch.likes, share=share)
        weights = context.weights
        total = weights.retrieval * retrieval + weights.click * click + weights.like * like
    return total, retrieval, click, like, fresh_text
