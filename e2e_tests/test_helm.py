"""The Helm chart on a real apiserver: install, the operator running with the chart's ServiceAccount
(its RBAC, not admin) to Ready, Promoted and RolledBack, upgrade, uninstall.

kwok runs no containers, so the operator the chart deploys runs here as a process: with the exact
arguments and environment of the chart's Deployment (ports aside) and a token of the chart's
ServiceAccount. A verb missing from the chart's RBAC fails these tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import yaml

from e2e_tests.ab import ab_test, finish
from e2e_tests.chart import CHART, RELEASE, RELEASE_NAMESPACE, ChartOperator, chart_objects, helm
from e2e_tests.recops_fixtures import MODEL, model_status, train_to_ready


@pytest.fixture
def installed(cluster, apply_crds, namespace) -> Iterator[str]:
    if cluster.local is None:
        pytest.skip("runs the chart's operator with a ServiceAccount token made by the local control plane")
    helm(cluster, "install", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE, "--create-namespace",
         "--set", f"operator.watchNamespaces={{{namespace}}}", "--set", "monitoring.enabled=false", "--wait=false")
    try:
        yield namespace
    finally:
        helm(cluster, "uninstall", RELEASE, "-n", RELEASE_NAMESPACE, check=False)


def test_install_run_with_the_charts_rbac_upgrade_and_uninstall(cluster, installed, artifacts, stack, tmp_path):
    namespace = installed
    objects = {(o["kind"], o["metadata"]["name"]) for o in chart_objects(cluster)}
    assert ("Deployment", "recops") in objects and ("KopfPeering", "recops") in objects
    operator = ChartOperator(cluster, tmp_path / "operator.log").start()
    try:
        # A RecModel to Ready, then two experiments: a better treatment promoted, a worse one rolled back.
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(MODEL))
        status = train_to_ready(cluster, namespace)
        assert status["recall"] == 0.31
        with ab_test(cluster, namespace, stack, "helm-better"):
            promoted = finish(cluster, namespace, "helm-better")
        assert promoted["phase"] == "Promoted", promoted.get("message")
        cluster.kubectl("delete", "rexp", "helm-better", "-n", namespace)
        with ab_test(cluster, namespace, stack, "helm-worse", treatment="weaker"):
            rolled_back = finish(cluster, namespace, "helm-worse")
        assert rolled_back["phase"] == "RolledBack", rolled_back.get("message")
        table = cluster.kubectl("get", "rm,rexp", "-n", namespace).stdout
        assert "PHASE" in table and "REVISION" in table and "WEIGHT" in table and "WINNER" in table
        assert operator.forbidden() == [], operator.forbidden()
    finally:
        operator.stop()

    # An upgrade with changed values reaches the Deployment.
    helm(cluster, "upgrade", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE, "--reuse-values",
         "--set", "operator.reconcileIntervalSeconds=2", "--wait=false")
    deployment = next(o for o in chart_objects(cluster) if o["kind"] == "Deployment")
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RECOPS_RECONCILE_INTERVAL_SECONDS"] == "2"
    live = cluster.kubectl.json("get", "deployment", "recops", "-n", RELEASE_NAMESPACE)
    assert {e["name"]: e.get("value") for e in live["spec"]["template"]["spec"]["containers"][0]["env"]}[
        "RECOPS_RECONCILE_INTERVAL_SECONDS"] == "2"

    # Uninstall: the chart's objects go; the CRDs and the user's resources stay (documented).
    helm(cluster, "uninstall", RELEASE, "-n", RELEASE_NAMESPACE)
    selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/managed-by=Helm"
    for kind, scope in (("deployments,services,serviceaccounts,networkpolicies", ["-n", RELEASE_NAMESPACE]),
                        ("clusterroles,clusterrolebindings", []), ("rolebindings,kopfpeerings", ["-n", namespace])):
        left = cluster.kubectl("get", kind, *scope, "-l", selector, "-o", "name").stdout.split()
        assert left == [], left
    assert cluster.kubectl("get", "crd", "recmodels.recops.dev", check=False).returncode == 0
    assert model_status(cluster, namespace)["phase"] == "Ready"
