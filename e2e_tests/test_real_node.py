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
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2e_tests.ab import CONTROL_MODEL, TREATMENT_MODEL
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


def test_helm_install_runs_the_operator_in_real_pods(cluster, chart, real_module_namespace):
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
    cluster.kubectl("apply", "-n", real_module_namespace, "-f", "-", input=json.dumps(model))
    jobs = wait_until(lambda: cluster.kubectl.json("get", "jobs", "-n", real_module_namespace)["items"] or None,
                      timeout=90, what="the operator (in its pod) to create the training Job")
    assert jobs[0]["metadata"]["ownerReferences"][0]["name"] == "real"
    # Neither replica restarted: the liveness probe (kopf's /healthz) passed all along.
    pods = operator_pods(cluster)
    assert [p["status"]["containerStatuses"][0]["restartCount"] for p in pods["items"]] == [0, 0]
    # Gone with its Job before the module's models train on the node's two CPUs.
    cluster.kubectl("delete", "recmodel", "real", "-n", real_module_namespace, "--cascade=foreground",
                    "--timeout=120s", timeout=130)


# --- The README path in real pods: the chart, two RecModels trained and served, a RecExperiment ---------

# The demo's two models (recops.demo.models) on its quick shop, sized for the real node (2 CPUs, no GPU):
# the specs' defaults ask 2 CPUs per container, more than the node has beside the operator.
TRAINING_RESOURCES = {"cpu": "500m", "memory": "4Gi"}
SERVING_RESOURCES = {"cpu": "250m", "memory": "4Gi"}


@pytest.fixture(scope="module")
def chart(cluster, node_images, apply_crds, real_module_namespace) -> Iterator[str]:
    """The README's ``helm install``, watching ``real_module_namespace``: the operator runs in pods of its image."""
    image = node_images.ensure("operator")
    annotate_for_real_node(cluster, RELEASE_NAMESPACE)
    try:
        helm(cluster, "install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE,
             "--set", f"operator.watchNamespaces={{{real_module_namespace}}}")
        done = cluster.kubectl("rollout", "status", "deployment/recops", "-n", RELEASE_NAMESPACE, "--timeout=180s",
                               check=False, timeout=200)
        assert done.returncode == 0, f"{done.stdout}{done.stderr}\n{json.dumps(operator_pods(cluster))[-3000:]}"
        yield image
    finally:
        cluster.kubectl("delete", "recmodels,recexperiments", "--all", "-n", real_module_namespace, "--wait=false",
                        check=False)
        helm(cluster, "uninstall", RELEASE, "-n", RELEASE_NAMESPACE, "--wait", check=False)
        cluster.kubectl("delete", "namespace", RELEASE_NAMESPACE, "--timeout=120s", check=False, timeout=130)


def recmodel_manifest(name: str, spec) -> dict:
    document = spec.model_dump(by_alias=True, mode="json", exclude_none=True)
    document["training"]["resources"] = TRAINING_RESOURCES
    document["serving"].update(replicas=1, resources=SERVING_RESOURCES)
    return {"apiVersion": "recops.dev/v1alpha1", "kind": "RecModel", "metadata": {"name": name}, "spec": document}


@dataclass
class ServedModels:
    """The two RecModels of the module, Ready: trained in trainer pods, served by Triton pods."""

    namespace: str
    folder: Path  # the artifact volume's folder on this machine
    status: dict[str, dict]
    phases: dict[str, list[tuple[str, float]]]


