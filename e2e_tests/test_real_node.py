"""Real pods: our images in containers on a real kubelet + containerd node (issue 13).

Nothing here is played by kwok or run as a host process: the kubelet starts the containers of the images
built from this repository's Dockerfiles, under the security context the manifests set.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from e2e_tests.ab import (
    CONTROL_MODEL,
    TERMINAL,
    TREATMENT_MODEL,
    Stack,
    Traffic,
    experiment_manifest,
    experiment_status,
    finish,
)
from e2e_tests.chart import CHART, RELEASE, RELEASE_NAMESPACE, helm
from e2e_tests.localcluster import ClusterAccess, wait_until
from e2e_tests.realnode import CGROUP_CONTROLLERS, NODE_NAME, reap_node
from e2e_tests.realnode_fixtures import annotate_for_real_node
from e2e_tests.recops_fixtures import bind_artifact_claim
from recops.operator.manifests.common import RUN_AS_USER

pytestmark = pytest.mark.real_node


def pod_phase(cluster: ClusterAccess, namespace: str, name: str) -> str:
    return cluster.kubectl.json("get", "pod", name, "-n", namespace)["status"].get("phase", "")


def operator_pods(cluster: ClusterAccess) -> dict:
    return cluster.kubectl.json("get", "pods", "-n", RELEASE_NAMESPACE, "-l", "app.kubernetes.io/name=recops-operator")


def test_what_a_killed_node_left_is_reaped_before_the_next_one_starts(tmp_path):
    """CI once failed every real-node test on "/run/netns/recops-node: File exists": a run killed before its
    teardown had left the node's namespace. Here a node's leftovers are made by hand, under names of their
    own (so that a live node is not touched), and reaped as ``RealNode.start()`` reaps its predecessor's."""
    netns, veth, cgroup_root = "recops-reap-test", "rr-host", "recops-reap-test"
    work_dir = tmp_path / "node"
    mount_point = work_dir / "kubelet" / "pods" / "p" / "volumes" / "token"
    mount_point.mkdir(parents=True)
    (work_dir / "logs").mkdir()
    (work_dir / "logs" / "kubelet.log").write_text("kept\n")

    def run(*command: str) -> None:
        subprocess.run(command, check=True, capture_output=True)

    processes: list[subprocess.Popen] = []
    try:
        run("ip", "netns", "add", netns)  # fails ("File exists") if an earlier run of this test left it
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", "rr-node")
        run("mount", "-t", "tmpfs", "tmpfs", str(mount_point))
        processes.append(subprocess.Popen(["nsenter", f"--net=/var/run/netns/{netns}", "sleep", "600"]))
        processes.append(pod := subprocess.Popen(["sleep", "600"]))
        pod_cgroup = Path("/sys/fs/cgroup/pids") / cgroup_root / "pod-a"
        pod_cgroup.mkdir(parents=True)
        (pod_cgroup / "cgroup.procs").write_text(str(pod.pid))
        processes.append(subprocess.Popen(["socat", "TCP-LISTEN:0,bind=127.0.0.77,fork,reuseaddr", "STDOUT"]))
        time.sleep(0.5)
        reap_node(netns, veth, cgroup_root, work_dir, listener="bind=127.0.0.77")
        for proc in processes:
            assert proc.wait(timeout=10) == -9, proc.args
        assert not Path(f"/var/run/netns/{netns}").exists()
        assert subprocess.run(["ip", "link", "show", veth], capture_output=True).returncode != 0
        assert str(mount_point) not in Path("/proc/mounts").read_text()
        assert not (work_dir / "kubelet").exists()
        assert (work_dir / "logs" / "kubelet.log").read_text() == "kept\n"
        assert not any((Path("/sys/fs/cgroup") / c / cgroup_root).exists() for c in CGROUP_CONTROLLERS)
        # On a clean host it does nothing, and says nothing.
        reap_node(netns, veth, cgroup_root, work_dir, listener="bind=127.0.0.77")
    finally:
        for proc in processes:
            proc.kill()
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        for controller in CGROUP_CONTROLLERS:
            for directory in sorted((Path("/sys/fs/cgroup") / controller).glob(f"{cgroup_root}*/**/"), reverse=True):
                directory.rmdir()


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
# The node's kubelet refreshes mounted ConfigMaps on its 10 s pod sync (RealNode); the router then reloads
# within a second. The chart's default settle (90 s) is sized for the kubelet's default 1 min sync.
ROUTER_SETTLE_SECONDS = 25


