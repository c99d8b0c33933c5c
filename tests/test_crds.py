"""The CRDs are generated from the typed specs, committed as generated, structural, and their
defaults agree with pydantic's (the apiserver applies them before the operator reads the spec).

That the apiserver accepts them and refuses bad manifests is proven in e2e_tests/test_crds_apiserver.py.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from recops.api import RecExperimentSpec, RecModelSpec
from recops.api.crds import recexperiment_crd, recmodel_crd, render_crds
from recops.cli import app

REPO = Path(__file__).resolve().parents[1]


def _schema(crd: dict) -> dict:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.get("properties", {}).items():
            yield from _walk(value, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            yield from _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_committed_crds_equal_a_fresh_generation():
    for name, text in render_crds().items():
        committed = (REPO / "crds" / name).read_text()
        assert committed == text, f"crds/{name} is stale: run `recops crds --out crds/`"


def test_recops_crds_writes_the_files(tmp_path):
    result = CliRunner().invoke(app, ["crds", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    for name, text in render_crds().items():
        assert (tmp_path / "out" / name).read_text() == text


@pytest.mark.parametrize("build", [recmodel_crd, recexperiment_crd])
def test_schemas_are_structural(build):
    schema = _schema(build())
    text = yaml.safe_dump(schema)
    assert "$ref" not in text and "$defs" not in text and "oneOf" not in text and "const" not in text
    for path, node in _walk(schema):
        if node.get("x-kubernetes-int-or-string"):
            assert [branch.get("type") for branch in node["anyOf"]] == ["integer", "string"], path
            continue
        assert "anyOf" not in node, path
        assert "type" in node, f"{path} has no type"
        # false is not allowed beside properties; true would prune everything nested under it
        assert not isinstance(node.get("additionalProperties"), bool), path
        if (node["type"] == "object" and path != ".metadata"  # metadata: the apiserver owns its schema
                and "properties" not in node and "additionalProperties" not in node):
            assert node.get("x-kubernetes-preserve-unknown-fields") is True, path
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(bound, False), bool), f"{path}.{bound} must be a boolean in OpenAPI v3.0"


@pytest.mark.parametrize("build", [recmodel_crd, recexperiment_crd])
def test_names_columns_and_status(build):
    crd = build()
    names = crd["spec"]["names"]
    assert names["categories"] == ["recops"]
    assert names["shortNames"] == [{"RecModel": "rm", "RecExperiment": "rexp"}[names["kind"]]]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [column["name"] for column in version["additionalPrinterColumns"]]
    expected = {
        "RecModel": ["Phase", "Revision", "Recall", "Endpoint"],
        "RecExperiment": ["Phase", "Step", "Weight", "Winner"],
    }[names["kind"]]
    assert columns[: len(expected)] == expected and columns[-1] == "Age"


def _apply_defaults(schema: dict, value: Any) -> Any:
    """What the apiserver's structural defaulting does: fill absent fields with their ``default``,
    then recurse (a defaulted ``{}`` gets its own fields' defaults)."""
    if isinstance(value, dict) and "properties" in schema:
        for name, child in schema["properties"].items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                value[name] = _apply_defaults(child, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_apply_defaults(schema["items"], item) for item in value]
    return value


MINIMAL_MODEL = {"data": {"source": "synthetic"}}
MINIMAL_EXPERIMENT = {
    "control": {"model": "a"}, "treatment": {"model": "b"}, "assignment": {"salt": "s"},
    "steps": [{"weight": 10, "pause": "5m"}, {"weight": 100, "pause": "5m"}],
    "gates": [{"type": "ctrLift"}, {"type": "sampleRatio"}, {"type": "latencyP99", "maxMilliseconds": 50},
              {"type": "errorRate", "maxRatio": 0.01}, {"type": "promql", "query": "up", "op": "gt", "threshold": 0}],
    "prometheus": {"url": "http://prometheus:9090"},
}


@pytest.mark.parametrize(("build", "model", "minimal"), [
    (recmodel_crd, RecModelSpec, MINIMAL_MODEL),
    (recexperiment_crd, RecExperimentSpec, MINIMAL_EXPERIMENT),
])
def test_apiserver_defaults_agree_with_pydantic(build, model, minimal):
    spec_schema = _schema(build())["properties"]["spec"]
    defaulted = _apply_defaults(spec_schema, copy.deepcopy(minimal))
    assert defaulted != minimal  # the schema does default something
    # What the operator reads after the apiserver defaulted the object is what pydantic makes of the
    # user's manifest: no default the schema adds is refused or different.
    assert model.model_validate(defaulted) == model.model_validate(minimal)


def test_gate_union_rules_name_the_fields():
    gates = _schema(recexperiment_crd())["properties"]["spec"]["properties"]["gates"]
    rules = {rule["message"] for rule in gates["items"]["x-kubernetes-validations"]}
    assert "maxMilliseconds is required for type latencyP99" in rules
    assert "query applies only to type promql" in rules
    assert "alpha must be <= 0.1 for type sampleRatio" in rules
    assert gates["items"]["properties"]["type"]["enum"][0] == "ctrLift"
    assert all("default" not in field for field in gates["items"]["properties"].values())


def test_quantities_are_checked_by_pydantic_too():
    with pytest.raises(ValueError, match="Kubernetes quantity"):
        RecModelSpec.model_validate({"data": {"source": "synthetic"}, "serving": {"resources": {"memory": "8 GB"}}})
    spec = RecModelSpec.model_validate({"data": {"source": "synthetic"}, "serving": {"resources": {"cpu": 4}}})
    assert spec.serving.resources.cpu == 4
