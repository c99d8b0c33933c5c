"""The cluster the end-to-end tests run against does what they rely on.

Against the local control plane this proves the wiring: kwok's fake node is Ready, the
controller-manager's controllers run (ServiceAccounts, Jobs, Deployments), the scheduler binds
pods and kwok plays their lifecycle. Against a real cluster the same checks hold.
"""

from __future__ import annotations

import json
from typing import Any

from e2e_tests.localcluster import FAKE_NODE, ClusterAccess, wait_until

# Never pulled: kwok fakes the containers, and a real cluster has it (it is the pause image).
IMAGE = "registry.k8s.io/pause:3.10"


def _ready(node: dict[str, Any]) -> bool:
    conditions = node.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def test_the_fake_node_is_ready_and_offers_gpus(cluster: ClusterAccess) -> None:
    if cluster.local is None:
        nodes = cluster.kubectl.json("get", "nodes")["items"]
        assert any(_ready(node) for node in nodes)
        return
    node = cluster.kubectl.json("get", "node", FAKE_NODE)
    assert _ready(node)
    assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert node["status"]["allocatable"]["cpu"] == "32"
    assert not node["spec"].get("taints")


def test_kubectl_get_nodes_works_with_the_kubeconfig(cluster: ClusterAccess) -> None:
    listed = cluster.kubectl("get", "nodes", "--no-headers").stdout
    assert " Ready " in listed
    if cluster.local is not None:
        assert FAKE_NODE in listed
        # The binaries carry the exact version, so version checks in clients see a real release.
        version = cluster.kubectl.json("version")
        assert version["serverVersion"]["gitVersion"] == version["clientVersion"]["gitVersion"]
        assert version["serverVersion"]["gitVersion"].startswith("v1.")


def test_a_new_namespace_gets_its_default_service_account(cluster: ClusterAccess, namespace: str) -> None:
    _wait_for_default_service_account(cluster, namespace)
    account = cluster.kubectl.json("get", "serviceaccount", "default", "-n", namespace)
    assert account["metadata"]["namespace"] == namespace


def test_a_job_runs_to_completion(cluster: ClusterAccess, namespace: str) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "once", "namespace": namespace},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": IMAGE, "resources": {"requests": {"cpu": "100m"}}}],
                }
            },
        },
    }
    _apply_when_pods_are_admitted(cluster, namespace, job)
    cluster.kubectl("wait", "--for=condition=Complete", "job/once", "-n", namespace, "--timeout=60s")
    status = cluster.kubectl.json("get", "job", "once", "-n", namespace)["status"]
    assert status["succeeded"] == 1
    assert not status.get("failed")


def test_a_deployment_becomes_available(cluster: ClusterAccess, namespace: str) -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "main", "image": IMAGE}]},
            },
        },
    }
    _apply_when_pods_are_admitted(cluster, namespace, deployment)
    cluster.kubectl("rollout", "status", "deployment/web", "-n", namespace, "--timeout=60s")
    cluster.kubectl("wait", "--for=condition=Available", "deployment/web", "-n", namespace, "--timeout=30s")
    status = cluster.kubectl.json("get", "deployment", "web", "-n", namespace)["status"]
    assert status["readyReplicas"] == 2
    assert status["availableReplicas"] == 2
    pods = cluster.kubectl.json("get", "pods", "-n", namespace, "-l", "app=web")["items"]
    assert [pod["status"]["phase"] for pod in pods] == ["Running", "Running"]
    if cluster.local is not None:
        assert {pod["spec"]["nodeName"] for pod in pods} == {FAKE_NODE}


def _wait_for_default_service_account(cluster: ClusterAccess, namespace: str) -> None:
    """The controller-manager creates it shortly after the namespace; pods are refused until then."""
    wait_until(
        lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", namespace, check=False).returncode == 0,
        timeout=30,
        what=f"serviceaccount default in {namespace}",
    )


def _apply_when_pods_are_admitted(cluster: ClusterAccess, namespace: str, manifest: dict[str, Any]) -> None:
    """Apply once the namespace's default ServiceAccount exists, so its pods are not refused.

    A controller would retry refused pods anyway, but only after a back-off that slows the test.
    """
    _wait_for_default_service_account(cluster, namespace)
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