@pytest.fixture(scope="module")
def chart(cluster, node_images, apply_crds, real_module_namespace) -> Iterator[str]:
    """The README's ``helm install``, watching ``real_module_namespace``: the operator runs in pods of its image."""
    image = node_images.ensure("operator")
    annotate_for_real_node(cluster, RELEASE_NAMESPACE)
    try:
        helm(cluster, "install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE,
             "--set", f"operator.watchNamespaces={{{real_module_namespace}}}",
             "--set", f"operator.routerSettleSeconds={ROUTER_SETTLE_SECONDS}", "--set", "router.cpu=100m")
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
        triton = serving_pod(cluster, namespace, name)
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


# Debian's Prometheus (the one these machines have) is built without Kubernetes service discovery, so it
# finds the router pods as a Prometheus outside the cluster's API would: by DNS, through a headless
# Service over the router's pods, one A record per ready pod (CoreDNS), each scraped on its own.
PROMETHEUS_CONFIG = """
global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: recops-routers
    dns_sd_configs: [{{names: [{pods}], type: A, port: {port}, refresh_interval: 2s}}]
"""


# One Prometheus for the module's experiments: the better treatment's, the worse one's, and the better's
# again through faults.
BETTER, WORSE, FAULTS = "real-better", "real-worse", "real-faults"


def prometheus_manifests(namespace: str, image: str, experiments: Sequence[str]) -> list[dict]:
    """A Prometheus pod (non-root, read-only root) and its Service, and a headless Service over the router
    pods the operator will make for each of ``experiments``, for Prometheus to find them by."""
    from recops.operator.manifests.router import ROUTER, ROUTER_PORT, router_name
    from recops.operator.naming import selector

    meta = {"name": "prometheus", "namespace": namespace}
    labels = {"app": "prometheus"}
    pods = {experiment: f"{router_name(experiment)}-pods" for experiment in experiments}
    names = ", ".join(f"{service}.{namespace}.svc.cluster.local" for service in pods.values())
    config = PROMETHEUS_CONFIG.format(pods=names, port=ROUTER_PORT)
    return [
        *({"apiVersion": "v1", "kind": "Service", "metadata": {"name": service, "namespace": namespace},
           "spec": {"clusterIP": "None", "selector": selector(experiment, ROUTER),
                    "ports": [{"name": "metrics", "port": ROUTER_PORT}]}} for experiment, service in pods.items()),
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"prometheus.yml": config}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": {
            "replicas": 1, "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {
                "automountServiceAccountToken": False,
                "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER},
                "containers": [{
                    "name": "prometheus", "image": image, "imagePullPolicy": "Never",
                    "args": ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/data",
                             "--web.listen-address=:9090"],
                    "ports": [{"name": "http", "containerPort": 9090}],
                    "readinessProbe": {"httpGet": {"path": "/-/ready", "port": "http"}, "periodSeconds": 2},
                    "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
                    "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False},
                    "volumeMounts": [{"name": "config", "mountPath": "/etc/prometheus"},
                                     {"name": "data", "mountPath": "/data"}]}],
                "volumes": [{"name": "config", "configMap": {"name": "prometheus"}},
                            {"name": "data", "emptyDir": {}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": meta,
         "spec": {"selector": labels, "ports": [{"name": "http", "port": 9090, "targetPort": "http"}]}},
    ]


def cluster_ip(cluster: ClusterAccess, namespace: str, service: str) -> str:
    return cluster.kubectl.json("get", "service", service, "-n", namespace)["spec"]["clusterIP"]


def prometheus_query(address: str, promql: str) -> list[dict]:
    answer = httpx.get(f"http://{address}/api/v1/query", params={"query": promql}, timeout=5)
    answer.raise_for_status()
    return answer.json()["data"]["result"]


def feedback_lines(folder: Path, event: str) -> int:
    """Lines of ``event`` in every router pod's feedback log on the artifact volume."""
    return sum(line.count(f'"event":"{event}"') for path in folder.rglob("feedback*.jsonl*")
               for line in path.read_text().splitlines())


