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

from recops.api.loading import API_VERSION
from recops.operator import recexperiment, recmodel
from recops.operator.kube import Kube
from recops.operator.manifests import recmodel as model_manifests
from recops.operator.manifests import retrain as retrain_manifests
from recops.operator.manifests.common import Owner
from recops.operator.metrics import OperatorMetrics
from recops.operator.naming import selector
from recops.operator.retrain import RetrainObservation, job_key
from recops.operator.settings import OperatorSettings
from recops.operator.termination import termination_message

GROUP, VERSION = "recops.dev", "v1alpha1"
SETTINGS = OperatorSettings.from_env()
METRICS = OperatorMetrics()
PREFIX = "recops.dev"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Progress in our own annotations; events only from the reconcilers (not from every log line)."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration",
    )
    settings.posting.level = logging.ERROR
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per gate query otherwise
    settings.execution.max_workers = 32
    settings.peering.lifetime = SETTINGS.peering_lifetime_seconds
    memo.kube = Kube()
    memo.servicemonitors = memo.kube.has_kind("monitoring.coreos.com/v1", "ServiceMonitor")


def _now() -> datetime:
    return datetime.now(UTC)


def _post(body: kopf.Body, events: Any) -> None:
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message[:1024])


def _measured(kind: str, reconcile: Any, body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo) -> None:
    with METRICS.reconcile_seconds.labels(kind).time():
        try:
            reconcile(body, patch, memo)
        except Exception:
            METRICS.reconcile_errors.labels(kind).inc()
            raise


def reconcile_model(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo) -> None:
    """Observe a RecModel's children, plan, create/apply, patch the status, post events."""
    kube: Kube = memo.kube
    owner = Owner.of(body)
    revision = recmodel.revision_of(body.get("spec") or {})
    job = pods = None
    succeeded = False
    if revision is not None:
        job_name = model_manifests.training_job_name(owner.name, revision)
        job = kube.get("batch/v1", "Job", owner.namespace, job_name)
        succeeded = bool(job is not None and (job.get("status") or {}).get("succeeded"))
        if succeeded:
            pods = kube.list("v1", "Pod", owner.namespace, f"batch.kubernetes.io/job-name={job_name}")
    status = body.get("status") or {}
    # Nothing serves before a revision's Job has succeeded: a new RecModel costs two requests, not three.
    deployment = (
        kube.get("apps/v1", "Deployment", owner.namespace, model_manifests.triton_name(owner.name))
        if succeeded or status.get("servingRevision") else None
    )
    observation = recmodel.ModelObservation(
        owner=owner, generation=body["metadata"].get("generation", 0), spec=body.get("spec") or {},
        status=status, now=_now(), job=job, job_pods=pods or (), deployment=deployment,
        servicemonitors=memo.servicemonitors,
        retrain=_observe_retrain(kube, owner, status) if (body.get("spec") or {}).get("retrain") else None,
    )
    result = recmodel.plan(observation, SETTINGS)
    for manifest in result.create:
        kube.create(manifest)
    for manifest in result.apply:
        kube.apply(manifest)
    for manifest in result.delete:
        kube.delete(manifest)
    status_patch = result.status.to_patch()
    patch.status.update(status_patch)
    _post(body, result.events)
    METRICS.model(owner.namespace, owner.name, status_patch)


def _observe_retrain(kube: Kube, owner: Owner, status: dict[str, Any]) -> RetrainObservation:
    """The retrain Jobs (with the termination messages of those that succeeded and are not yet taken) and
    the experiment testing the candidate."""
    jobs = kube.list("batch/v1", "Job", owner.namespace, retrain_manifests.retrain_selector(owner.name))
    taken = ((status.get("retrain") or {}).get("lastRunTime") or "", (status.get("retrain") or {}).get("lastRun") or "")
    messages = {}
    for job in jobs:
        name = job["metadata"]["name"]
        if (job.get("status") or {}).get("succeeded") and job_key(job) > taken:
            pods = kube.list("v1", "Pod", owner.namespace, f"batch.kubernetes.io/job-name={name}")
            messages[name] = termination_message(pods) or {}
    candidate = ((status.get("retrain") or {}).get("candidate") or {}).get("revision")
    return RetrainObservation(
        jobs=jobs, messages=messages,
        experiment=kube.get(API_VERSION, "RecExperiment", owner.namespace, candidate) if candidate else None,
    )


