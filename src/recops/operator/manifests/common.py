"""Pieces every child object shares: the owner, metadata, container resources and security."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from recops.api.recmodel import ResourcesSpec
from recops.operator.naming import owner_reference

Manifest = dict[str, Any]

ARTIFACTS_MOUNT = "/artifacts"
RUN_AS_USER = 1000


@dataclass(frozen=True)
class Owner:
    """The custom resource a child belongs to."""

    kind: str
    name: str
    namespace: str
    uid: str

    @classmethod
    def of(cls, body: Any) -> Owner:
        """From a custom resource body (kopf's ``body`` or a dict)."""
        meta = body["metadata"]
        return cls(body["kind"], meta["name"], meta["namespace"], meta["uid"])


def metadata(owner: Owner, name: str, labels: dict[str, str], annotations: dict[str, str] | None = None) -> Manifest:
    """``metadata`` of a child: in the owner's namespace, owned by it (deleted with it)."""
    meta: Manifest = {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels,
        "ownerReferences": [owner_reference(owner.kind, owner.name, owner.uid)],
    }
    if annotations:
        meta["annotations"] = annotations
    return meta


def resources(spec: ResourcesSpec) -> Manifest:
    """Requests and limits. No CPU limit (CFS throttling hurts tail latency; the request reserves the
    CPU); memory and GPUs are limited, GPUs in whole devices."""
    requests: dict[str, Any] = {"cpu": str(spec.cpu), "memory": str(spec.memory)}
    limits: dict[str, Any] = {"memory": str(spec.memory)}
    if spec.gpu:
        requests["nvidia.com/gpu"] = str(spec.gpu)
        limits["nvidia.com/gpu"] = str(spec.gpu)
    return {"requests": requests, "limits": limits}


def pod_security() -> Manifest:
    """The pod's security context: non-root, RuntimeDefault seccomp; files on volumes writable by the group."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security() -> Manifest:
    """Each container's security context: no privilege escalation, no capabilities, read-only root."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def artifacts_volume(claim: str, read_only: bool) -> Manifest:
    """The artifact store: a PersistentVolumeClaim of the owner's namespace."""
    return {"name": "artifacts", "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}}


def artifact_path(namespace: str, model: str, revision: str) -> str:
    """Where a revision's exported model lives inside the artifact volume."""
    return f"{ARTIFACTS_MOUNT}/{namespace}/{model}/{revision}"


def artifact_uri(claim: str, namespace: str, model: str, revision: str) -> str:
    """The revision's artifact as a URI (``pvc://claim/path``), as reported in the status."""
    return f"pvc://{claim}/{namespace}/{model}/{revision}"


def mounted_path(uri: str, claim: str) -> str:
    """Where a ``pvc://<claim>/PATH`` URI on the artifact volume lies inside the pods.

    Raises:
        ValueError: naming the URI, when it is not on that claim (pods mount no other volume).
    """
    prefix = f"pvc://{claim}/"
    if not uri.startswith(prefix) or ".." in uri.split("/"):
        raise ValueError(f"{uri!r} is not on the artifact volume: expected {prefix}<path>")
    return f"{ARTIFACTS_MOUNT}/{uri.removeprefix(prefix)}"


FEEDBACK_FOLDER = "feedback"


def feedback_path(namespace: str) -> str:
    """The folder on the artifact volume where a namespace's routers write their feedback logs (one
    sub-folder per experiment, then per pod) and retrain Jobs read them."""
    return f"{ARTIFACTS_MOUNT}/{FEEDBACK_FOLDER}/{namespace}"