@pytest.fixture(scope="module")
def served_models(cluster, node_images, chart, real_module_namespace, tmp_path_factory) -> Iterator[ServedModels]:
    """The demo's control and treatment as RecModels, both trained and served in real pods."""
    from recops.demo.models import demo_models, synthetic_data_spec

    node_images.ensure("trainer")
    node_images.ensure("triton")
    namespace = real_module_namespace
    # The volume's owner is the pods' uid, as an NFS export's admin would set it (hostPath ignores fsGroup).
    folder = tmp_path_factory.mktemp("real-artifacts")
    os.chown(folder, RUN_AS_USER, RUN_AS_USER)
    volume = bind_artifact_claim(cluster, namespace, folder)
    models = demo_models(synthetic_data_spec(quick=True, seed=0), quick=True)
    names = {CONTROL_MODEL: models.control, TREATMENT_MODEL: models.treatment}
    try:
        for name, spec in names.items():
            cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(recmodel_manifest(name, spec)))
        started, phases = time.monotonic(), {name: [] for name in names}

        def ready() -> dict | None:
            found = {}
            for name in names:
                status = cluster.kubectl.json("get", "recmodel", name, "-n", namespace).get("status", {})
                seen = phases[name]
                if status.get("phase") and (not seen or seen[-1][0] != status["phase"]):
                    seen.append((status["phase"], round(time.monotonic() - started, 1)))
                assert status.get("phase") != "Failed", (name, status)
                found[name] = status
            return found if all(s.get("phase") == "Ready" for s in found.values()) else None

        status = wait_until(ready, timeout=1200, interval=2, what="both RecModels to be Ready",
                            on_timeout=lambda: describe(cluster, namespace))
        print(f"\nphases (s since apply): {phases}")
        yield ServedModels(namespace, folder, status, phases)
    finally:
        cluster.kubectl("delete", "recexperiments,recmodels", "--all", "-n", namespace, "--wait=false", check=False)
        cluster.kubectl("delete", "pv", volume, "--wait=false", check=False)


def test_recmodels_train_and_serve_in_real_pods(cluster, served_models):
    """RecModel → training Job in the trainer image (its termination message read by the operator) → Triton
    Deployment in the Triton image (init export, probes) → a request through the Service answers with its items."""
    namespace = served_models.namespace
    for name, status in served_models.status.items():
        # The metrics came from the trainer's termination message, which this test never wrote.
        job = status["trainingJob"]
        (pod,) = cluster.kubectl.json("get", "pods", "-n", namespace, "-l", f"job-name={job}")["items"]
        assert pod["spec"]["nodeName"] == NODE_NAME
        message = json.loads(pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"])
        assert status["metrics"]["recall@20"] == pytest.approx(message["metrics"]["recall@20"])
        # The Triton pod: the init container exported, every container ready and never restarted.
        (triton,) = cluster.kubectl.json("get", "pods", "-n", namespace, "-l",
                                         f"app.kubernetes.io/component=serving,app.kubernetes.io/instance={name}")["items"]
        assert triton["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
        assert all(c["ready"] and c["restartCount"] == 0 for c in triton["status"]["containerStatuses"])
        # A request from outside the pod, through the Service's ClusterIP (kube-proxy), answers with trained items.
        service = cluster.kubectl.json("get", "service", status["endpoint"].split(".")[0], "-n", namespace)
        answer = asyncio.run(recommend(f"{service['spec']['clusterIP']}:8001"))
        assert len(answer.item_ids) == 10 and len(set(answer.item_ids)) == 10
        catalogue = trained_items(served_models.folder / namespace / name / status["revision"])
        assert set(answer.item_ids) <= catalogue


async def recommend(address: str):
    from recops.serving.triton_client import TritonRecommender

    return await TritonRecommender(address, timeout_s=30).recommend("u0", [], 10, None)


def trained_items(model_dir: Path) -> set[str]:
    """The item ids of the model the trainer pod exported (read back by the code serving uses)."""
    from recops.training.export import load_serving_metadata

    items, _ = load_serving_metadata(model_dir)
    return set(items["item_id"].to_list())


def describe(cluster: ClusterAccess, namespace: str) -> str:
    return cluster.kubectl("describe", "recmodel,rexp,jobs,pods", "-n", namespace, check=False).stdout[-6000:]
