"""A RecModel's children: the training Job (and its spec ConfigMap), the Triton Deployment, Service
and ServiceMonitor. Pure functions of the validated spec, the revision and the settings."""

from __future__ import annotations

import json

import yaml

from recops.api.loading import API_VERSION
from recops.api.recmodel import RecModelSpec
from recops.operator.manifests.common import (
    Manifest,
    Owner,
    artifact_path,
    artifacts_volume,
    container_security,
    metadata,
    pod_security,
    resources,
)
from recops.operator.naming import MODEL_LABEL, REVISION_LABEL, child_name, labels, selector, serving_hash
from recops.operator.settings import OperatorSettings
from recops.serving.contract import ENSEMBLE

SPEC_FILE = "recmodel.yaml"
REVISION_FILE = "revision.json"
SPEC_MOUNT = "/etc/recops"
TRITON_HTTP, TRITON_GRPC, TRITON_METRICS = 8000, 8001, 8002
TRAINING, SERVING = "training", "serving"
ENSEMBLE_READY = f"/v2/models/{ENSEMBLE}/ready"


def training_job_name(model: str, revision: str) -> str:
    """The one Job of a revision (its name is the idempotency key: never two Jobs per revision)."""
    return child_name(model, f"train-{revision}")


def triton_name(model: str) -> str:
    """Name of the Triton Deployment, Service, ServiceMonitor and serving ConfigMap."""
    return child_name(model, "triton")


def endpoint(owner: Owner) -> str:
    """The gRPC address routers use: the Service's cluster DNS name and port."""
    return f"{triton_name(owner.name)}.{owner.namespace}.svc:{TRITON_GRPC}"


def spec_document(owner: Owner, spec: RecModelSpec) -> str:
    """The RecModel as ``recops train -f`` and ``recops export --spec`` read it (defaults filled in)."""
    manifest = {"apiVersion": API_VERSION, "kind": "RecModel", "metadata": {"name": owner.name},
                "spec": spec.to_manifest_dict()}
    return yaml.safe_dump(manifest, sort_keys=False)


def _spec_configmap(owner: Owner, name: str, component: str, spec: RecModelSpec, revision: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(owner, name, labels(owner.name, component, **{MODEL_LABEL: owner.name,
                                                                         REVISION_LABEL: revision})),
        "data": {SPEC_FILE: spec_document(owner, spec)},
    }


def _scratch_volumes() -> list[Manifest]:
    # The root filesystem is read-only: /tmp and the Hugging Face cache live on emptyDirs.
    return [{"name": "tmp", "emptyDir": {}}, {"name": "cache", "emptyDir": {}}]


def _scratch_mounts() -> list[Manifest]:
    return [{"name": "tmp", "mountPath": "/tmp"}, {"name": "cache", "mountPath": "/cache"}]


def _scratch_env() -> list[Manifest]:
    return [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HOME", "value": "/cache/huggingface"}]


def training_configmap(owner: Owner, spec: RecModelSpec, revision: str) -> Manifest:
    """The spec the revision's Job trains on (one per revision, so a retried pod reads its own spec)."""
    return _spec_configmap(owner, training_job_name(owner.name, revision), TRAINING, spec, revision)


RENDEZVOUS_PORT = 29500


def training_command(owner: Owner, spec: RecModelSpec, revision: str) -> Manifest:
    """The trainer container's command: ``recops train``, under ``torchrun`` when it trains distributed.

    Several pods meet through c10d rendezvous at the first pod's stable DNS name, which the Job's
    headless Service (:func:`training_service`) gives it; one pod with several GPUs runs standalone.
    """
    train = ["train", "--file", f"{SPEC_MOUNT}/{SPEC_FILE}",
             "--out", artifact_path(owner.namespace, owner.name, revision), "--baselines", ""]
    cfg = spec.training
    if not cfg.distributed():
        return {"args": train}
    nodes, name = cfg.nodes or 1, training_job_name(owner.name, revision)
    if nodes == 1:
        rendezvous = ["--standalone"]
    else:
        endpoint = f"{name}-0.{name}.{owner.namespace}.svc:{RENDEZVOUS_PORT}"
        rendezvous = ["--nnodes", str(nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                      "--rdzv-id", name, "--max-restarts", "3"]
    return {"command": ["torchrun", *rendezvous, "--nproc-per-node", str(cfg.processes_per_node()),
                        "-m", "recops", *train]}


def training_service(owner: Owner, revision: str) -> Manifest:
    """The headless Service of a multi-pod Job: a DNS name per pod (``<job>-<index>.<job>``) for rendezvous."""
    name = training_job_name(owner.name, revision)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, name, labels(owner.name, TRAINING, **{MODEL_LABEL: owner.name,
                                                                         REVISION_LABEL: revision})),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # rendezvous happens before any readiness
            "selector": {"job-name": name},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT}],
        },
    }