@pytest.fixture(scope="module")
def in_cluster_prometheus(cluster, node_images, served_models) -> str:
    """Prometheus in a pod of the module's namespace, ready; its address (ClusterIP:9090) for the test."""
    namespace = served_models.namespace
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "List",
        "items": prometheus_manifests(namespace, node_images.prometheus(), (BETTER, WORSE, FAULTS))}))
    done = cluster.kubectl("rollout", "status", "deployment/prometheus", "-n", namespace, "--timeout=120s",
                           check=False, timeout=130)
    assert done.returncode == 0, done.stdout + done.stderr + cluster.kubectl(
        "describe", "pods", "-l", "app=prometheus", "-n", namespace, check=False).stdout[-4000:]
    return f"{cluster_ip(cluster, namespace, 'prometheus')}:9090"


@pytest.fixture(scope="module")
def shoppers(served_models) -> Stack:
    """The simulated shoppers of the shop both models were trained on (same generator, same seed)."""
    from recops.data.prepare import prepare
    from recops.data.synthetic import SyntheticConfig, generate
    from recops.demo.models import SHOP, demo_models, synthetic_data_spec
    from recops.demo.run import Visitors, visitors
    from recops.demo.simulation import SimulatedUsers, SyntheticBehaviour

    size = SHOP["quick"]
    shop = generate(SyntheticConfig(n_users=size["users"], n_items=size["items"], days=size["days"], seed=0))
    data = demo_models(synthetic_data_spec(quick=True, seed=0), quick=True).control.data
    users = visitors(SimulatedUsers.from_interactions(prepare(data, seed=0)))
    return Stack(tritons={}, users=users, behaviour=Visitors(SyntheticBehaviour(shop)), work=served_models.folder)


def run_experiment(cluster: ClusterAccess, served_models: ServedModels, prometheus: str, shoppers: Stack,
                   name: str, control: str, treatment: str, *, steps: list[dict] | None = None,
                   during: Callable[[], None] | None = None) -> tuple[dict, object]:
    """Apply a RecExperiment, wait for its router pods and for Prometheus to scrape both, send shoppers
    through the router's Service until it decides (``during`` runs meanwhile, the shoppers shopping); the
    final status and what the shoppers saw."""
    namespace = served_models.namespace
    manifest = experiment_manifest(name, f"http://prometheus.{namespace}.svc:9090")  # cluster DNS, from the operator
    manifest["spec"].update(control={"model": control}, treatment={"model": treatment})
    if steps is not None:
        manifest["spec"]["steps"] = steps
    started = time.monotonic()
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    router = f"{name}-router"
    wait_until(lambda: cluster.kubectl("get", "deployment", router, "-n", namespace, check=False).returncode == 0,
               timeout=120, what="the operator to create the router Deployment")
    done = cluster.kubectl("rollout", "status", f"deployment/{router}", "-n", namespace, "--timeout=180s",
                           check=False, timeout=190)
    assert done.returncode == 0, done.stdout + done.stderr + describe(cluster, namespace)

    def scraped() -> int:
        ips = pod_ips(cluster, namespace, name)
        return len([s for s in prometheus_query(prometheus, 'up{job="recops-routers"}')
                    if s["metric"]["instance"].rsplit(":", 1)[0] in ips and s["value"][1] == "1"])

    wait_until(lambda: scraped() == 2, timeout=60, what=f"Prometheus to discover and scrape both router pods of {name}")
    routers_up = time.monotonic() - started
    traffic = Traffic(f"http://{cluster_ip(cluster, namespace, router)}:8080", shoppers).start()
    try:
        if during is not None:
            during()
        status = finish(cluster, namespace, name, timeout=900)
    finally:
        result = traffic.stop()
    print(f"\n{name}: routers scraped {routers_up:.0f} s after apply, {status.get('phase')} "
          f"{time.monotonic() - started:.0f} s after apply; shoppers: {result.page_views} page views, "
          f"{sum(arm.clicks for arm in result.arms.values())} clicks")
    assert status["phase"] in ("Promoted", "RolledBack"), f"{status.get('message')}\n{describe(cluster, namespace)}"
    # Every click the shoppers had accepted is in the routers' feedback logs, one file per pod.
    assert result.lost_events == 0, result.errors
    clicks = sum(arm.clicks for arm in result.arms.values())
    assert clicks > 0
    logs = served_models.folder / "feedback" / namespace / name
    assert len([p for p in logs.iterdir() if p.is_dir()]) == 2
    wait_until(lambda: feedback_lines(logs, "click") == clicks, timeout=30,
               what=f"the routers' logs to hold the {clicks} clicks sent",
               on_timeout=lambda: f"{feedback_lines(logs, 'click')} in the logs")
    return status, result


