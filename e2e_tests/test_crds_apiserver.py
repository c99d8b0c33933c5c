"""The generated CRDs on a real apiserver: accepted, defaults applied, printer columns, short names,
and every malformed manifest refused by ``kubectl apply`` with a message naming the field."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

GOOD_MODEL: dict[str, Any] = {
    "apiVersion": "recops.dev/v1alpha1",
    "kind": "RecModel",
    "metadata": {"name": "ranker"},
    "spec": {"data": {"source": "synthetic"}, "backbone": {"name": "builtin:tiny-qwen2"}},
}
GOOD_EXPERIMENT: dict[str, Any] = {
    "apiVersion": "recops.dev/v1alpha1",
    "kind": "RecExperiment",
    "metadata": {"name": "v2-vs-v1"},
    "spec": {
        "control": {"model": "v1"},
        "treatment": {"model": "v2"},
        "assignment": {"salt": "v2-vs-v1"},
        "steps": [{"weight": 10, "pause": "5m"}, {"weight": 50, "pause": "5m"}, {"weight": 100, "pause": "10m"}],
        "gates": [
            {"type": "ctrLift", "minLift": 0.0},
            {"type": "sampleRatio"},
            {"type": "latencyP99", "maxMilliseconds": 50},
            {"type": "errorRate", "maxRatio": 0.01},
        ],
        "prometheus": {"url": "http://prometheus.monitoring:9090"},
        "analysis": {"interval": "1m"},
    },
}

# Continuous learning through an experiment: the experiment's spec without the models and the salt.
GOOD_RETRAINING: dict[str, Any] = {**GOOD_MODEL, "spec": {**GOOD_MODEL["spec"], "retrain": {
    "schedule": "*/30 * * * *", "minNewEvents": 1000, "windowDays": 30,
    "experiment": {k: v for k, v in GOOD_EXPERIMENT["spec"].items() if k not in ("control", "treatment", "assignment")},
}}}


def _set(document: dict, path: str, value: Any) -> dict:
    """``document`` with ``path`` (dots, ``[i]`` for list items) set to ``value``; ``...`` deletes it."""
    document = copy.deepcopy(document)
    parts = path.replace("[", ".[").split(".")
    node: Any = document
    for part in parts[:-1]:
        node = node[int(part[1:-1])] if part.startswith("[") else node.setdefault(part, {})
    last = parts[-1]
    key: Any = int(last[1:-1]) if last.startswith("[") else last
    if value is ...:
        del node[key]
    else:
        node[key] = value
    return document


# (manifest, what the refusal must mention): each names the field a user has to fix.
MALFORMED = [
    (_set(GOOD_MODEL, "spec.lora.r", 0), "spec.lora.r"),
    (_set(GOOD_MODEL, "spec.lora.r", 1024), "spec.lora.r"),
    (_set(GOOD_MODEL, "spec.lora.dropout", 1.0), "spec.lora.dropout"),
    (_set(GOOD_MODEL, "spec.training.epochs", 0), "spec.training.epochs"),
    (_set(GOOD_MODEL, "spec.training.batchSize", "big"), "spec.training.batchSize"),
    (_set(GOOD_MODEL, "spec.training.learningRate", 0), "spec.training.learningRate"),
    (_set(GOOD_MODEL, "spec.training.resources.memory", "8 GB"), "spec.training.resources.memory"),
    (_set(GOOD_MODEL, "spec.training.resources.gpu", -1), "spec.training.resources.gpu"),
    (_set(GOOD_MODEL, "spec.serving.replicas", -1), "spec.serving.replicas"),
    (_set(GOOD_MODEL, "spec.serving.maxBatchSize", 0), "spec.serving.maxBatchSize"),
    (_set(GOOD_MODEL, "spec.backbone.pooling", "max"), "spec.backbone.pooling"),
    (_set(GOOD_MODEL, "spec.backbone.name", ""), "spec.backbone.name"),
    (_set(GOOD_MODEL, "spec.data.source", "kafka"), "spec.data.source"),
    (_set(GOOD_MODEL, "spec.data.source", "events"), "spec.data"),  # events needs both URIs
    (_set(GOOD_MODEL, "spec.data", {"source": "movielens"}), "spec.data.movielensDir"),
    (_set(GOOD_MODEL, "spec.data", {"source": "amazon-beauty"}), "spec.data.amazonBeautyDir"),
    (_set(GOOD_MODEL, "spec.data", {"source": "amazon-beauty", "amazonBeautyDir": "/data"}), "spec.data.split"),
    (_set(GOOD_MODEL, "spec.data.split", "random"), "spec.data.split"),
    (_set(GOOD_MODEL, "spec.data.cleaning", {"windowStart": 100, "windowEnd": 50}), "spec.data.cleaning.windowEnd"),
    (_set(GOOD_MODEL, "spec.data.coldItemFraction", 0.9), "spec.data.coldItemFraction"),
    (_set(GOOD_MODEL, "spec.lora.typo", 1), "spec.lora.typo"),
    (_set(GOOD_MODEL, "spec.distillation", {"teacher": "pvc://artifacts/t", "temperature": 0}),
     "spec.distillation.temperature"),
    (_set(GOOD_MODEL, "spec.distillation", {"teacher": "pvc://artifacts/t", "weight": 1.5}),
     "spec.distillation.weight"),
    (_set(GOOD_MODEL, "spec.distillation", {"weight": 0.5}), "spec.distillation.teacher"),
    (_set(GOOD_MODEL, "spec.retrain", {"schedule": "@hourly"}), "spec.retrain.experiment"),  # never blind
    (_set(GOOD_MODEL, "spec.retrain", {"rollout": "direct", "schedule": "every hour"}), "spec.retrain.schedule"),
    (_set(GOOD_MODEL, "spec.retrain", {"rollout": "direct", "minNewEvents": 0}), "spec.retrain.minNewEvents"),
    (_set(GOOD_MODEL, "spec.retrain", {"rollout": "sometimes"}), "spec.retrain.rollout"),
    (_set(GOOD_MODEL, "spec.retrain", {"experiment": {"steps": [{"weight": 50, "pause": "1m"}]}}),
     "spec.retrain.experiment"),  # no gates, no prometheus
    (_set(GOOD_MODEL, "spec.data", ...), "spec.data"),
    (_set(GOOD_EXPERIMENT, "spec.treatment.model", "v1"), "spec.treatment.model"),
    (_set(GOOD_EXPERIMENT, "spec.control.model", "V1_model"), "spec.control.model"),
    (_set(GOOD_EXPERIMENT, "spec.steps", []), "spec.steps"),
    (_set(GOOD_EXPERIMENT, "spec.steps[1].weight", 5), "spec.steps"),  # decreasing
    (_set(GOOD_EXPERIMENT, "spec.steps[0].weight", 0), "spec.steps[0].weight"),
    (_set(GOOD_EXPERIMENT, "spec.steps[2].weight", 101), "spec.steps[2].weight"),
    (_set(GOOD_EXPERIMENT, "spec.steps[1].weight", 100), "spec.steps"),  # 100 before the last step
    (_set(GOOD_EXPERIMENT, "spec.steps[0].pause", "5 minutes"), "spec.steps[0].pause"),
    (_set(GOOD_EXPERIMENT, "spec.steps[0].pause", "0s"), "spec.steps[0].pause"),
    (_set(GOOD_EXPERIMENT, "spec.steps[0].pause", "30s"), "spec"),  # shorter than analysis.interval
    (_set(GOOD_EXPERIMENT, "spec.gates", []), "spec.gates"),
    (_set(GOOD_EXPERIMENT, "spec.gates[0].type", "ctr"), "spec.gates[0].type"),
    (_set(GOOD_EXPERIMENT, "spec.gates[2]", {"type": "latencyP99"}), "spec.gates[2].maxMilliseconds"),
    (_set(GOOD_EXPERIMENT, "spec.gates[1].maxMilliseconds", 5), "spec.gates[1].maxMilliseconds"),
    (_set(GOOD_EXPERIMENT, "spec.gates[1].alpha", 0.2), "spec.gates[1].alpha"),
    (_set(GOOD_EXPERIMENT, "spec.gates[3].maxRatio", 2), "spec.gates[3].maxRatio"),
    (_set(GOOD_EXPERIMENT, "spec.gates[0].minLift", -1), "spec.gates[0].minLift"),
    (_set(GOOD_EXPERIMENT, "spec.gates[1]", {"type": "ctrLift"}), "spec.gates"),  # two gates named ctrLift
    (_set(GOOD_EXPERIMENT, "spec.prometheus", ...), "spec.prometheus"),
    (_set(GOOD_EXPERIMENT, "spec.assignment.salt", ""), "spec.assignment.salt"),
    (_set(GOOD_EXPERIMENT, "spec.onSuccess", "celebrate"), "spec.onSuccess"),
    (_set(GOOD_EXPERIMENT, "spec.analysis.maxConsecutiveErrors", 0), "spec.analysis.maxConsecutiveErrors"),
]


def test_enough_malformed_cases():
    assert len(MALFORMED) >= 30


@pytest.mark.parametrize(
    ("manifest", "field"), MALFORMED, ids=[f"{m['kind']}-{f}-{i}" for i, (m, f) in enumerate(MALFORMED)]
)
def test_a_malformed_manifest_is_refused_naming_the_field(cluster, apply_crds, namespace, manifest, field):
    done = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest), check=False)
    assert done.returncode != 0, f"accepted: {yaml.safe_dump(manifest['spec'])}"
    assert field in done.stderr, done.stderr
    kind = manifest["kind"].lower() + "s"
    listed = cluster.kubectl.json("get", kind, "-n", namespace)
    assert listed["items"] == []  # nothing half-created


@pytest.mark.parametrize("manifest", [GOOD_MODEL, GOOD_RETRAINING, GOOD_EXPERIMENT],
                         ids=["RecModel", "RecModel-retrain", "RecExperiment"])
def test_a_good_manifest_is_accepted_with_defaults(cluster, apply_crds, namespace, manifest):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))
    short = {"RecModel": "rm", "RecExperiment": "rexp"}[manifest["kind"]]
    stored = cluster.kubectl.json("get", short, manifest["metadata"]["name"], "-n", namespace)
    if manifest["kind"] == "RecModel":
        from recops.api.recmodel import RecModelSpec

        # The apiserver fills in what the spec model would: no lora section is LoRA off, at its default rank.
        defaults = RecModelSpec.model_validate(manifest["spec"]).to_manifest_dict()
        assert stored["spec"]["training"]["batchSize"] == defaults["training"]["batchSize"]
        # Defaults that depend on the user tower (epochs, embeddingDim) are the spec model's to fill: not stored.
        assert "epochs" not in stored["spec"]["training"] and "epochs" not in defaults["training"]
        assert stored["spec"]["lora"] == defaults["lora"] and stored["spec"]["lora"]["enabled"] is False
        assert stored["spec"]["serving"]["resources"]["memory"] == "8Gi"
        if "retrain" in manifest["spec"]:
            assert stored["spec"]["retrain"]["rollout"] == "experiment"  # never blind by default
            assert stored["spec"]["retrain"]["maxRecallDrop"] == 0.05
    else:
        assert stored["spec"]["analysis"]["maxInconclusiveLooks"] == 60
        assert "minSamples" not in stored["spec"]["gates"][0]  # union defaults come from pydantic, not the schema
    # What the apiserver stored is what the operator's pydantic models accept.
    from recops.api import parse_recexperiment_spec, parse_recmodel_spec

    parse = parse_recmodel_spec if manifest["kind"] == "RecModel" else parse_recexperiment_spec
    parse(stored)


def test_printer_columns_short_names_and_category(cluster, apply_crds, namespace):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(GOOD_MODEL))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(GOOD_EXPERIMENT))
    models = cluster.kubectl("get", "rm", "-n", namespace).stdout.splitlines()[0].split()
    assert models == ["NAME", "PHASE", "REVISION", "RECALL", "ENDPOINT", "AGE"]
    experiments = cluster.kubectl("get", "rexp", "-n", namespace).stdout.splitlines()[0].split()
    assert experiments == ["NAME", "PHASE", "STEP", "WEIGHT", "WINNER", "AGE"]
    both = cluster.kubectl("get", "recops", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(both) == ["recexperiment.recops.dev/v2-vs-v1", "recmodel.recops.dev/ranker"]


def test_status_is_a_subresource(cluster, apply_crds, namespace):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(GOOD_MODEL))
    # A status in the main resource is ignored; only /status writes it.
    def patch_status(patch: str, check: bool = True):
        return cluster.kubectl("patch", "rm", "ranker", "-n", namespace, "--subresource=status", "--type=merge",
                               "-p", patch, check=check)

    with_status = {**GOOD_MODEL, "status": {"phase": "Ready"}}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(with_status))
    assert (
        "status" not in cluster.kubectl.json("get", "rm", "ranker", "-n", namespace)
        or cluster.kubectl.json("get", "rm", "ranker", "-n", namespace)["status"].get("phase") != "Ready"
    )
    patch_status('{"status": {"phase": "Ready", "recall": 0.25}}')
    stored = cluster.kubectl.json("get", "rm", "ranker", "-n", namespace)
    assert stored["status"]["phase"] == "Ready" and stored["status"]["recall"] == 0.25
    bad = patch_status('{"status": {"phase": "Dancing"}}', check=False)
    assert bad.returncode != 0 and "status.phase" in bad.stderr
