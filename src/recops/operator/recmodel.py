"""Reconciling a RecModel: from what is observed in the cluster to what to create, apply and report.

:func:`plan` is pure: it takes a :class:`ModelObservation` (the custom resource, its revision's
Job and pods, the Triton Deployment, the clock) and returns a :class:`ModelPlan`. The kopf
handler observes, plans and acts; calling it again with the same observation gives the same plan,
so a restarted operator (or a second handler racing the first) does no harm.

Lifecycle of a revision (a hash of every training setting, :func:`~recops.operator.naming.training_revision`)::

    Pending ─► Training (the revision's Job, created once) ─► Deploying (Triton Deployment) ─► Ready
                   └── Job failed ─► Failed          └── progress deadline exceeded ─► Failed

A serving-only change keeps the revision and re-applies the Deployment. A new revision trains while
the previous one keeps serving; the Deployment moves to it only once its Job succeeded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from recops.api.loading import SpecError, parse_recmodel_spec
from recops.api.recmodel import RecModelSpec
from recops.api.status import RecModelPhase, RecModelStatus
from recops.operator.conditions import Event, set_condition
from recops.operator.manifests import recmodel as manifests
from recops.operator.manifests.common import Manifest, Owner, artifact_uri
from recops.operator.naming import REVISION_LABEL, serving_hash, training_revision
from recops.operator.settings import OperatorSettings

TRAINED, DEPLOYED, READY = "Trained", "Deployed", "Ready"
RECALL_METRIC = "recall@20"


@dataclass(frozen=True)
class ModelObservation:
    """Everything :func:`plan` looks at."""

    owner: Owner
    generation: int
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    now: datetime
    job: Mapping[str, Any] | None = None
    """The Job of the spec's revision, if it exists."""
    job_pods: Sequence[Mapping[str, Any]] = ()
    deployment: Mapping[str, Any] | None = None
    servicemonitors: bool = False
    """Whether the prometheus-operator's ServiceMonitor CRD is installed."""


@dataclass(frozen=True)
class ModelPlan:
    """What the handler does: create objects that must exist once, apply the rest, write the status."""

    status: RecModelStatus
    create: tuple[Manifest, ...] = ()
    apply: tuple[Manifest, ...] = ()
    events: tuple[Event, ...] = ()
    requeue: bool = field(default=True)