def pod_ips(cluster: ClusterAccess, namespace: str, experiment: str) -> list[str]:
    from recops.operator.manifests.router import ROUTER
    from recops.operator.naming import selector

    labels = ",".join(f"{k}={v}" for k, v in selector(experiment, ROUTER).items())
    pods = cluster.kubectl.json("get", "pods", "-n", namespace, "-l", labels)["items"]
    return [pod["status"]["podIP"] for pod in pods if pod["status"].get("podIP")]


def decided_steps(status: dict) -> list[int]:
    return [entry["step"] for entry in status["rollout"]["history"] if entry["decision"] in ("Start", "Advance")]


def test_a_recexperiment_promotes_the_better_model_through_real_routers_and_an_in_cluster_prometheus(
        cluster, served_models, in_cluster_prometheus, shoppers):
    """RecExperiment → router pods (ConfigMap mounted by the kubelet, a feedback log per pod) → Prometheus in
    the cluster, finding them through cluster DNS → shoppers through the router's Service → Promoted."""
    status, _ = run_experiment(cluster, served_models, in_cluster_prometheus, shoppers, BETTER,
                               control=CONTROL_MODEL, treatment=TREATMENT_MODEL)
    assert status["phase"] == "Promoted", status.get("message")
    assert status["winner"] == TREATMENT_MODEL and status["weight"] == 100
    assert decided_steps(status) == [0, 1, 2]
    cluster.kubectl("delete", "rexp", BETTER, "-n", served_models.namespace, "--wait=true", timeout=120)


def test_a_recexperiment_rolls_back_a_worse_treatment_in_real_pods(cluster, served_models, in_cluster_prometheus,
                                                                   shoppers):
    """The same path with the roles swapped (the ID two-tower as the treatment): the gates fail, RolledBack,
    the treatment's weight back to 0."""
    status, _ = run_experiment(cluster, served_models, in_cluster_prometheus, shoppers, WORSE,
                               control=TREATMENT_MODEL, treatment=CONTROL_MODEL)
    assert status["phase"] == "RolledBack", status.get("message")
    assert status["weight"] == 0 and status["winner"] == TREATMENT_MODEL  # the control arm's model
    assert "Failed" in {gate["verdict"] for gate in status["gates"].values()}, status["gates"]
    router = cluster.kubectl.json("get", "configmap", f"{WORSE}-router", "-n", served_models.namespace)
    arms = {arm["name"]: arm["weightBp"] for arm in yaml.safe_load(router["data"]["router.yaml"])["arms"]}
    assert arms == {"treatment": 0, "control": 10_000}  # what the router pods serve now: everyone on control
    cluster.kubectl("delete", "rexp", WORSE, "-n", served_models.namespace, "--wait=true", timeout=120)


# --- Faults on the real node during a rollout (issue 13, section 4) -------------------------------------

# Longer pauses than the demo's, so that the three faults all land while the experiment is still deciding.
FAULT_STEPS = [{"weight": 10, "pause": "30s"}, {"weight": 30, "pause": "30s"}, {"weight": 50, "pause": "30s"}]


def jobs_of(cluster: ClusterAccess, namespace: str, model: str, component: str = "training") -> list[str]:
    selector = f"app.kubernetes.io/instance={model},app.kubernetes.io/component={component}"
    return [job["metadata"]["name"] for job in cluster.kubectl.json("get", "jobs", "-n", namespace, "-l",
                                                                    selector)["items"]]


def serving_pod(cluster: ClusterAccess, namespace: str, model: str) -> dict:
    (pod,) = cluster.kubectl.json("get", "pods", "-n", namespace, "-l",
                                  f"app.kubernetes.io/component=serving,app.kubernetes.io/instance={model}")["items"]
    return pod


def container_status(pod: dict, name: str) -> dict:
    return next(c for c in pod["status"]["containerStatuses"] if c["name"] == name)


