"""Distillation: a student trained on a teacher's soft scores agrees with the teacher more than one trained on
the labels alone; the spec's settings are validated; a teacher that cannot be used is a clear error."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from recops.api.loading import SpecError, parse_recmodel_spec
from recops.data.features import history_matrix
from recops.training.distillation import TeacherError, distilled_bce, load_teacher
from recops.training.export import load_model

pytestmark = pytest.mark.slow


def student_spec(teacher_dir, weight: float):
    return parse_recmodel_spec({
        "data": {"source": "synthetic", "synthetic": {"users": 150, "items": 80, "days": 10, "seed": 4}},
        "backbone": {"name": "builtin:tiny-qwen2", "maxSeqLength": 16},
        "lora": {"r": 2, "alpha": 4},
        "training": {"epochs": 1, "batchSize": 128, "embeddingDim": 16, "textItemsPerStep": 0},
        "distillation": {"teacher": f"file://{teacher_dir}", "temperature": 2.0, "weight": weight},
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


def test_training_with_a_teacher_reports_it_beside_the_student(tiny_model, tmp_path):
    from recops.training.run import run_training

    _, _, trained = tiny_model
    teacher_dir = tmp_path / "teacher"
    shutil.copytree(trained, teacher_dir)
    (teacher_dir / "metrics.json").write_text(json.dumps({"metrics": {"twotower": {"recall@20": 0.25}}}))
    spec = student_spec(teacher_dir, 0.5)
    summary = run_training(spec, tmp_path / "student", baselines=())
    assert summary["teacher"] == {"artifact": f"file://{teacher_dir}", "metrics": {"recall@20": 0.25},
                                  "temperature": 2.0, "weight": 0.5}
    assert "recall@20" in summary["metrics"]["twotower"]
    # What the trainer reports for the RecModel status: the student's metrics and the teacher's side by side.
    from recops.cli import reported_metrics
    from recops.operator.termination import numeric

    reported = numeric(reported_metrics(summary))
    assert reported["teacher.recall@20"] == 0.25
    assert reported["recall@20"] == summary["metrics"]["twotower"]["recall@20"]


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
