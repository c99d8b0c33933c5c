"""Knowledge distillation: a student learns from a teacher's click and like scores as well as the labels.

The seed served a 72B teacher through a 1.8B student. Here the teacher is any exported recops model;
the student is what ``spec`` describes (typically a smaller backbone). For each pair the student's
head sees in training (the positive and its negatives), the teacher's logits z_t give soft targets
sigmoid(z_t / T), and each head's loss becomes

    (1 - w) * BCE(z_s, label) + w * T² * BCE(z_s / T, sigmoid(z_t / T))

(the T² keeps the soft term's gradients on the scale of the hard one's, as in Hinton et al.). The
teacher reads the student's users through its own towers: their histories are mapped to the teacher's
item rows by item id; pairs with an item the teacher does not know keep the hard loss only.

The heads do not make Recall@K: retrieval ranks by the dot product u·v / τ + bias. With
``retrievalWeight`` rw the retrieval loss (a softmax over the step's candidates: the catalog, or the
batch's items for large catalogs) also learns the teacher's ranking of the same candidates:

    (1 - rw) * CE(s_s, target) + rw * T² * KL(softmax(s_t / T) || softmax(s_s / T))

where s_t are the teacher's retrieval logits for the same users and candidates. Candidates the
teacher does not know leave both distributions. The teacher reads each user's history as the student
does in that step, minus the target (so its soft target is a prediction, not the answer), but
without the student's history dropout (a regulariser of the student, not of its targets).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from recops.api.recmodel import DistillationSpec
from recops.data.features import Histories
from recops.data.io import resolve_uri
from recops.kernels import head_features
from recops.models.two_tower import TwoTowerModel
from recops.training.export import load_model


class TeacherError(ValueError):
    """The teacher cannot be used (missing, or it shares no item with the student)."""


@dataclass
class Teacher:
    """The teacher's towers over the student's users and items (rows in the student's item order)."""

    model: TwoTowerModel
    user_vectors: torch.Tensor  # student users × teacher d
    item_vectors: torch.Tensor  # student items × teacher d (zero rows for items the teacher lacks)
    known: torch.Tensor  # bool per student item: the teacher has it
    spec: DistillationSpec
    teacher_rows: torch.Tensor  # per student item, the teacher's row (-1: unknown)
    teacher_index: torch.Tensor  # the teacher's item vectors in its own order (what its user tower reads)
    item_bias: torch.Tensor  # per student item, the teacher's retrieval bias (0 for unknown items)

    @property
    def distils_retrieval(self) -> bool:
        """The retrieval loss learns from this teacher too (``retrievalWeight`` > 0)."""
        return self.spec.retrieval_share() > 0

    @torch.no_grad()
    def retrieval_logits(
        self, history: torch.Tensor, mask: torch.Tensor, items: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher retrieval logits (B × C) of the users with ``history``/``mask`` (B × L, student item rows)
        against ``items`` (C student item rows; default the whole catalog), and which of those it knows (C)."""
        rows = self.teacher_rows[history]
        readable = mask & (rows >= 0)
        users = self.model.user_vectors(self.teacher_index, rows.clamp(min=0), readable)
        if items is None:
            vectors, bias, known = self.item_vectors, self.item_bias, self.known
        else:
            vectors, bias, known = self.item_vectors[items], self.item_bias[items], self.known[items]
        logits = users @ vectors.T / self.model.config.temperature + bias
        residual = self.model.history_scores(rows.clamp(min=0), readable)  # over the teacher's own items
        if residual is not None:
            columns = self.teacher_rows if items is None else self.teacher_rows[items]
            logits = logits + torch.where(columns >= 0, residual[:, columns.clamp(min=0)], 0.0)
        return logits.float(), known

    @torch.no_grad()
    def logits(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher click and like logits of ``users`` (B) against ``items`` (B × K), and the known-pair mask."""
        rows = users.unsqueeze(1).expand_as(items)
        features = head_features(self.user_vectors[rows], self.item_vectors[items])
        click, like = self.model.heads(features)
        return click.float(), like.float(), self.known[items]

    def to(self, device: torch.device) -> Teacher:
        self.model.to(device)
        self.user_vectors, self.item_vectors = self.user_vectors.to(device), self.item_vectors.to(device)
        self.known = self.known.to(device)
        self.teacher_rows, self.teacher_index = self.teacher_rows.to(device), self.teacher_index.to(device)
        self.item_bias = self.item_bias.to(device)
        return self


def load_teacher(spec: DistillationSpec, item_ids: list[str], histories: Histories) -> Teacher:
    """The teacher of ``spec`` read for the student's catalog ``item_ids`` and users' ``histories``."""
    directory = Path(resolve_uri(spec.teacher))
    if not (directory / "towers.safetensors").is_file():
        raise TeacherError(f"spec.distillation.teacher: {directory} is not an exported model directory")
    loaded = load_model(directory, with_backbone=False)
    teacher_row = {item_id: row for row, item_id in enumerate(loaded.item_ids)}
    rows = torch.tensor([teacher_row.get(item_id, -1) for item_id in item_ids])
    known = rows >= 0
    if not bool(known.any()):
        raise TeacherError(f"spec.distillation.teacher: {directory} knows none of the student's items")
    index = torch.as_tensor(loaded.item_index)
    item_vectors = torch.zeros(len(item_ids), index.shape[1])
    item_vectors[known] = index[rows[known]]
    history = torch.as_tensor(histories.items)
    mapped = rows[history]
    mask = torch.as_tensor(histories.mask) & (mapped >= 0)
    item_bias = torch.zeros(len(item_ids))
    with torch.no_grad():
        user_vectors = loaded.model.user_vectors(index, mapped.clamp(min=0), mask)
        item_bias[known] = loaded.model.item_biases()[rows[known]]
    return Teacher(loaded.model, user_vectors, item_vectors, known, spec, rows, index, item_bias)


def distilled_bce(
    student: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, known: torch.Tensor, spec: DistillationSpec
) -> torch.Tensor:
    """(1 - w) · BCE on the labels + w · T² · BCE on the teacher's softened scores (known pairs only)."""
    hard = F.binary_cross_entropy_with_logits(student, labels)
    if not bool(known.any()):
        return hard
    t = spec.temperature
    soft_targets = torch.sigmoid(teacher / t)
    soft = F.binary_cross_entropy_with_logits(student[known] / t, soft_targets[known]) * t * t
    return (1 - spec.weight) * hard + spec.weight * soft


def softmax_kl(
    student: torch.Tensor, teacher: torch.Tensor, candidates: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher / T) || softmax(student / T)), both softmaxes over ``candidates``.

    ``student``/``teacher``: B × C logits; ``candidates``: bool, B × C or C. Rows without a candidate
    count zero (they have no distribution to match).
    """
    candidates = candidates.expand_as(student)
    # A finite fill, not -inf: masked entries then give 0 · (finite) = 0 instead of NaN, forwards and backwards.
    fill = -1e9
    log_student = F.log_softmax((student.float() / temperature).masked_fill(~candidates, fill), dim=-1)
    log_teacher = F.log_softmax((teacher.float() / temperature).masked_fill(~candidates, fill), dim=-1)
    terms = torch.where(candidates, log_teacher.exp() * (log_teacher - log_student), 0.0)
    rows = candidates.any(dim=-1)
    return terms.sum(dim=-1)[rows].sum() / rows.sum().clamp(min=1)


def distilled_softmax(
    student: torch.Tensor,
    targets: torch.Tensor,
    teacher: torch.Tensor,
    candidates: torch.Tensor,
    spec: DistillationSpec,
) -> torch.Tensor:
    """(1 - rw) · CE on the targets + rw · T² · KL from the teacher's softened distribution (known candidates).

    ``student``: B × C retrieval logits as the hard loss reads them (excluded columns already pushed
    down); ``candidates``: the columns both distributions span (B × C or C).
    """
    hard = F.cross_entropy(student.float(), targets)
    share = spec.retrieval_share()
    if share == 0 or not bool(candidates.any()):
        return hard
    t = spec.temperature
    soft = softmax_kl(student, teacher, candidates, t) * t * t
    return (1 - share) * hard + share * soft