def test_a_rollout_goes_on_to_its_decision_through_an_operator_pod_a_triton_and_the_node_runtime_dying(
        cluster, real_node, served_models, in_cluster_prometheus, shoppers):
    """The better treatment's rollout again, with three faults while the shoppers shop: at step 0 every operator
    pod is deleted (the Deployment's new pods resume the step machine from the status); at step 1 the control's
    ``tritonserver`` is SIGKILLed (the kubelet restarts the container, which loads the ensemble on disk again);
    at step 2 containerd and then the kubelet are restarted (the pods' containers run on under their shims).
    The decision is the same (Promoted), each model still has its one training Job, and every click the
    shoppers had accepted is in the routers' logs.

    The control's Triton, not the treatment's: with one replica, the treatment's answers fail while it restarts,
    and its errorRate gate rightly rolls the experiment back (a user runs two replicas to ride that out)."""
    namespace = served_models.namespace
    jobs = {model: jobs_of(cluster, namespace, model) for model in (CONTROL_MODEL, TREATMENT_MODEL)}
    survived: dict[str, object] = {}

    def at_step(step: int) -> dict:
        status = wait_until(lambda: ((s := experiment_status(cluster, namespace, FAULTS)).get("currentStep", -1) >= step
                                     or s.get("phase") in TERMINAL) and s, timeout=300, interval=1,
                            what=f"{FAULTS} to reach step {step}",
                            on_timeout=lambda: json.dumps(experiment_status(cluster, namespace, FAULTS), indent=1))
        assert status["phase"] == "Progressing", (survived, status)  # the fault lands before the decision
        return status

    def faults() -> None:
        at_step(0)
        started = time.monotonic()
        before = {pod["metadata"]["uid"] for pod in operator_pods(cluster)["items"]}
        cluster.kubectl("delete", "pods", "-n", RELEASE_NAMESPACE, "-l", "app.kubernetes.io/name=recops-operator",
                        "--wait=false")

        def replaced() -> bool:
            new = [pod for pod in operator_pods(cluster)["items"] if pod["metadata"]["uid"] not in before]
            return len(new) == 2 and all(c["ready"] for pod in new for c in pod["status"].get("containerStatuses",
                                                                                               [{"ready": False}]))

        wait_until(replaced, timeout=180, interval=1, what="the operator Deployment's two new pods to be ready")
        survived["operator pods back (s)"] = round(time.monotonic() - started, 1)

        at_step(1)
        started = time.monotonic()
        triton = container_status(serving_pod(cluster, namespace, CONTROL_MODEL), "triton")
        real_node.ctr("tasks", "kill", "--signal", "SIGKILL", triton["containerID"].removeprefix("containerd://"))
        wait_until(lambda: (c := container_status(serving_pod(cluster, namespace, CONTROL_MODEL), "triton"))
                   ["restartCount"] == triton["restartCount"] + 1 and c["ready"], timeout=240, interval=1,
                   what="the control's Triton container to be restarted and ready")
        survived["control's Triton ready again (s)"] = round(time.monotonic() - started, 1)

        at_step(2)
        survived["restarted (s)"] = real_node.restart("containerd", "kubelet")

    status, result = run_experiment(cluster, served_models, in_cluster_prometheus, shoppers, FAULTS,
                                    control=CONTROL_MODEL, treatment=TREATMENT_MODEL, steps=FAULT_STEPS,
                                    during=faults)
    print(f"{FAULTS}: {survived}; shoppers' errors {dict(result.errors)}")
    assert status["phase"] == "Promoted", status.get("message")
    assert status["winner"] == TREATMENT_MODEL and decided_steps(status) == [0, 1, 2]
    assert {model: jobs_of(cluster, namespace, model) for model in jobs} == jobs  # no Job made twice
    # Nothing that ran on the node was restarted by the runtime's restarts: only the killed Triton container.
    for model in jobs:
        pod = serving_pod(cluster, namespace, model)
        assert container_status(pod, "reloader")["restartCount"] == 0
        assert container_status(pod, "triton")["restartCount"] == (1 if model == CONTROL_MODEL else 0)
    cluster.kubectl("delete", "rexp", FAULTS, "-n", namespace, "--wait=true", timeout=120)


# --- Training on two nodes: torchrun's c10d rendezvous over cluster DNS ----------------------------------

TWO_NODE_MODEL = "real-two-node"


