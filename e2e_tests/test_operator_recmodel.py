"""A RecModel through the real operator on a real apiserver: Job → Deployment → Ready with metrics.

kwok plays the kubelet: it runs the training pod to Succeeded and makes Triton pods Ready, but it
runs no container, so the test writes the trainer's termination message (the metrics JSON the
trainer image writes to /dev/termination-log) into the pod's status, as the kubelet would.
"""

from __future__ import annotations

import copy
import json

import yaml

from e2e_tests.recops_fixtures import MODEL, get, model_status, patch_spec, train_to_ready, wait_for


def test_a_recmodel_trains_deploys_and_becomes_ready(cluster, namespace, artifacts, operator):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(MODEL))
    revision = wait_for(lambda: model_status(cluster, namespace).get("revision"), "a revision in the status")
    job_name = f"ranker-train-{revision}"
    job = wait_for(lambda: get(cluster, "job", job_name, namespace), f"Job {job_name}")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/recops/trainer:e2e"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert job["metadata"]["ownerReferences"][0]["kind"] == "RecModel"
    spec_file = get(cluster, "configmap", job_name, namespace)["data"]["recmodel.yaml"]
    assert yaml.safe_load(spec_file)["spec"]["training"]["epochs"] == 3

    status = train_to_ready(cluster, namespace)
    assert status["metrics"]["recall@20"] == 0.31 and status["recall"] == 0.31
    assert status["endpoint"] == f"ranker-triton.{namespace}.svc:8001"
    assert status["observedGeneration"] == get(cluster, "recmodel", "ranker", namespace)["metadata"]["generation"]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Trained": "True",
        "Deployed": "True",
        "Ready": "True",
    }
    deployment = get(cluster, "deployment", "ranker-triton", namespace)
    assert deployment["status"]["availableReplicas"] == 1
    assert get(cluster, "service", "ranker-triton", namespace)["spec"]["ports"][1]["port"] == 8001

    table = cluster.kubectl("get", "rm", "-n", namespace).stdout
    assert "Ready" in table and revision in table and "0.31" in table
    reasons = {
        e["reason"]
        for e in cluster.kubectl.json(
            "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=ranker"
        )["items"]
    }
    assert {"TrainingStarted", "Ready"} <= reasons
    operator.check_alive()
    # What the dashboard reads: the phase and the trained revision's metrics, on the operator's /metrics.
    import urllib.request

    exported = urllib.request.urlopen(operator.metrics_url, timeout=5).read().decode()
    assert f'recops_recmodel_phase{{namespace="{namespace}",phase="Ready",recmodel="ranker"}} 1.0' in exported
    assert (f'recops_recmodel_metric{{metric="recall@20",namespace="{namespace}",recmodel="ranker",'
            f'revision="{revision}"}} 0.31') in exported


def test_serving_changes_roll_triton_and_training_changes_train_a_new_revision(cluster, namespace, artifacts, operator):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(MODEL))
    first = train_to_ready(cluster, namespace)

    # A serving-only change: no new Job; the Deployment gets the new replica count.
    patch_spec(cluster, namespace, "ranker", {"serving": {"replicas": 2}})
    wait_for(
        lambda: get(cluster, "deployment", "ranker-triton", namespace)["status"].get("availableReplicas") == 2,
        "two Triton replicas",
    )
    wait_for(lambda: model_status(cluster, namespace).get("phase") == "Ready", "Ready again")
    jobs = cluster.kubectl.json("get", "jobs", "-n", namespace, "-l", "app.kubernetes.io/instance=ranker")["items"]
    assert [j["metadata"]["name"] for j in jobs] == [first["trainingJob"]]

    # A training change: a second revision trains while the first keeps serving.
    patch_spec(cluster, namespace, "ranker", {"training": {"epochs": 4}})
    second = wait_for(
        lambda: (s := model_status(cluster, namespace)).get("revision") != first["revision"] and s, "a new revision"
    )
    assert second["servingRevision"] == first["revision"]
    revision_file = get(cluster, "configmap", "ranker-triton", namespace)["data"]["revision.json"]
    assert json.loads(revision_file)["revision"] == first["revision"]
    before = get(cluster, "deployment", "ranker-triton", namespace)
    third = train_to_ready(cluster, namespace)
    assert third["servingRevision"] == third["revision"] == second["revision"]
    # The new revision reaches Triton through the ConfigMap (hot reload by the sidecar): no pod restarted.
    revision_file = get(cluster, "configmap", "ranker-triton", namespace)["data"]["revision.json"]
    assert json.loads(revision_file) == {"revision": second["revision"],
                                         "model": f"/artifacts/{namespace}/ranker/{second['revision']}"}
    after = get(cluster, "deployment", "ranker-triton", namespace)
    assert after["spec"]["template"] == before["spec"]["template"]
    jobs = cluster.kubectl.json("get", "jobs", "-n", namespace, "-l", "app.kubernetes.io/instance=ranker")["items"]
    assert sorted(j["metadata"]["name"] for j in jobs) == sorted([first["trainingJob"], second["trainingJob"]])


def test_a_two_node_recmodel_gets_an_indexed_job_and_a_headless_service(cluster, namespace, artifacts, operator):
    """The scale-out path on a real apiserver: the Job the controller-manager runs as two indexed pods that
    find each other through the headless Service (kwok runs no container: the pods' DNS identity is checked)."""
    model = copy.deepcopy(MODEL)
    model["metadata"]["name"] = "wide"
    model["spec"]["training"].update(nodes=2, gpusPerNode=1)
    model["spec"]["training"].get("resources", {}).pop("gpu", None)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(model))
    revision = wait_for(lambda: model_status(cluster, namespace, "wide").get("revision"), "a revision")
    name = f"wide-train-{revision}"
    service = wait_for(lambda: get(cluster, "service", name, namespace), f"Service {name}")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {"job-name": name}
    job = get(cluster, "job", name, namespace)
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["torchrun", "--nnodes", "2"]
    assert f"{name}-0.{name}.{namespace}.svc:29500" in container["command"]

    def both_pods() -> list[dict] | None:
        items = cluster.kubectl.json("get", "pods", "-n", namespace, "-l", f"job-name={name}")["items"]
        return items if len(items) == 2 else None

    pods = wait_for(both_pods, "the Job's two pods")
    assert sorted(p["spec"]["hostname"] for p in pods) == [f"{name}-0", f"{name}-1"]
    assert {p["spec"]["subdomain"] for p in pods} == {name}
    # The controller-manager numbers the pods; torchrun's rendezvous needs nothing else from Kubernetes.
    indexes = sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods)
    assert indexes == ["0", "1"]
