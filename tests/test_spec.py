"""RecModel specs: defaults, camelCase, and errors that name the wrong field."""

from __future__ import annotations

import pytest
import yaml

from recops.api import SpecError, load_recmodel_spec, parse_recmodel_spec

MINIMAL = {"data": {"source": "synthetic"}}


def test_defaults_follow_the_design():
    spec = parse_recmodel_spec(MINIMAL)
    assert spec.backbone.name == "Qwen/Qwen2.5-0.5B"
    assert (spec.lora.r, spec.lora.alpha, spec.lora.dropout) == (32, 64, 0.05)
    weights = spec.training.loss_weights
    assert (weights.click, weights.like, weights.retrieval) == (0.7, 0.3, 1.0)
    assert spec.training.negatives == 4


def test_a_whole_manifest_and_a_bare_spec_read_the_same(tmp_path):
    manifest = {"apiVersion": "recops.dev/v1alpha1", "kind": "RecModel", "metadata": {"name": "m"},
                "spec": {**MINIMAL, "training": {"batchSize": 64}}}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert load_recmodel_spec(path) == parse_recmodel_spec(manifest["spec"])
    assert load_recmodel_spec(path).training.batch_size == 64


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"data": {"source": "synthetic"}, "training": {"batchSize": 1}}, "spec.training.batchSize"),
        ({"data": {"source": "synthetic"}, "training": {"epoch": 3}}, "spec.training.epoch: Extra inputs"),
        ({"data": {"source": "synthetic"}, "lora": {"r": 0}}, "spec.lora.r"),
        ({"data": {"source": "synthetic"}, "lora": {"dropout": 1.5}}, "spec.lora.dropout"),
        ({"data": {"source": "parquet"}}, "spec.data.source"),
        ({"data": {"source": "events", "events": "file:///e.jsonl"}}, "needs both 'events' and 'items'"),
        ({"data": {"source": "movielens"}}, "needs 'movielensDir'"),
        ({"data": {"source": "synthetic", "cleaning": {"windowStart": 10, "windowEnd": 5}}}, "windowEnd"),
        ({"data": {"source": "synthetic"}, "backbone": {"pooling": "max"}}, "spec.backbone.pooling"),
        ({"training": {}}, "spec.data: Field required"),
        ({"data": {"source": "synthetic"}, "training": {"learningRate": "fast"}}, "spec.training.learningRate"),
        ({"data": {"source": "synthetic"}, "training": {"userTower": "bag"}}, "spec.training.userTower"),
        ({"data": {"source": "synthetic"}, "training": {"sequenceHeads": 3}}, "sequenceHeads must divide embeddingDim"),
        ({"data": {"source": "synthetic"}, "training": {"sequenceDropout": 1.0}}, "spec.training.sequenceDropout"),
        ({"data": {"source": "synthetic"}, "training": {"patience": 0}}, "spec.training.patience"),
    ],
)
def test_bad_specs_name_the_field(document, expected):
    with pytest.raises(SpecError) as error:
        parse_recmodel_spec(document)
    assert expected in str(error.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kind: RecExperiment\napiVersion: recops.dev/v1alpha1\nspec: {}\n", "expected 'RecModel'"),
        ("kind: RecModel\napiVersion: recops.dev/v2\nspec: {}\n", "apiVersion"),
        ("- a list\n", "expected a mapping"),
        ("data: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_files_are_named(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as error:
        load_recmodel_spec(path)
    assert expected in str(error.value) and "bad.yaml" in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        load_recmodel_spec(tmp_path / "nope.yaml")
