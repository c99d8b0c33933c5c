"""Real pods: our images in containers on a real kubelet + containerd node (issue 13).

Nothing here is played by kwok or run as a host process: the kubelet starts the containers of the images
built from this repository's Dockerfiles, under the security context the manifests set.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e_tests.chart import CHART, RELEASE, RELEASE_NAMESPACE, helm
from e2e_tests.localcluster import ClusterAccess, wait_until
from e2e_tests.realnode import NODE_NAME
from e2e_tests.realnode_fixtures import annotate_for_real_node
from e2e_tests.recops_fixtures import bind_artifact_claim
from recops.operator.manifests.common import RUN_AS_USER

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
                       and p, timeout=120, what="the in-cluster client pod to finish")
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


# Sized for the real node (2 CPUs): the defaults (2 CPUs per container) would not fit beside the operator.
SMALL_MODEL = {
    "apiVersion": "recops.dev/v1alpha1", "kind": "RecModel", "metadata": {"name": "shop"},
    "spec": {
        "data": {"source": "synthetic", "synthetic": {"users": 300, "items": 200, "days": 30, "seed": 0}},
        "backbone": {"name": "builtin:tiny-qwen2"},
        "training": {"epochs": 1, "resources": {"cpu": "1", "memory": "4Gi"}},
        "serving": {"replicas": 1, "resources": {"cpu": "500m", "memory": "4Gi"}},
    },
}


def test_a_recmodel_trains_and_serves_in_real_pods(cluster, node_images, chart, real_namespace, tmp_path):
    """RecModel → training Job in the trainer image (its termination message read by the operator) → Triton
    Deployment in the Triton image (init export, probes) → a request through the Service answers with its items."""
    node_images.ensure("trainer")
    node_images.ensure("triton")
    # The volume's owner is the pods' uid, as an NFS export's admin would set it (hostPath ignores fsGroup).
    folder = tmp_path / "artifacts"
    folder.mkdir()
    os.chown(folder, RUN_AS_USER, RUN_AS_USER)
    volume = bind_artifact_claim(cluster, real_namespace, folder)
    try:
        cluster.kubectl("apply", "-n", real_namespace, "-f", "-", input=json.dumps(SMALL_MODEL))
        started, phases = time.monotonic(), []

        def ready() -> dict | None:
            status = cluster.kubectl.json("get", "recmodel", "shop", "-n", real_namespace).get("status", {})
            if status.get("phase") and (not phases or phases[-1][0] != status["phase"]):
                phases.append((status["phase"], round(time.monotonic() - started, 1)))
            assert status.get("phase") != "Failed", status
            return status if status.get("phase") == "Ready" else None

        status = wait_until(ready, timeout=900, interval=2, what="RecModel shop to be Ready",
                            on_timeout=lambda: describe(cluster, real_namespace))
        print(f"phases (s since apply): {phases}")
        # The metrics came from the trainer's termination message, which this test never wrote.
        job = status["trainingJob"]
        (pod,) = cluster.kubectl.json("get", "pods", "-n", real_namespace, "-l", f"job-name={job}")["items"]
        assert pod["spec"]["nodeName"] == NODE_NAME
        message = json.loads(pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"])
        assert status["metrics"]["recall@20"] == pytest.approx(message["recall@20"])
        # The Triton pod: the init container exported, both containers ready and never restarted.
        (triton,) = cluster.kubectl.json("get", "pods", "-n", real_namespace, "-l",
                                         "app.kubernetes.io/component=serving")["items"]
        assert triton["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
        assert all(c["ready"] and c["restartCount"] == 0 for c in triton["status"]["containerStatuses"])
        # A request from outside the pod, through the Service's ClusterIP (kube-proxy), answers with trained items.
        service = cluster.kubectl.json("get", "service", status["endpoint"].split(".")[0], "-n", real_namespace)
        answer = asyncio.run(recommend(f"{service['spec']['clusterIP']}:8001"))
        assert len(answer.item_ids) == 10 and len(set(answer.item_ids)) == 10
        catalogue = trained_items(folder / real_namespace / "shop" / status["revision"])
        assert set(answer.item_ids) <= catalogue
    finally:
        cluster.kubectl("delete", "recmodel", "shop", "-n", real_namespace, "--wait=false", check=False)
        cluster.kubectl("delete", "pv", volume, "--wait=false", check=False)


async def recommend(address: str):
    from recops.serving.triton_client import TritonRecommender

    return await TritonRecommender(address, timeout_s=30).recommend("u0", [], 10, None)


def trained_items(model_dir: Path) -> set[str]:
    """The item ids of the model the trainer pod exported (read back by the code serving uses)."""
    from recops.training.export import load_serving_metadata

    items, _ = load_serving_metadata(model_dir)
    return set(items["item_id"].to_list())


def describe(cluster: ClusterAccess, namespace: str) -> str:
    return cluster.kubectl("describe", "recmodel,jobs,pods", "-n", namespace, check=False).stdout[-5000:]
