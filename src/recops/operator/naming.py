"""Names, labels and revisions of the objects the operator owns: pure functions of the custom resource."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from recops.api.loading import API_VERSION
from recops.api.recmodel import RecModelSpec

MANAGED_BY = "recops-operator"
MAX_NAME = 63  # a DNS-1123 label: Service names and the Job's pod label must fit
REVISION_LABEL = "recops.dev/revision"
MODEL_LABEL = "recops.dev/recmodel"
RETRAIN_LABEL = "recops.dev/retrain-of"
"""On a retrain Job and on the candidate RecModel and RecExperiment of a retrained revision: the RecModel."""
EXPERIMENT_LABEL = "recops.dev/recexperiment"


def short_hash(value: Any, length: int = 10) -> str:
    """A stable hex digest of a JSON-able value (keys sorted)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def training_revision(spec: RecModelSpec) -> str:
    """The revision of a RecModel: a hash of every setting that changes the trained model.

    ``serving`` and ``retrain`` are left out on purpose: a serving-only change updates the Deployment,
    and a retrain policy change the CronJob, not the model.
    """
    manifest = spec.to_manifest_dict()
    return short_hash({key: value for key, value in manifest.items() if key not in ("serving", "retrain")})


def serving_hash(spec: RecModelSpec) -> str:
    """A hash of the serving settings; the Triton pods roll when it changes."""
    return short_hash(spec.serving.to_manifest_dict())


def child_name(owner: str, suffix: str, limit: int = MAX_NAME) -> str:
    """``<owner>-<suffix>`` within ``limit`` characters (a long owner name is cut and keeps a hash of itself)."""
    name = f"{owner}-{suffix}"
    if len(name) <= limit:
        return name
    keep = limit - len(suffix) - 1 - 7
    return f"{owner[:keep].rstrip('-')}-{short_hash(owner, 6)}-{suffix}"


def labels(instance: str, component: str, **extra: str) -> dict[str, str]:
    """The recommended ``app.kubernetes.io/*`` labels (plus ``extra``) of a child object."""
    return {
        "app.kubernetes.io/name": f"recops-{component}",
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "recops",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        **extra,
    }


def selector(instance: str, component: str) -> dict[str, str]:
    """The immutable subset of :func:`labels` that Deployments and Services select on."""
    return {"app.kubernetes.io/instance": instance, "app.kubernetes.io/component": component}


def owner_reference(kind: str, name: str, uid: str) -> dict[str, Any]:
    """The controller owner reference to a recops custom resource (garbage collection deletes children)."""
    return {
        "apiVersion": API_VERSION, "kind": kind, "name": name, "uid": uid,
        "controller": True, "blockOwnerDeletion": True,
    }