@kopf.on.resume(GROUP, VERSION, "recmodels")
@kopf.on.create(GROUP, VERSION, "recmodels")
@kopf.on.update(GROUP, VERSION, "recmodels", field="spec")
def recmodel_changed(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """A RecModel appeared or its spec changed: create its Job at once."""
    _measured("RecModel", reconcile_model, body, patch, memo)


@kopf.timer(GROUP, VERSION, "recmodels", interval=SETTINGS.reconcile_interval_seconds,
            initial_delay=SETTINGS.reconcile_interval_seconds)
def recmodel_tick(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Follow the Job and the Deployment."""
    _measured("RecModel", reconcile_model, body, patch, memo)


def _model(kube: Kube, namespace: str, ref: Any) -> dict[str, Any] | None:
    name = ref.get("model") if isinstance(ref, dict) else None
    return kube.get(API_VERSION, "RecModel", namespace, name) if isinstance(name, str) and name else None


def reconcile_experiment(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo) -> None:
    """Observe an experiment's models, look at the gates when due, plan, apply, patch the status, post events."""
    from recops.experiments.gates import evaluate_gates
    from recops.experiments.prometheus import PrometheusClient

    kube: Kube = memo.kube
    owner = Owner.of(body)
    spec = body.get("spec") or {}
    treatment = _model(kube, owner.namespace, spec.get("treatment"))
    deployment = pods = None
    if treatment is not None:
        name = treatment["metadata"]["name"]
        deployment = kube.get("apps/v1", "Deployment", owner.namespace, model_manifests.triton_name(name))
        pods = kube.list("v1", "Pod", owner.namespace,
                         ",".join(f"{k}={v}" for k, v in selector(name, model_manifests.SERVING).items()))
    observation = recexperiment.ExperimentObservation(
        owner=owner, generation=body["metadata"].get("generation", 0), spec=spec, status=body.get("status") or {},
        now=_now(), annotations=dict(body["metadata"].get("annotations") or {}),
        control=_model(kube, owner.namespace, spec.get("control")), treatment=treatment,
        treatment_deployment=deployment, treatment_pods=pods or (), servicemonitors=memo.servicemonitors,
    )
    prepared = recexperiment.prepare(observation)
    results = None
    if prepared.look_due and prepared.spec is not None:
        with PrometheusClient(prepared.spec.prometheus.url, timeout=prepared.spec.prometheus.timeout_seconds) as client:
            context = recexperiment.look_context(prepared, observation, SETTINGS)
            results = evaluate_gates(prepared.spec.gates, client, context)
    result = recexperiment.plan(observation, SETTINGS, results, prepared)
    for manifest in result.apply:
        kube.apply(manifest)
    status_patch = result.status.to_patch()
    patch.status.update(status_patch)
    _post(body, result.events)
    METRICS.experiment(owner.namespace, owner.name, status_patch)


@kopf.on.resume(GROUP, VERSION, "recexperiments")
@kopf.on.create(GROUP, VERSION, "recexperiments")
@kopf.on.update(GROUP, VERSION, "recexperiments", field="spec")
@kopf.on.field(GROUP, VERSION, "recexperiments", field=("metadata", "annotations", recexperiment.RESUME_ANNOTATION))
def recexperiment_changed(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """An experiment appeared, changed, or was asked to resume: reconcile at once."""
    _measured("RecExperiment", reconcile_experiment, body, patch, memo)


@kopf.timer(GROUP, VERSION, "recexperiments", interval=SETTINGS.reconcile_interval_seconds,
            initial_delay=SETTINGS.reconcile_interval_seconds)
def recexperiment_tick(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Look at the gates when a look is due; follow the models."""
    _measured("RecExperiment", reconcile_experiment, body, patch, memo)


@kopf.on.delete(GROUP, VERSION, "recmodels", optional=True)
@kopf.on.delete(GROUP, VERSION, "recexperiments", optional=True)
def deleted(body: kopf.Body, **_: Any) -> None:
    """Children go with their owner (garbage collection); only the metric series are ours to drop."""
    METRICS.forget(body["kind"], body["metadata"]["namespace"], body["metadata"]["name"])
