"""Distillation: a student trained on a teacher's soft scores (head logits, retrieval ranking) agrees with the
teacher more than one trained on the labels alone; the spec's settings are validated; a teacher that cannot be
used is a clear error; the student's status shows its and its teacher's quality and serving cost."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from recops.api.loading import SpecError, parse_recmodel_spec
from recops.api.recmodel import LossWeights
from recops.data.features import history_matrix
from recops.training.distillation import TeacherError, distilled_bce, distilled_softmax, load_teacher, softmax_kl
from recops.training.export import load_model

pytestmark = pytest.mark.slow


def student_spec(teacher_dir, weight: float, retrieval_weight: float | None = None):
    distillation = {"teacher": f"file://{teacher_dir}", "temperature": 2.0, "weight": weight}
    if retrieval_weight is not None:
        distillation["retrievalWeight"] = retrieval_weight
    return parse_recmodel_spec({
        "data": {"source": "synthetic", "synthetic": {"users": 150, "items": 80, "days": 10, "seed": 4}},
        "backbone": {"name": "builtin:tiny-qwen2", "maxSeqLength": 16},
        "lora": {"r": 2, "alpha": 4},
        "training": {"epochs": 1, "batchSize": 128, "embeddingDim": 16, "textItemsPerStep": 0,
                     "neighbours": 8},  # a small student: a short item-to-item residual
        "distillation": distillation,
    })


def test_the_head_losses_pull_a_student_towards_its_teacher(tiny_model):
    """Only the click head trains, on the distilled loss: with weight 1 the student's click logits come to
    track the teacher's (whose click head is made steep, so that it has opinions); with weight 0 they do not."""
    from recops.training.trainer import _head_losses

    data, result, teacher_dir = tiny_model
    histories = history_matrix(data.train, data.n_users, 200)
    generator = torch.Generator().manual_seed(0)
    users = torch.randint(0, data.n_users, (256,), generator=generator)
    items = torch.randint(0, data.n_items, (256, 5), generator=generator)
    correlation = {}
    for weight in (0.0, 1.0):
        teacher = load_teacher(student_spec(teacher_dir, weight).distillation, data.items["item_id"].to_list(),
                               histories)
        with torch.no_grad():
            teacher.model.click_head.net[2].weight.mul_(50.0)
        student = copy.deepcopy(result.model)
        with torch.no_grad():
            vectors = student.item_vectors()
            user_vectors = student.user_vectors(vectors, torch.as_tensor(histories.items),
                                                torch.as_tensor(histories.mask))
        optimizer = torch.optim.Adam(student.click_head.parameters(), lr=0.01)
        for _ in range(150):
            click_loss, _ = _head_losses(student, user_vectors[users], vectors, items[:, 0], items[:, 1:],
                                         torch.zeros(256), teacher, users)
            optimizer.zero_grad()
            click_loss.backward()
            optimizer.step()
        with torch.no_grad():
            mine, _ = student.head_logits(user_vectors[users].unsqueeze(1).expand(-1, 5, -1), vectors[items])
            theirs, _, _ = teacher.logits(users, items)
        correlation[weight] = float(np.corrcoef(mine.flatten().numpy(), theirs.flatten().numpy())[0, 1])
    assert correlation[1.0] > 0.9 and correlation[1.0] > correlation[0.0] + 0.3, correlation


@pytest.mark.parametrize("catalog", [False, True], ids=["in-batch", "catalog"])
def test_the_retrieval_loss_pulls_the_students_ranking_towards_its_teachers(tiny_model, catalog):
    """Only the retrieval loss trains, through the training step itself: with retrievalWeight 1 the student's
    scores of a batch's candidates come to rank them as the teacher does (whose item vectors and biases are
    shuffled among the items, so that its ranking is not the student's own); with 0 they do not.
    Both softmaxes: over the batch's items (large catalogs) and over the whole catalog."""
    from recops.training.trainer import StepBatch, StepContext, _step_loss

    data, result, teacher_dir = tiny_model
    histories = history_matrix(data.train, data.n_users, 200)
    hist_items, hist_mask = torch.as_tensor(histories.items), torch.as_tensor(histories.mask)
    correlation = {}
    for retrieval_weight in (0.0, 1.0):
        spec = student_spec(teacher_dir, 0.0, retrieval_weight).distillation
        teacher = load_teacher(spec, data.items["item_id"].to_list(), histories)
        generator = torch.Generator().manual_seed(1)
        shuffled = torch.randperm(data.n_items, generator=generator)
        teacher.item_vectors = teacher.item_vectors[shuffled]
        teacher.item_bias = torch.randn(data.n_items, generator=generator)
        student = copy.deepcopy(result.model)
        context = StepContext(hist_items, hist_mask, result.tokens, teacher, LossWeights(), torch.device("cpu"), False)
        optimizer = torch.optim.Adam([p for n, p in student.named_parameters() if not n.startswith("encoder.")],
                                     lr=0.01)
        size = 32
        for _ in range(240):  # the sequence tower (the fixture's) moves slower than the pooled one did in 80
            users = torch.randint(0, data.n_users, (size,), generator=generator)
            items = torch.randint(0, data.n_items, (size,), generator=generator)
            batch = StepBatch(
                users, items, torch.zeros(size), torch.randint(0, data.n_items, (size, 2), generator=generator),
                None, torch.ones(data.n_items, dtype=torch.bool),
                torch.zeros(size, hist_items.shape[1], dtype=torch.bool),
                torch.zeros(size, data.n_items, dtype=torch.bool) if catalog else None,
            )
            _, retrieval, *_ = _step_loss(student, batch=batch, context=context)
            optimizer.zero_grad()
            retrieval.backward()
            optimizer.step()
        users = torch.randint(0, data.n_users, (64,), generator=generator)
        items = torch.randint(0, data.n_items, (64,), generator=generator)
        seen = hist_mask[users] & (hist_items[users] != items.unsqueeze(1))
        with torch.no_grad():
            vectors = student.item_vectors()
            mine = student.retrieval_logits(student.user_vectors(vectors, hist_items[users], seen), vectors[items],
                                            items)
            theirs, _ = teacher.retrieval_logits(hist_items[users], seen, items)
        correlation[retrieval_weight] = float(np.mean([spearmanr(a, b)[0] for a, b in zip(mine, theirs, strict=True)]))
    assert correlation[1.0] > 0.8 and correlation[1.0] > correlation[0.0] + 0.5, correlation