def test_a_two_node_recmodel_trains_in_two_pods_that_meet_through_cluster_dns(cluster, served_models):
    """``training.nodes: 2`` → an Indexed Job of two trainer pods under a headless Service; pod 1 finds pod 0
    at ``<job>-0.<job>.<namespace>.svc`` (CoreDNS), both train their shards with gloo, rank 0 alone exports
    and reports, and the operator takes its metrics (the control's spec, its serving left to the others)."""
    from recops.demo.models import demo_models, synthetic_data_spec

    namespace = served_models.namespace
    spec = demo_models(synthetic_data_spec(quick=True, seed=0), quick=True).control
    manifest = recmodel_manifest(TWO_NODE_MODEL, spec)
    manifest["spec"]["training"].update(nodes=2, resources={"cpu": "250m", "memory": "3Gi"})
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    started = time.monotonic()
    try:
        status = wait_until(
            lambda: (s := cluster.kubectl.json("get", "recmodel", TWO_NODE_MODEL, "-n", namespace).get("status", {}))
            .get("metrics") and s, timeout=600, interval=2, what="the two-node RecModel's training metrics",
            on_timeout=lambda: describe(cluster, namespace))
        print(f"\n{TWO_NODE_MODEL}: metrics {time.monotonic() - started:.0f} s after apply, phase {status['phase']}")
        job = status["trainingJob"]
        pods = cluster.kubectl.json("get", "pods", "-n", namespace, "-l", f"job-name={job}")["items"]
        assert sorted(p["spec"]["hostname"] for p in pods) == [f"{job}-0", f"{job}-1"]
        for pod in pods:
            assert pod["spec"]["nodeName"] == NODE_NAME
            (container,) = pod["status"]["containerStatuses"]
            assert container["state"]["terminated"]["exitCode"] == 0, describe(cluster, namespace)
        # Rank 0 wrote the one export, which knows it was trained by two processes; rank 1 wrote nothing.
        exported = list((served_models.folder / namespace / TWO_NODE_MODEL).rglob("metrics.json"))
        assert len(exported) == 1, exported
        assert json.loads(exported[0].read_text())["processes"] == 2
        messages = [p["status"]["containerStatuses"][0]["state"]["terminated"].get("message") for p in pods]
        assert sum(bool(m) for m in messages) == 1
        assert status["metrics"]["recall@20"] == pytest.approx(
            json.loads(next(m for m in messages if m))["metrics"]["recall@20"])
    finally:
        cluster.kubectl("delete", "recmodel", TWO_NODE_MODEL, "-n", namespace, "--wait=false", check=False)



# --- Continuous learning: a retrain Job from the CronJob, hot-reloaded by the reloader sidecar ----------


def later_shop_events(days: int = 2) -> object:
    """The quick shop's last ``days`` of events replayed as the days after its log ends: feedback in the
    shop's own shape (its users, devices and event mix), which the retrain's feature check accepts.

    Not the routers' logs of the experiments above: their shoppers visit under ``U00042~7`` visitor ids
    (each shopper several times, for the A/B statistics) and send no device, and ``recops retrain`` rightly
    refuses a log whose identifiers changed shape and that lacks a training column."""
    import polars as pl

    from recops.data.synthetic import SyntheticConfig, generate
    from recops.demo.models import SHOP

    size = SHOP["quick"]
    events = generate(SyntheticConfig(n_users=size["users"], n_items=size["items"], days=size["days"],
                                      seed=0)).events
    end = events["timestamp"].max()
    return events.filter(pl.col("timestamp") > end - days * 86_400).with_columns(
        pl.col("timestamp") + size["days"] * 86_400)


class Requests:
    """Recommendations asked of one Triton address in a loop, in a thread, until stopped: answered or not."""

    def __init__(self, address: str) -> None:
        self.address, self.answered, self.failures = address, 0, []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from recops.serving.triton_client import TritonRecommender

        async def loop() -> None:
            client = TritonRecommender(self.address, timeout_s=30)
            while not self._stop.is_set():
                try:
                    answer = await client.recommend("U00001", [], 10, None)
                    assert len(answer.item_ids) == 10
                    self.answered += 1
                except Exception as error:  # counted and reported: a dropped request fails the test
                    self.failures.append(repr(error))
                await asyncio.sleep(0.05)

        asyncio.run(loop())

    def __enter__(self) -> Requests:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(timeout=60)


