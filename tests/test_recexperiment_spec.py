"""RecExperiment specs: the example validates, defaults, and errors that name the wrong field by its YAML path."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from recops.api import SpecError, load_recexperiment_spec, parse_recexperiment_spec
from recops.api.recexperiment import RecExperimentSpec, parse_duration

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "recexperiment.yaml"

MINIMAL = {
    "control": {"model": "ranker-v1"},
    "treatment": {"model": "ranker-v2"},
    "assignment": {"salt": "s1"},
    "steps": [{"weight": 10, "pause": "5m"}],
    "gates": [{"type": "ctrLift"}],
    "prometheus": {"url": "http://prometheus:9090"},
}


def test_the_example_manifest_validates():
    spec = load_recexperiment_spec(EXAMPLE)
    assert (spec.control.model, spec.treatment.model) == ("ranker-v1", "ranker-v2")
    assert [step.weight_bp for step in spec.steps] == [500, 2000, 5000]
    assert [step.pause_seconds for step in spec.steps] == [1800, 3600, 7200]
    assert {gate.type for gate in spec.gates} == {
        "sampleRatio",
        "errorRate",
        "latencyP99",
        "ctrLift",
        "likeRateLift",
        "gmvPerUserLift",
        "promql",
    }
    assert (spec.on_success, spec.on_failure) == ("promote", "rollback")


def test_defaults_and_a_manifest_round_trip():
    spec = parse_recexperiment_spec(MINIMAL)
    ctr = spec.gates[0]
    assert (ctr.min_lift, ctr.alpha, ctr.min_samples, ctr.fail_on, ctr.gate_name) == (
        0.0,
        0.05,
        1000,
        "harm",
        "ctrLift",
    )
    assert (spec.analysis.interval_seconds, spec.prometheus.timeout_seconds) == (60, 10.0)
    again = parse_recexperiment_spec(spec.to_manifest_dict())
    assert again == spec
    srm = parse_recexperiment_spec({**MINIMAL, "gates": [{"type": "sampleRatio"}]}).gates[0]
    assert srm.alpha == 0.001


def test_the_json_schema_carries_the_patterns_the_crd_needs():
    schema = RecExperimentSpec.model_json_schema(by_alias=True)
    step = schema["$defs"]["StepSpec"]["properties"]
    assert step["pause"]["pattern"] == "^([0-9]+h)?([0-9]+m)?([0-9]+s)?$"
    assert "pattern" in schema["$defs"]["ModelRef"]["properties"]["model"]


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("5m", 300), ("2h", 7200), ("1h30m", 5400), ("1h0m5s", 3605)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "5", "5 m", "1.5h", "1d", "30s5m", "-5m"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def _with(path: str, value):
    """MINIMAL with the value at a dotted path (list indices as numbers) replaced."""
    document = copy.deepcopy(MINIMAL)
    *parents, last = path.split(".")
    target = document
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    if last.isdigit():
        target[int(last)] = value
    else:
        target[last] = value
    return document


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (_with("steps.0.weight", 0), "spec.steps[0].weight: Input should be greater than 0"),
        (_with("steps.0.weight", 101), "spec.steps[0].weight: Input should be less than or equal to 100"),
        (_with("steps.0.weight", 0.001), "spec.steps[0].weight: weight has a resolution of 0.01 percent"),
        (_with("steps.0.weight", "10"), "spec.steps[0].weight: Input should be a valid number"),
        (_with("steps.0.pause", "5 minutes"), "spec.steps[0].pause: must be a duration such as 30s"),
        (_with("steps.0.pause", "30s"), "steps[0].pause (30s) is shorter than analysis.interval (1m)"),
        (
            _with("steps", [{"weight": 20, "pause": "5m"}, {"weight": 10, "pause": "5m"}]),
            "spec.steps: weights must not decrease: steps[1].weight (10) is below steps[0].weight (20)",
        ),
        (
            _with("steps", [{"weight": 100, "pause": "5m"}, {"weight": 100, "pause": "5m"}]),
            "spec.steps: steps[0].weight is 100: only the last step",
        ),
        (_with("steps", []), "spec.steps: List should have at least 1 item"),
        (_with("treatment.model", "ranker-v1"), "treatment.model must differ from control.model"),
        (_with("treatment.model", "Ranker_V2"), "spec.treatment.model: must be a DNS-1123 label"),
        (_with("assignment.salt", ""), "spec.assignment.salt: String should have at least 1 character"),
        (_with("assignment.salt", "a\x00b"), "spec.assignment.salt: salt must not contain a NUL"),
        (_with("prometheus.url", "prometheus:9090"), "spec.prometheus.url: must be an http:// or https:// URL"),
        (_with("prometheus.timeoutSeconds", 0), "spec.prometheus.timeoutSeconds: Input should be greater than 0"),
        (_with("gates", []), "spec.gates: List should have at least 1 item"),
        (_with("gates.0", {"type": "ctrLift", "alpha": 0.9}), "spec.gates[0].alpha: Input should be less than"),
        (_with("gates.0", {"type": "ctrLift", "alhpa": 0.1}), "spec.gates[0].alhpa: Extra inputs are not permitted"),
        (_with("gates.0", {"type": "ctrLift", "failOn": "never"}), "spec.gates[0].failOn: Input should be 'harm'"),
        (_with("gates.0", {"type": "ctrLift", "minLift": -1}), "spec.gates[0].minLift: Input should be greater"),
        (_with("gates.0", {"type": "ctrlift"}), "spec.gates[0]: Input tag 'ctrlift' found using 'type'"),
        (_with("gates.0", {"alpha": 0.1}), "spec.gates[0]: Unable to extract tag using discriminator 'type'"),
        (_with("gates.0", {"type": "latencyP99"}), "spec.gates[0].maxMilliseconds: Field required"),
        (
            _with("gates.0", {"type": "latencyP99", "maxMilliseconds": 100, "arm": "canary"}),
            "spec.gates[0].arm: Input should be 'treatment' or 'control'",
        ),
        (_with("gates.0", {"type": "errorRate", "maxRatio": 1.5}), "spec.gates[0].maxRatio: Input should be less"),
        (_with("gates.0", {"type": "sampleRatio", "alpha": 0.5}), "spec.gates[0].alpha: Input should be less"),
        (
            _with("gates.0", {"type": "promql", "query": 'up{x="$exp"}', "op": "gt", "threshold": 1}),
            "spec.gates[0].query: unknown placeholder(s) $exp; known: $experiment, $arm, $window",
        ),
        (
            _with("gates.0", {"type": "promql", "query": "up", "op": ">", "threshold": 1}),
            "spec.gates[0].op: Input should be 'lt', 'le', 'gt', 'ge', 'eq' or 'ne'",
        ),
        (
            _with("gates", [{"type": "ctrLift"}, {"type": "ctrLift", "alpha": 0.01}]),
            "spec.gates: gate names must be unique (set 'name' on repeated types); duplicated: ['ctrLift']",
        ),
        (_with("gates.0", {"type": "ctrLift", "name": "bad name"}), "spec.gates[0].name: must be letters"),
        (_with("onFailure", "ignore"), "spec.onFailure: Input should be 'rollback'"),
        (_with("analysis", {"maxInconclusiveLooks": 0}), "spec.analysis.maxInconclusiveLooks: Input should be greater"),
        (_with("control", {"model": "a", "version": 2}), "spec.control.version: Extra inputs are not permitted"),
    ],
)
def test_bad_specs_name_the_field(document, expected):
    with pytest.raises(SpecError) as error:
        parse_recexperiment_spec(document)
    assert expected in str(error.value)


def test_two_gates_of_one_type_need_names():
    spec = parse_recexperiment_spec(
        _with(
            "gates",
            [
                {"type": "latencyP99", "name": "p99-treatment", "maxMilliseconds": 200},
                {"type": "latencyP99", "name": "p99-control", "arm": "control", "maxMilliseconds": 200},
            ],
        )
    )
    assert [gate.gate_name for gate in spec.gates] == ["p99-treatment", "p99-control"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kind: RecModel\napiVersion: recops.dev/v1alpha1\nspec: {}\n", "expected 'RecExperiment'"),
        ("kind: RecExperiment\napiVersion: recops.dev/v2\nspec: {}\n", "apiVersion"),
        ("kind: RecExperiment\napiVersion: recops.dev/v1alpha1\n", "needs a 'spec' mapping"),
        ("- a list\n", "expected a mapping"),
        ("steps: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_files_are_named(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as error:
        load_recexperiment_spec(path)
    assert expected in str(error.value) and "bad.yaml" in str(error.value)


def test_a_whole_manifest_and_a_bare_spec_read_the_same(tmp_path):
    manifest = {
        "apiVersion": "recops.dev/v1alpha1",
        "kind": "RecExperiment",
        "metadata": {"name": "x"},
        "spec": MINIMAL,
    }
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert load_recexperiment_spec(path) == parse_recexperiment_spec(MINIMAL)
