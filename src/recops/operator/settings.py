"""Operator settings: what the Helm chart's values become, read from ``RECOPS_*`` environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from recops import __version__

_IMAGE_REGISTRY = "ghcr.io/recops"


@dataclass(frozen=True)
class OperatorSettings:
    """Everything the manifests need besides the custom resource itself.

    Each field is read from ``RECOPS_<FIELD_NAME_UPPER>`` (e.g. ``RECOPS_TRAINER_IMAGE``).
    """

    trainer_image: str = f"{_IMAGE_REGISTRY}/trainer:{__version__}"
    triton_image: str = f"{_IMAGE_REGISTRY}/triton:{__version__}"
    router_image: str = f"{_IMAGE_REGISTRY}/operator:{__version__}"
    image_pull_policy: str = "IfNotPresent"
    artifact_claim: str = "recops-artifacts"
    """PersistentVolumeClaim (in each namespace) that holds the trained models: mounted at /artifacts."""
    reconcile_interval_seconds: float = 5.0
    """How often each object is looked at again (children's progress, experiment looks)."""
    metrics_grace_seconds: float = 60.0
    """After a training Job succeeded, how long to wait for its pod's termination message (the metrics)."""
    router_settle_seconds: float = 90.0
    """After the router ConfigMap changed: the kubelet's sync of the mounted file (up to ~60 s), the
    router's reload (1 s) and two scrape intervals pass before the new step's window starts."""
    triton_progress_deadline_seconds: int = 600
    peering_lifetime_seconds: int = 60
    """How long a silent replica counts as alive in the peering (a standby takes over after this)."""
    router_replicas: int = 2
    router_cpu: str = "500m"
    router_memory: str = "512Mi"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        """Defaults overridden by ``RECOPS_*`` variables.

        Raises:
            ValueError: naming the variable, when a numeric one does not parse or is not positive.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in fields(cls):
            key = f"RECOPS_{field.name.upper()}"
            if key not in environ:
                continue
            raw = environ[key]
            if field.type in ("float", "int"):
                try:
                    number = float(raw) if field.type == "float" else int(raw)
                except ValueError:
                    raise ValueError(f"{key}: expected a number, got {raw!r}") from None
                if number <= 0:
                    raise ValueError(f"{key}: must be positive, got {raw!r}")
                values[field.name] = number
            elif not raw:
                raise ValueError(f"{key}: must not be empty")
            else:
                values[field.name] = raw
        return cls(**values)  # type: ignore[arg-type]