def test_a_retrain_job_from_the_cronjob_is_hot_reloaded_with_no_pod_restarted(cluster, served_models):
    """``spec.retrain`` (rollout: direct) on the serving control → its CronJob; a Job made from it, as a user
    would (``kubectl create job --from=cronjob/...``), retrains in the trainer image from the serving revision
    and the feedback on the volume → the operator points the Triton pods' revision.json at it → the reloader
    sidecar loads it into the running Triton: the same pod, no container restarted, every request meanwhile
    answered, and Triton's repository holding the new revision's steps only."""
    from recops.operator.manifests.retrain import cronjob_name
    from recops.serving.repository import revision_suffix

    namespace = served_models.namespace
    feedback = served_models.folder / namespace / "shop-feedback.jsonl"
    later_shop_events().write_ndjson(feedback)
    base = cluster.kubectl.json("get", "recmodel", CONTROL_MODEL, "-n", namespace)["status"]
    pod = serving_pod(cluster, namespace, CONTROL_MODEL)
    restarts = {c["name"]: c["restartCount"] for c in pod["status"]["containerStatuses"]}
    cluster.kubectl("patch", "recmodel", CONTROL_MODEL, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": {
        "retrain": {"schedule": "@hourly", "rollout": "direct", "minNewEvents": 100,
                    "feedback": f"pvc://recops-artifacts/{namespace}/{feedback.name}"}}}))
    cronjob = cronjob_name(CONTROL_MODEL)
    wait_until(lambda: cluster.kubectl("get", "cronjob", cronjob, "-n", namespace, check=False).returncode == 0,
               timeout=60, what="the operator to create the retrain CronJob")
    job = f"{cronjob}-now"
    service = cluster_ip(cluster, namespace, base["endpoint"].split(".")[0])
    started = time.monotonic()
    with Requests(f"{service}:8001") as requests:
        cluster.kubectl("create", "job", job, f"--from=cronjob/{cronjob}", "-n", namespace)
        status = wait_until(
            lambda: (s := cluster.kubectl.json("get", "recmodel", CONTROL_MODEL, "-n", namespace)["status"])
            .get("servingRevision") == job and s, timeout=600, interval=2,
            what="the retrained revision to be the one served", on_timeout=lambda: describe(cluster, namespace))
        reloaded = wait_until(lambda: (names := triton_models(pod)) and all(revision_suffix(job) in name
                                                                             for name in names) and names,
                              timeout=120, interval=1, what="the reloader to load the retrained revision",
                              on_timeout=lambda: f"{triton_models(pod)}\n" + cluster.kubectl(
                                  "logs", pod["metadata"]["name"], "-c", "reloader", "-n", namespace,
                                  check=False).stdout[-3000:])
        time.sleep(2)  # requests on the new revision too
    print(f"\nretrain {job}: served {time.monotonic() - started:.0f} s after the Job was made; Triton holds "
          f"{reloaded}; {requests.answered} requests answered meanwhile, {len(requests.failures)} failed")
    assert status["phase"] == "Ready" and status["retrain"]["history"][-1]["phase"] == "Promoted", status["retrain"]
    assert status["retrain"]["history"][-1]["events"]["new"] > 100
    assert requests.failures == [] and requests.answered > 0
    after = serving_pod(cluster, namespace, CONTROL_MODEL)
    assert after["metadata"]["uid"] == pod["metadata"]["uid"]
    assert {c["name"]: c["restartCount"] for c in after["status"]["containerStatuses"]} == restarts
    # The retrain pod ran on the node, in the trainer image, and wrote the new revision beside the base's.
    (retrain_pod,) = cluster.kubectl.json("get", "pods", "-n", namespace, "-l", f"job-name={job}")["items"]
    assert retrain_pod["spec"]["nodeName"] == NODE_NAME
    assert (served_models.folder / namespace / CONTROL_MODEL / job / "retrain.json").is_file()


def triton_models(pod: dict) -> list[str]:
    """The revision step models loaded (READY) in a Triton pod, by its repository index over the pod network."""
    from recops.serving.contract import ENSEMBLE

    answer = httpx.post(f"http://{pod['status']['podIP']}:8000/v2/repository/index", json={"ready": True}, timeout=5)
    answer.raise_for_status()
    return sorted(m["name"] for m in answer.json() if m["name"] != ENSEMBLE)
