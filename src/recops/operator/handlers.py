"""kopf handlers: observe, call the pure reconcilers, act. Nothing here decides anything.

Each custom resource is reconciled on create, on a spec change, when the operator (re)starts, and
every ``reconcile_interval_seconds`` by a timer that follows the children (Jobs, Deployments) and
takes the experiments' looks. All state lives in the resource's status, so a restarted operator
continues where the last one stopped; every write is idempotent.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import kopf

from recops.operator import recmodel
from recops.operator.kube import Kube
from recops.operator.manifests import recmodel as model_manifests
from recops.operator.manifests.common import Owner
from recops.operator.settings import OperatorSettings

GROUP, VERSION = "recops.dev", "v1alpha1"
SETTINGS = OperatorSettings.from_env()
PREFIX = "recops.dev"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Progress in our own annotations; events only from the reconcilers (not from every log line)."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration",
    )
    settings.posting.level = logging.ERROR
    settings.execution.max_workers = 32
    settings.peering.name = "recops"
    memo.kube = Kube()
    memo.servicemonitors = memo.kube.has_kind("monitoring.coreos.com/v1", "ServiceMonitor")


def _now() -> datetime:
    return datetime.now(UTC)


def _post(body: kopf.Body, events: Any) -> None:
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message[:1024])


def reconcile_model(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo) -> None:
    """Observe a RecModel's children, plan, create/apply, patch the status, post events."""
    kube: Kube = memo.kube
    owner = Owner.of(body)
    revision = recmodel.revision_of(body.get("spec") or {})
    job = pods = None
    if revision is not None:
        job_name = model_manifests.training_job_name(owner.name, revision)
        job = kube.get("batch/v1", "Job", owner.namespace, job_name)
        if job is not None and (job.get("status") or {}).get("succeeded"):
            pods = kube.list("v1", "Pod", owner.namespace, f"batch.kubernetes.io/job-name={job_name}")
    deployment = kube.get("apps/v1", "Deployment", owner.namespace, model_manifests.triton_name(owner.name))
    observation = recmodel.ModelObservation(
        owner=owner, generation=body["metadata"].get("generation", 0), spec=body.get("spec") or {},
        status=body.get("status") or {}, now=_now(), job=job, job_pods=pods or (), deployment=deployment,
        servicemonitors=memo.servicemonitors,
    )
    result = recmodel.plan(observation, SETTINGS)
    for manifest in result.create:
        kube.create(manifest)
    for manifest in result.apply:
        kube.apply(manifest)
    patch.status.update(result.status.to_patch())
    _post(body, result.events)


@kopf.on.resume(GROUP, VERSION, "recmodels")
@kopf.on.create(GROUP, VERSION, "recmodels")
@kopf.on.update(GROUP, VERSION, "recmodels", field="spec")
def recmodel_changed(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """A RecModel appeared or its spec changed: create its Job at once."""
    reconcile_model(body, patch, memo)


@kopf.timer(GROUP, VERSION, "recmodels", interval=SETTINGS.reconcile_interval_seconds,
            initial_delay=SETTINGS.reconcile_interval_seconds)
def recmodel_tick(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Follow the Job and the Deployment."""
    reconcile_model(body, patch, memo)