def test_the_retrieval_kl_is_zero_for_the_teachers_own_ranking_and_pulls_towards_it():
    scores = torch.tensor([[1.0, 3.0, -2.0, 0.5], [0.0, 0.0, 4.0, 1.0]])
    everything = torch.ones(4, dtype=torch.bool)
    # Equal scores, or scores shifted per row (the same softmax): nothing to learn.
    assert float(softmax_kl(scores, scores, everything, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(softmax_kl(scores + torch.tensor([[5.0], [-1.0]]), scores, everything, 2.0)) == pytest.approx(
        0.0, abs=1e-6)
    # A flat student against a teacher that prefers column 1: descending the gradient raises column 1 only,
    # and a column outside the candidates gets no gradient.
    student = torch.zeros(1, 4, requires_grad=True)
    teacher = torch.tensor([[0.0, 6.0, 0.0, 9.0]])
    candidates = torch.tensor([True, True, True, False])
    kl = softmax_kl(student, teacher, candidates, 2.0)
    assert float(kl.detach()) > 0
    kl.backward()
    grad = student.grad[0]
    assert grad[1] < 0 and bool((grad[[0, 2]] > 0).all()) and float(grad[3]) == 0.0
    # It equals the textbook KL over the candidates alone.
    p = torch.softmax(teacher[0, :3] / 2.0, dim=0)
    expected = float((p * (p.log() - torch.log_softmax(torch.zeros(3) / 2.0, dim=0))).sum())
    assert float(kl.detach()) == pytest.approx(expected, rel=1e-5)


def test_the_retrieval_loss_mixes_hard_and_soft_by_the_retrieval_weight():
    def spec(retrieval_weight):
        distillation = {"teacher": "file:///t", "temperature": 2.0}
        if retrieval_weight is not None:
            distillation["retrievalWeight"] = retrieval_weight
        return parse_recmodel_spec({"data": {"source": "synthetic"}, "distillation": distillation}).distillation

    student, teacher = torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([[-3.0, 4.0, 0.0]])
    targets, known = torch.tensor([0]), torch.ones(3, dtype=torch.bool)
    hard = torch.nn.functional.cross_entropy(student, targets)
    soft = softmax_kl(student, teacher, known, 2.0) * 4.0
    assert spec(None).retrieval_weight is None and spec(None).retrieval_share() == 0.0
    for unset in (None, 0.0):
        assert torch.equal(distilled_softmax(student, targets, teacher, known, spec(unset)), hard)
    assert torch.isclose(distilled_softmax(student, targets, teacher, known, spec(1.0)), soft)
    assert torch.isclose(distilled_softmax(student, targets, teacher, known, spec(0.25)), 0.75 * hard + 0.25 * soft)
    # A teacher that knows none of the candidates leaves the hard loss.
    assert torch.equal(distilled_softmax(student, targets, teacher, ~known, spec(1.0)), hard)


def test_an_unset_retrieval_weight_leaves_the_manifest_and_revision_unchanged():
    from recops.operator.naming import training_revision

    base = {"data": {"source": "synthetic"}, "distillation": {"teacher": "file:///t", "weight": 0.5}}
    unset = parse_recmodel_spec(base)
    assert "retrievalWeight" not in unset.to_manifest_dict()["distillation"]
    distilled = parse_recmodel_spec({**base, "distillation": {**base["distillation"], "retrievalWeight": 0.5}})
    assert distilled.to_manifest_dict()["distillation"]["retrievalWeight"] == 0.5
    assert training_revision(distilled) != training_revision(unset)


def test_training_with_a_teacher_reports_it_beside_the_student(tiny_model, tmp_path):
    from recops.training.run import run_training

    _, _, trained = tiny_model
    teacher_dir = tmp_path / "teacher"
    shutil.copytree(trained, teacher_dir)
    teacher_serving = {"embedding_dim": 32, "items": 80, "index_bytes": 10240, "tower_parameters": 90000,
                       "backbone_layers": 2}
    (teacher_dir / "metrics.json").write_text(json.dumps({"metrics": {"twotower": {"recall@20": 0.25}},
                                                          "serving": teacher_serving}))
    spec = student_spec(teacher_dir, 0.5, 0.5)
    summary = run_training(spec, tmp_path / "student", baselines=())
    assert summary["teacher"] == {"artifact": f"file://{teacher_dir}", "metrics": {"recall@20": 0.25},
                                  "temperature": 2.0, "weight": 0.5, "retrieval_weight": 0.5,
                                  "serving": teacher_serving}
    assert "recall@20" in summary["metrics"]["twotower"]
    # The student's serving cost, read off its export: 80 items × 16 float32s in the index.
    index = np.load(tmp_path / "student" / "item_index.npy")
    assert summary["serving"] == {"embedding_dim": 16, "items": 80, "index_bytes": index.nbytes,
                                  "tower_parameters": summary["serving"]["tower_parameters"], "backbone_layers": 2}
    assert index.shape == (80, 16) and 0 < summary["serving"]["tower_parameters"] < 90000
    assert json.loads((tmp_path / "student" / "metrics.json").read_text())["serving"] == summary["serving"]
    # What the trainer reports for the RecModel status: the student's quality and serving cost and the teacher's
    # side by side.
    from recops.cli import reported_metrics
    from recops.operator.termination import numeric

    reported = numeric(reported_metrics(summary))
    assert reported["teacher.recall@20"] == 0.25
    assert reported["recall@20"] == summary["metrics"]["twotower"]["recall@20"]
    assert {k: v for k, v in reported.items() if k.startswith("teacher.serving.")} == {
        f"teacher.serving.{k}": float(v) for k, v in teacher_serving.items()}
    assert {k: v for k, v in reported.items() if k.startswith("serving.")} == {
        f"serving.{k}": float(v) for k, v in summary["serving"].items()}


def test_a_teacher_exported_before_serving_was_reported_reports_its_metrics_only():
    from recops.cli import reported_metrics

    summary = {"metrics": {"twotower": {"recall@20": 0.3}}, "serving": None,
               "teacher": {"metrics": {"recall@20": 0.4}, "serving": None}}
    assert reported_metrics(summary) == {"recall@20": 0.3, "teacher.recall@20": 0.4}


def test_the_soft_term_follows_the_weight_and_skips_unknown_items():
    spec = parse_recmodel_spec({"data": {"source": "synthetic"}, "distillation": {"teacher": "file:///t", "weight": 1}})
    student, labels = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.0]])
    teacher = torch.tensor([[2.0 * spec.distillation.temperature, -1.0 * spec.distillation.temperature]])
    known = torch.tensor([[True, True]])
    pure_soft = distilled_bce(student, labels, teacher, known, spec.distillation)
    t = spec.distillation.temperature
    expected = torch.nn.functional.binary_cross_entropy_with_logits(student / t, torch.sigmoid(teacher / t)) * t * t
    assert torch.isclose(pure_soft, expected)
    hard = torch.nn.functional.binary_cross_entropy_with_logits(student, labels)
    assert torch.isclose(distilled_bce(student, labels, teacher, ~known, spec.distillation), hard)


