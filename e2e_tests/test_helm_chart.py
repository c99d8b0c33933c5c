"""The chart as files: `helm lint`, golden `helm template` output for the default values and a full
set, bad values refused by the values schema, the chart's CRDs equal to the generated ones, and the
RBAC it grants is exactly what the operator uses (no wildcards, no Secrets).

Golden files: e2e_tests/golden/; after an intended change, regenerate them with
`RECOPS_UPDATE_GOLDEN=1 pytest e2e_tests/test_helm_chart.py` and review the diff.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from e2e_tests.localcluster import ClusterError, ensure_binaries
from e2e_tests.recops_fixtures import REPO

CHART = REPO / "helm" / "recops"
GOLDEN = Path(__file__).with_name("golden")
FULL_VALUES = GOLDEN / "values-full.yaml"


@pytest.fixture(scope="module")
def helm() -> str:
    """The helm binary built with the local control plane (or one on PATH)."""
    try:
        return str(ensure_binaries() / "helm")
    except ClusterError as error:
        found = shutil.which("helm")
        if found:
            return found
        if os.environ.get("RECOPS_REQUIRE_CLUSTER") == "1":
            pytest.fail(f"no helm: {error}")
        pytest.skip(f"no helm: {error}")


def run(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([helm, *args], capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise AssertionError(done.stdout + done.stderr)
    return done


def template(helm: str, *values: str) -> str:
    # Fixed names and a fixed capability set: the output must not depend on the machine.
    return run(helm, "template", "recops", str(CHART), "--namespace", "recops-system", *values).stdout


def test_helm_lint(helm):
    out = run(helm, "lint", str(CHART), "--strict").stdout
    assert "0 chart(s) failed" in out
    run(helm, "lint", str(CHART), "--strict", "-f", str(FULL_VALUES))


@pytest.mark.parametrize(("name", "values"), [("default", []), ("full", ["-f", str(FULL_VALUES)])])
def test_helm_template_matches_the_golden_file(helm, name, values):
    rendered = template(helm, *values)
    golden = GOLDEN / f"helm-{name}.yaml"
    if os.environ.get("RECOPS_UPDATE_GOLDEN") == "1":
        golden.write_text(rendered)
    assert rendered == golden.read_text(), f"helm template differs from {golden}: review and regenerate"


def test_the_full_values_turn_everything_on(helm):
    kinds = {doc["kind"] for doc in yaml.safe_load_all(template(helm, "-f", str(FULL_VALUES))) if doc}
    assert {"ServiceMonitor", "PrometheusRule", "ConfigMap", "RoleBinding", "KopfPeering", "NetworkPolicy"} <= kinds
    dashboard = next(doc for doc in yaml.safe_load_all(template(helm, "-f", str(FULL_VALUES)))
                     if doc and doc["kind"] == "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert '"panels"' in dashboard["data"]["recops.json"]


@pytest.mark.parametrize(("setting", "message"), [
    ("operator.replicas=0", "/operator/replicas"),
    ("router.memory=8 GB", "/router/memory"),
    ("operator.watchNamespaces[0]=Shop_1", "/operator/watchNamespaces/0"),
    ("images.pullPolicy=Sometimes", "/images/pullPolicy"),
    ("monitoring.enabled=maybe", "/monitoring/enabled"),
    ("operator.typo=1", "typo"),
])
def test_bad_values_are_refused_naming_the_value(helm, setting, message):
    done = run(helm, "template", "recops", str(CHART), "--set", setting, check=False)
    assert done.returncode != 0 and message in done.stderr, done.stderr


def test_the_charts_crds_are_the_generated_ones():
    from recops.api.crds import render_crds

    for name, text in render_crds().items():
        assert (CHART / "crds" / name).read_text() == text, f"helm/recops/crds/{name} is stale: recops crds --out"


def test_rbac_has_no_wildcards_and_no_secrets(helm):
    for doc in yaml.safe_load_all(template(helm, "-f", str(FULL_VALUES))):
        if not doc or doc["kind"] not in ("ClusterRole", "Role"):
            continue
        for rule in doc["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], rule
            assert "secrets" not in rule["resources"], rule
            assert not {"deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
            # The one delete: a retrained revision's candidate RecModel and RecExperiment, once decided.
            # Everything else goes with its owner (garbage collection).
            if "delete" in rule["verbs"]:
                assert rule["apiGroups"] == ["recops.dev"] and set(rule["resources"]) == {"recmodels",
                                                                                       "recexperiments"}, rule


def test_the_deployment_is_locked_down(helm):
    deployment = next(doc for doc in yaml.safe_load_all(template(helm)) if doc and doc["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert "--liveness-port=8080" in container["args"]
