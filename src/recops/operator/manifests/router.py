"""A RecExperiment's children: the router ConfigMap (weights, endpoints), Deployment, Service and
ServiceMonitor. The router reloads its mounted config when the ConfigMap changes, so a weight
change moves users without restarting a pod."""

from __future__ import annotations

from collections.abc import Mapping

import yaml

from recops.api.recexperiment import RecExperimentSpec
from recops.experiments.routing import router_config
from recops.operator.manifests.common import (
    ARTIFACTS_MOUNT,
    Manifest,
    Owner,
    artifacts_volume,
    container_security,
    feedback_path,
    metadata,
    pod_security,
)
from recops.operator.naming import EXPERIMENT_LABEL, child_name, labels, selector
from recops.operator.settings import OperatorSettings

CONFIG_FILE = "router.yaml"
CONFIG_MOUNT = "/etc/recops"
FEEDBACK_FILE = "feedback.jsonl"
ROUTER_PORT = 8080
ROUTER = "router"


def router_name(experiment: str) -> str:
    """Name of the router ConfigMap, Deployment, Service and ServiceMonitor."""
    return child_name(experiment, "router")


def router_address(owner: Owner) -> str:
    """The router Service's cluster address (``host:port``): what clients call."""
    return f"{router_name(owner.name)}.{owner.namespace}.svc:{ROUTER_PORT}"


def router_feedback_log(owner: Owner, pod: str) -> str:
    """Where a router pod writes its feedback log: ``<feedback_path(namespace)>/<experiment>/<pod>/``."""
    return f"{feedback_path(owner.namespace)}/{owner.name}/{pod}/{FEEDBACK_FILE}"


def _labels(owner: Owner) -> dict[str, str]:
    return labels(owner.name, ROUTER, **{EXPERIMENT_LABEL: owner.name})


def config_document(owner: Owner, spec: RecExperimentSpec, treatment_bp: int, endpoints: Mapping[str, str]) -> str:
    """The router's YAML config at this weight (the ConfigMap's only key)."""
    # Each pod writes its own file instead (--feedback-path, router_feedback_log); this is where a router
    # started from the document alone would write, in the same folder.
    config = router_config(owner.name, spec, treatment_bp, endpoints,
                           f"{feedback_path(owner.namespace)}/{owner.name}/{FEEDBACK_FILE}")
    return yaml.safe_dump(config, sort_keys=False)


def router_configmap(
    owner: Owner, spec: RecExperimentSpec, treatment_bp: int, endpoints: Mapping[str, str]
) -> Manifest:
    """The ConfigMap the router pods mount; rewritten at every weight change."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(owner, router_name(owner.name), _labels(owner)),
        "data": {CONFIG_FILE: config_document(owner, spec, treatment_bp, endpoints)},
    }


def router_deployment(owner: Owner, settings: OperatorSettings) -> Manifest:
    """The router pods (``recops serve router``), scraped by Prometheus on ``/metrics``."""
    name = router_name(owner.name)
    probe = {"port": "http"}
    container: Manifest = {
        "name": ROUTER,
        "image": settings.router_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["recops"],
        # A feedback log per pod (one writer per file), in the namespace's folder that retrain Jobs read;
        # the kubelet expands $(POD_NAME) in args.
        "args": ["serve", "router", "--config", f"{CONFIG_MOUNT}/{CONFIG_FILE}", "--host", "0.0.0.0",
                 "--port", str(ROUTER_PORT), "--feedback-path", router_feedback_log(owner, "$(POD_NAME)")],
        "ports": [{"name": "http", "containerPort": ROUTER_PORT}],
        "readinessProbe": {"httpGet": {"path": "/readyz", **probe}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", **probe}, "periodSeconds": 10},
        "resources": {"requests": {"cpu": settings.router_cpu, "memory": settings.router_memory},
                      "limits": {"memory": settings.router_memory}},
        "securityContext": container_security(),
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            # The whole volume, not a subPathExpr folder: the kubelet creates those root-owned, and the
            # router (uid RUN_AS_USER) could not write in it. The router creates its own folder.
            {"name": "artifacts", "mountPath": ARTIFACTS_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(owner, name, _labels(owner)),
        "spec": {
            "replicas": settings.router_replicas,
            "selector": {"matchLabels": selector(owner.name, ROUTER)},
            "template": {
                "metadata": {
                    "labels": _labels(owner),
                    # For Prometheus set-ups without the prometheus-operator (kubernetes_sd + relabelling).
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(ROUTER_PORT),
                                    "prometheus.io/path": "/metrics"},
                },
                "spec": {
                    "securityContext": pod_security(),
                    "containers": [container],
                    "volumes": [
                        {"name": "config", "configMap": {"name": name}},
                        artifacts_volume(settings.artifact_claim, read_only=False),
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def router_service(owner: Owner) -> Manifest:
    """The Service clients call for recommendations and feedback."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, router_name(owner.name), _labels(owner)),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(owner.name, ROUTER),
            "ports": [{"name": "http", "port": ROUTER_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def router_servicemonitor(owner: Owner) -> Manifest:
    """A prometheus-operator ServiceMonitor for the router's metrics (the gates read them)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": metadata(owner, router_name(owner.name), _labels(owner)),
        "spec": {
            "selector": {"matchLabels": selector(owner.name, ROUTER)},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}],
        },
    }
