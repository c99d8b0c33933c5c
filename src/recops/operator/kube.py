"""The operator's API calls: get, list, create-once and server-side apply through the dynamic client.

Kept thin and separate from the reconcilers so they stay pure; every write is idempotent (create
treats "already exists" as done, apply is server-side apply with the operator as field manager).
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ConflictError, NotFoundError, ResourceNotFoundError

FIELD_MANAGER = "recops-operator"


def api_client(pool_size: int = 32) -> client.ApiClient:
    """A client for the cluster the operator runs in, else the current kubeconfig context.

    ``pool_size`` keeps one connection per handler thread (urllib3's default of 4 makes 32 threads
    queue for connections and reconnect)."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)


class Kube:
    """A small typed facade over :class:`kubernetes.dynamic.DynamicClient` (plain dicts in and out)."""

    def __init__(self, api: client.ApiClient | None = None) -> None:
        self.api = api or api_client()
        # A discovery cache file per process: replicas on one host would otherwise read each other's half-written one.
        cache = Path(tempfile.gettempdir()) / f"recops-discovery-{os.getpid()}.json"
        self.dynamic = DynamicClient(self.api, cache_file=str(cache))

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one Kube per operator process
    def _resource(self, api_version: str, kind: str) -> Any:
        return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def has_kind(self, api_version: str, kind: str) -> bool:
        """Whether the cluster serves this kind (e.g. the prometheus-operator's ServiceMonitor)."""
        try:
            self._resource(api_version, kind)
        except ResourceNotFoundError:
            return False
        return True

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or ``None`` when it does not exist."""
        try:
            return self._resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
        except NotFoundError:
            return None

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """Objects of a kind in a namespace matching a label selector."""
        found = self._resource(api_version, kind).get(namespace=namespace, label_selector=label_selector)
        return [item.to_dict() for item in found.items]

    def create(self, manifest: dict[str, Any]) -> bool:
        """Create ``manifest`` unless it exists; ``True`` when this call created it."""
        resource = self._resource(manifest["apiVersion"], manifest["kind"])
        try:
            resource.create(body=manifest, namespace=manifest["metadata"].get("namespace"))
        except ConflictError:
            return False
        return True

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply ``manifest`` (the operator owns the fields it sets; others are kept)."""
        resource = self._resource(manifest["apiVersion"], manifest["kind"])
        applied = resource.server_side_apply(
            body=manifest, namespace=manifest["metadata"].get("namespace"),
            field_manager=FIELD_MANAGER, force_conflicts=True,
        )
        return applied.to_dict()

    def delete(self, manifest: dict[str, Any]) -> bool:
        """Delete the object ``manifest`` names (its children go with it, in the background); ``True`` when
        this call deleted it, ``False`` when it was already gone."""
        resource = self._resource(manifest["apiVersion"], manifest["kind"])
        meta = manifest["metadata"]
        try:
            resource.delete(name=meta["name"], namespace=meta.get("namespace"), propagation_policy="Background")
        except NotFoundError:
            return False
        return True