def _job_condition(job: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for condition in (job.get("status") or {}).get("conditions") or ():
        if condition.get("type") == type_ and condition.get("status") == "True":
            return condition
    return None


def _parse_time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def trainer_metrics(pods: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """The metrics a succeeded trainer wrote into its termination message (``{"metrics": {...}}``).

    Non-numeric values are dropped (a status holds numbers only); ``None`` when no pod reported.
    """
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or ():
            terminated = (container.get("state") or {}).get("terminated") or {}
            message = terminated.get("message")
            if terminated.get("exitCode") != 0 or not message:
                continue
            try:
                metrics = json.loads(message).get("metrics")
            except (ValueError, AttributeError):
                continue
            if isinstance(metrics, dict):
                return {str(k): float(v) for k, v in metrics.items()
                        if isinstance(v, int | float) and not isinstance(v, bool) and v == v}
    return None


def deployment_state(deployment: Mapping[str, Any] | None, revision: str, spec: RecModelSpec) -> str:
    """``absent``, ``stale`` (not yet the wanted revision or settings), ``progressing``, ``available``
    or ``failed`` (progress deadline exceeded)."""
    if deployment is None:
        return "absent"
    template = deployment["spec"]["template"]["metadata"]
    if (template.get("labels", {}).get(REVISION_LABEL) != revision
            or template.get("annotations", {}).get("recops.dev/serving-hash") != serving_hash(spec)):
        return "stale"
    status = deployment.get("status") or {}
    if status.get("observedGeneration", 0) < deployment["metadata"].get("generation", 0):
        return "progressing"
    for condition in status.get("conditions") or ():
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return "failed"
    wanted = deployment["spec"].get("replicas", 1)
    if status.get("updatedReplicas", 0) >= wanted and status.get("availableReplicas", 0) >= wanted:
        return "available"
    return "progressing"


class _Status:
    """The status being built, with conditions that keep their transition times."""

    def __init__(self, observation: ModelObservation) -> None:
        self.observation = observation
        self.value = RecModelStatus.model_validate(dict(observation.status))
        self.value.observed_generation = observation.generation

    def condition(self, type_: str, status: str, reason: str, message: str) -> None:
        self.value.conditions = set_condition(self.value.conditions or [], type_, status, reason, message,  # type: ignore[arg-type]
                                              self.observation.now, self.observation.generation)

    def phase(self, phase: RecModelPhase, message: str) -> None:
        self.value.phase = phase
        self.value.message = message


def revision_of(spec: Mapping[str, Any]) -> str | None:
    """The revision of a RecModel's raw spec; ``None`` when the spec does not validate."""
    try:
        return training_revision(parse_recmodel_spec(dict(spec)))
    except SpecError:
        return None


def plan(observation: ModelObservation, settings: OperatorSettings) -> ModelPlan:
    """The next step for one RecModel (pure)."""
    status = _Status(observation)
    previous_phase = observation.status.get("phase")
    owner = observation.owner
    try:
        spec = parse_recmodel_spec(dict(observation.spec), source=f"RecModel {owner.namespace}/{owner.name}")
    except SpecError as error:
        status.phase("Failed", str(error))
        status.condition(READY, "False", "InvalidSpec", str(error))
        return _finish(observation, status, previous_phase, events=[Event("Warning", "InvalidSpec", str(error))],
                       requeue=False)

    revision = training_revision(spec)
    job_name = manifests.training_job_name(owner.name, revision)
    status.value.revision = revision
    status.value.training_job = job_name
    status.value.artifact_uri = artifact_uri(settings.artifact_claim, owner.namespace, owner.name, revision)
    serving: tuple[Manifest, ...] = ()
    if status.value.serving_revision:
        # Keep the serving revision's Deployment in step with serving-only changes while a new one trains.
        serving = _serving_objects(owner, spec, status.value.serving_revision, observation, settings)

    job = observation.job
    if job is None:
        status.phase("Training", f"training revision {revision} in Job {job_name}")
        status.condition(TRAINED, "Unknown", "JobCreated", f"Job {job_name} created")
        return _finish(observation, status, previous_phase,
                       create=(manifests.training_configmap(owner, spec, revision),
                               *([manifests.training_service(owner, revision)] if (spec.training.nodes or 1) > 1
                                 else []),
                               manifests.training_job(owner, spec, revision, settings)),
                       apply=serving,
                       events=[Event("Normal", "TrainingStarted", f"created Job {job_name} for revision {revision}")])
    failed = _job_condition(job, "Failed")
    if failed is not None:
        message = f"Job {job_name} failed: {failed.get('reason', '')} {failed.get('message', '')}".strip()
        status.phase("Failed", message)
        status.condition(TRAINED, "False", "JobFailed", message)
        return _finish(observation, status, previous_phase, apply=serving,
                       events=[Event("Warning", "TrainingFailed", message)])
    complete = _job_condition(job, "Complete")
    if complete is None:
        status.phase("Training", f"training revision {revision} in Job {job_name}")
        status.condition(TRAINED, "Unknown", "JobRunning", f"Job {job_name} is running")
        return _finish(observation, status, previous_phase, apply=serving)

    metrics = trainer_metrics(observation.job_pods)
    if metrics is None:
        finished = _parse_time((job.get("status") or {}).get("completionTime")) or observation.now
        if (observation.now - finished).total_seconds() < settings.metrics_grace_seconds:
            status.phase("Training", f"Job {job_name} succeeded; waiting for the trainer's metrics")
            return _finish(observation, status, previous_phase, apply=serving)
    if metrics is not None:
        status.value.metrics = metrics
        status.value.recall = metrics.get(RECALL_METRIC)
    trained_message = f"Job {job_name} succeeded" + ("" if metrics is not None else " (no metrics reported)")
    status.condition(TRAINED, "True", "JobSucceeded", trained_message)

    status.value.serving_revision = revision
    status.value.endpoint = manifests.endpoint(owner)
    serving = _serving_objects(owner, spec, revision, observation, settings)
    state = deployment_state(observation.deployment, revision, spec)
    if state == "failed":
        message = f"Deployment {manifests.triton_name(owner.name)} exceeded its progress deadline"
        status.phase("Failed", message)
        status.condition(DEPLOYED, "False", "ProgressDeadlineExceeded", message)
        status.condition(READY, "False", "ProgressDeadlineExceeded", message)
        return _finish(observation, status, previous_phase, apply=serving,
                       events=[Event("Warning", "DeploymentFailed", message)])
    if state != "available":
        status.phase("Deploying", f"rolling out revision {revision} on Triton")
        status.condition(DEPLOYED, "False", "RollingOut", f"revision {revision} is rolling out")
        return _finish(observation, status, previous_phase, apply=serving)
    message = f"revision {revision} serves at {status.value.endpoint}"
    status.phase("Ready", message)
    status.condition(DEPLOYED, "True", "Available", message)
    status.condition(READY, "True", "Available", message)
    return _finish(observation, status, previous_phase, apply=serving,
                   events=[Event("Normal", "Ready", message)])


def _serving_objects(owner: Owner, spec: RecModelSpec, revision: str, observation: ModelObservation,
                     settings: OperatorSettings) -> tuple[Manifest, ...]:
    objects = [
        manifests.serving_configmap(owner, spec, revision),
        manifests.triton_deployment(owner, spec, revision, settings),
        manifests.triton_service(owner, revision),
    ]
    if observation.servicemonitors:
        objects.append(manifests.triton_servicemonitor(owner))
    return tuple(objects)


def _finish(observation: ModelObservation, status: _Status, previous_phase: str | None, *,
            create: tuple[Manifest, ...] = (), apply: tuple[Manifest, ...] = (),
            events: Sequence[Event] = (), requeue: bool = True) -> ModelPlan:
    # Events mark transitions: only when the phase (or, for the first event, the job) is new.
    changed = status.value.phase != previous_phase or bool(create)
    return ModelPlan(status.value, create, apply, tuple(events) if changed else (), requeue)