@pytest.mark.parametrize(
    ("distillation", "field"),
    [
        ({"teacher": "file:///t", "temperature": 0}, "spec.distillation.temperature"),
        ({"teacher": "file:///t", "weight": 1.5}, "spec.distillation.weight"),
        ({"teacher": "file:///t", "retrievalWeight": -0.1}, "spec.distillation.retrievalWeight"),
        ({"teacher": "file:///t", "retrievalWeight": 1.01}, "spec.distillation.retrievalWeight"),
        ({"teacher": "file:///t", "retrievalWeight": "a lot"}, "spec.distillation.retrievalWeight"),
        ({"teacher": ""}, "spec.distillation.teacher"),
        ({"temperature": 2}, "spec.distillation.teacher"),
    ],
)
def test_bad_distillation_settings_name_the_field(distillation, field):
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        parse_recmodel_spec({"data": {"source": "synthetic"}, "distillation": distillation})


def test_a_teacher_that_cannot_be_used_is_a_clear_error(tiny_model, tmp_path):
    data, _, teacher_dir = tiny_model
    histories = history_matrix(data.train, data.n_users, 200)
    spec = student_spec(tmp_path, 0.5).distillation
    with pytest.raises(TeacherError, match="is not an exported model directory"):
        load_teacher(spec, data.items["item_id"].to_list(), histories)
    spec = student_spec(teacher_dir, 0.5).distillation
    with pytest.raises(TeacherError, match="knows none of the student's items"):
        load_teacher(spec, [f"other-{i}" for i in range(data.n_items)], histories)
    assert load_model(teacher_dir, with_backbone=False).item_ids == data.items["item_id"].to_list()
