"""Leader election among operator replicas, through kopf's peering.

Each replica writes its identity, priority and a deadline into a peering object's status; only the
live replica with the highest priority handles resources, the others pause (kopf's own rule; equal
priorities would all pause, so each replica draws a distinct one). The peering object must exist
before kopf starts: one ClusterKopfPeering for a cluster-wide operator, one KopfPeering per watched
namespace otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

from recops.operator.kube import Kube

PEERING_API = "kopf.dev/v1"


class PeeringUnavailable(RuntimeError):
    """kopf's peering CRDs are not installed."""


def ensure_peering(kube: Kube, name: str, namespaces: Sequence[str]) -> None:
    """Create the peering object(s) the replicas share, if absent.

    Raises:
        PeeringUnavailable: when the cluster does not serve kopf's peering kinds.
    """
    kind = "KopfPeering" if namespaces else "ClusterKopfPeering"
    if not kube.has_kind(PEERING_API, kind):
        raise PeeringUnavailable(
            f"the cluster has no {kind} kind: apply crds/kopf-peering.yaml (the Helm chart does), "
            "or run a single replica with --standalone"
        )
    for namespace in namespaces or [None]:
        # Read first: where the Helm chart made the object, the operator needs no create permission.
        if kube.get(PEERING_API, kind, namespace, name) is None:
            metadata = {"name": name, **({"namespace": namespace} if namespace else {})}
            kube.create({"apiVersion": PEERING_API, "kind": kind, "metadata": metadata})
