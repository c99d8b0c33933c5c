"""Real pods: our images in containers on a real kubelet + containerd node (issue 13).

Nothing here is played by kwok or run as a host process: the kubelet starts the containers of the images
built from this repository's Dockerfiles, under the security context the manifests set.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from e2e_tests.chart import CHART, RELEASE, RELEASE_NAMESPACE, helm
from e2e_tests.localcluster import ClusterAccess, wait_until
from e2e_tests.realnode import NODE_NAME
from e2e_tests.realnode_fixtures import annotate_for_real_node

pytestmark = pytest.mark.real_node


def pod_phase(cluster: ClusterAccess, namespace: str, name: str) -> str:
    return cluster.kubectl.json("get", "pod", name, "-n", namespace)["status"].get("phase", "")


def operator_pods(cluster: ClusterAccess) -> dict:
    return cluster.kubectl.json("get", "pods", "-n", RELEASE_NAMESPACE, "-l", "app.kubernetes.io/name=recops-operator")


def test_a_pod_of_our_image_finds_the_apiserver_through_cluster_dns(cluster, node_images, real_namespace):
    image = node_images.ensure("operator")
    script = ("import socket; from kubernetes import client, config; config.load_incluster_config(); "
              "print(socket.gethostbyname('kubernetes.default.svc.cluster.local'), "
              "client.VersionApi().get_code().git_version)")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "in-cluster-client", "namespace": real_namespace},
           "spec": {"restartPolicy": "Never", "containers": [
               {"name": "client", "image": image, "imagePullPolicy": "Never", "command": ["python", "-c", script]}]}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    phase = wait_until(lambda: (p := pod_phase(cluster, real_namespace, "in-cluster-client")) in ("Succeeded", "Failed")
                       and p, timeout=120, what="the in-cluster client pod to finish",
                       on_timeout=lambda: json.dumps(cluster.kubectl.json(
                           "get", "pod", "in-cluster-client", "-n", real_namespace)["status"]))
    logs = cluster.kubectl("logs", "in-cluster-client", "-n", real_namespace, check=False).stdout
    assert phase == "Succeeded", logs
    found = cluster.kubectl.json("get", "pod", "in-cluster-client", "-n", real_namespace)
    assert found["spec"]["nodeName"] == NODE_NAME
    # The kubernetes Service's ClusterIP, through CoreDNS; then the apiserver's own version, through kube-proxy.
    address, version = logs.split()
    assert address == "10.96.0.1"
    assert version == cluster.kubectl.json("version")["serverVersion"]["gitVersion"]


@pytest.fixture
def chart(cluster, node_images, apply_crds, real_namespace) -> Iterator[str]:
    """The README's ``helm install``, watching ``real_namespace``: the operator runs in pods of its image."""
    image = node_images.ensure("operator")
    annotate_for_real_node(cluster, RELEASE_NAMESPACE)
    try:
        helm(cluster, "install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE,
             "--set", f"operator.watchNamespaces={{{real_namespace}}}")
        done = cluster.kubectl("rollout", "status", "deployment/recops", "-n", RELEASE_NAMESPACE, "--timeout=180s",
                               check=False, timeout=200)
        assert done.returncode == 0, f"{done.stdout}{done.stderr}\n{json.dumps(operator_pods(cluster))[-3000:]}"
        yield image
    finally:
        cluster.kubectl("delete", "recmodels,recexperiments", "--all", "-n", real_namespace, "--wait=false",
                        check=False)
        helm(cluster, "uninstall", RELEASE, "-n", RELEASE_NAMESPACE, "--wait", check=False)
        # Gone before the next test installs the chart into it again.
        cluster.kubectl("delete", "namespace", RELEASE_NAMESPACE, "--timeout=120s", check=False, timeout=130)


def test_helm_install_runs_the_operator_in_real_pods(cluster, chart, real_namespace):
    """The chart's Deployment: two replicas from the operator image, non-root, read-only root, probes passing."""
    pods = operator_pods(cluster)
    assert len(pods["items"]) == 2
    for pod in pods["items"]:
        name = pod["metadata"]["name"]
        assert pod["spec"]["nodeName"] == NODE_NAME
        (status,) = pod["status"]["containerStatuses"]
        assert status["ready"] and status["image"].endswith(chart.split("/", 1)[1])
        user = cluster.kubectl("exec", "-n", RELEASE_NAMESPACE, name, "--", "id", "-u").stdout.strip()
        assert user == "1000"
        write = cluster.kubectl("exec", "-n", RELEASE_NAMESPACE, name, "--", "python", "-c",
                                "open('/probe', 'w')", check=False)
        assert write.returncode != 0 and "Read-only file system" in write.stderr
        # /tmp is the chart's emptyDir: the one place it writes.
        cluster.kubectl("exec", "-n", RELEASE_NAMESPACE, name, "--", "python", "-c", "open('/tmp/probe', 'w')")

    # The operator at work, under the chart's RBAC: a RecModel in the watched namespace gets its Job.
    model = {"apiVersion": "recops.dev/v1alpha1", "kind": "RecModel", "metadata": {"name": "real"},
             "spec": {"data": {"source": "synthetic", "synthetic": {"users": 200, "items": 100}},
                      "backbone": {"name": "builtin:minilm"}}}
    cluster.kubectl("apply", "-n", real_namespace, "-f", "-", input=json.dumps(model))
    jobs = wait_until(lambda: cluster.kubectl.json("get", "jobs", "-n", real_namespace)["items"] or None,
                      timeout=90, what="the operator (in its pod) to create the training Job")
    assert jobs[0]["metadata"]["ownerReferences"][0]["name"] == "real"
    # Neither replica restarted: the liveness probe (kopf's /healthz) passed all along.
    pods = operator_pods(cluster)
    assert [p["status"]["containerStatuses"][0]["restartCount"] for p in pods["items"]] == [0, 0]