def training_job(owner: Owner, spec: RecModelSpec, revision: str, settings: OperatorSettings) -> Manifest:
    """The revision's training Job: ``recops train`` writes the model into the artifact store and its
    offline metrics into the termination message, which the operator copies into the status.

    With ``training.nodes`` > 1 it is an Indexed Job of that many pods (one per completion index) under
    the headless Service of the same name, each running ``torchrun``.
    """
    name = training_job_name(owner.name, revision)
    pod_labels = labels(owner.name, TRAINING, **{MODEL_LABEL: owner.name, REVISION_LABEL: revision})
    cfg = spec.training
    container: Manifest = {
        "name": "trainer",
        "image": settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        **training_command(owner, spec, revision),
        "env": [{"name": "RECOPS_TERMINATION_LOG", "value": "/dev/termination-log"}, *_scratch_env()],
        "resources": resources(cfg.resources.model_copy(update={"gpu": cfg.gpus()})),
        "securityContext": container_security(),
        "terminationMessagePolicy": "File",
        "volumeMounts": [
            {"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True},
            {"name": "artifacts", "mountPath": "/artifacts"},
            *_scratch_mounts(),
        ],
    }
    if cfg.distributed():
        container["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}]
    pod_spec: Manifest = {
        "restartPolicy": "Never",
        "securityContext": pod_security(),
        "containers": [container],
        "volumes": [
            {"name": "spec", "configMap": {"name": name}},
            artifacts_volume(settings.artifact_claim, read_only=False),
            *_scratch_volumes(),
        ],
    }
    nodes = cfg.nodes or 1
    job_spec: Manifest = {
        # A pod lost with its node resumes from the checkpoint in the artifact store.
        "backoffLimit": 2 * nodes,
        "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
    }
    if nodes > 1:
        pod_spec["subdomain"] = name
        job_spec.update(completionMode="Indexed", completions=nodes, parallelism=nodes)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata(owner, name, pod_labels), "spec": job_spec}


def serving_configmap(owner: Owner, spec: RecModelSpec, revision: str, model_path: str) -> Manifest:
    """What the Triton pods serve: the current spec (serving settings may change without retraining) and
    ``revision.json``, the revision and its model directory. A new revision changes only this file: the
    reloader beside Triton loads it without restarting anything (hot reload)."""
    configmap = _spec_configmap(owner, triton_name(owner.name), SERVING, spec, revision)
    configmap["data"][REVISION_FILE] = json.dumps({"revision": revision, "model": model_path}, sort_keys=True)
    return configmap


def triton_deployment(owner: Owner, spec: RecModelSpec, revision: str, settings: OperatorSettings) -> Manifest:
    """Triton serving the model in explicit model-control mode: an init container writes the model
    repository of the revision in ``revision.json`` (as KServe's storage initializer does), Triton
    serves it, and the reloader sidecar hot-reloads each new revision through Triton's repository API.

    The revision is a label of the Deployment only, never of its pods: a new revision reloads in place;
    only a serving-settings change (the serving hash) rolls the pods.
    """
    name = triton_name(owner.name)
    pod_labels = labels(owner.name, SERVING, **{MODEL_LABEL: owner.name})
    gpu_flag = "--gpu" if spec.serving.resources.gpu else "--cpu"
    spec_file, revision_file = f"{SPEC_MOUNT}/{SPEC_FILE}", f"{SPEC_MOUNT}/{REVISION_FILE}"
    reads_spec = {"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True}
    reads_artifacts = {"name": "artifacts", "mountPath": "/artifacts", "readOnly": True}
    export: Manifest = {
        "name": "model-repository",
        "image": settings.triton_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["recops"],
        "args": ["export", "--revision-file", revision_file, "--out", "/models", "--spec", spec_file, gpu_flag],
        "env": _scratch_env(),
        "securityContext": container_security(),
        "volumeMounts": [reads_spec, reads_artifacts, {"name": "models", "mountPath": "/models"}, *_scratch_mounts()],
    }
    health = {"port": "http"}
    triton: Manifest = {
        "name": "triton",
        "image": settings.triton_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["tritonserver"],
        "args": ["--model-repository=/models", "--model-control-mode=explicit", f"--load-model={ENSEMBLE}",
                 f"--http-port={TRITON_HTTP}", f"--grpc-port={TRITON_GRPC}", f"--metrics-port={TRITON_METRICS}"],
        "env": _scratch_env(),
        "ports": [
            {"name": "http", "containerPort": TRITON_HTTP},
            {"name": "grpc", "containerPort": TRITON_GRPC},
            {"name": "metrics", "containerPort": TRITON_METRICS},
        ],
        # Ready means the ensemble answers. Not /v2/health/ready: in explicit mode it is 400 while any model
        # loads (every hot reload would take the pod out of the Service) and stays 400 after a failed load.
        "readinessProbe": {"httpGet": {"path": ENSEMBLE_READY, **health}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", **health}, "periodSeconds": 10,
                          "failureThreshold": 6},
        "startupProbe": {"httpGet": {"path": ENSEMBLE_READY, **health}, "periodSeconds": 5,
                         "failureThreshold": 120},
        "resources": resources(spec.serving.resources),
        "securityContext": container_security(),
        "volumeMounts": [
            {"name": "models", "mountPath": "/models", "readOnly": True},
            {"name": "shm", "mountPath": "/dev/shm"},  # the python backend talks to its stubs over shared memory
            *_scratch_mounts(),
        ],
    }
    reloader: Manifest = {
        "name": "reloader",
        "image": settings.triton_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["recops"],
        "args": ["serve", "reloader", "--watch", revision_file, "--spec", spec_file, "--model-repository", "/models",
                 "--triton-url", f"http://127.0.0.1:{TRITON_HTTP}", gpu_flag],
        "env": _scratch_env(),
        "resources": {"requests": {"cpu": "100m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
        "securityContext": container_security(),
        "volumeMounts": [reads_spec, reads_artifacts, {"name": "models", "mountPath": "/models"}, *_scratch_mounts()],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(owner, name, {**pod_labels, REVISION_LABEL: revision}),
        "spec": {
            "replicas": spec.serving.replicas,
            "progressDeadlineSeconds": settings.triton_progress_deadline_seconds,
            "selector": {"matchLabels": selector(owner.name, SERVING)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    # A serving-only change rolls the pods, which re-export with the new settings.
                    "annotations": {"recops.dev/serving-hash": serving_hash(spec)},
                },
                "spec": {
                    "securityContext": pod_security(),
                    "initContainers": [export],
                    "containers": [triton, reloader],
                    "volumes": [
                        {"name": "spec", "configMap": {"name": name}},
                        artifacts_volume(settings.artifact_claim, read_only=True),
                        {"name": "models", "emptyDir": {}},
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
                        *_scratch_volumes(),
                    ],
                },
            },
        },
    }


def triton_service(owner: Owner, revision: str) -> Manifest:
    """The Service in front of the Triton pods (gRPC for routers, HTTP, metrics for Prometheus)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, triton_name(owner.name), labels(owner.name, SERVING, **{MODEL_LABEL: owner.name})),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(owner.name, SERVING),
            "ports": [
                {"name": name, "port": port, "targetPort": name, "protocol": "TCP"}
                for name, port in (("http", TRITON_HTTP), ("grpc", TRITON_GRPC), ("metrics", TRITON_METRICS))
            ],
        },
    }


def triton_servicemonitor(owner: Owner) -> Manifest:
    """A prometheus-operator ServiceMonitor for Triton's metrics (created only where that CRD exists)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": metadata(owner, triton_name(owner.name), labels(owner.name, SERVING, **{MODEL_LABEL: owner.name})),
        "spec": {
            "selector": {"matchLabels": selector(owner.name, SERVING)},
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
        },
    }
