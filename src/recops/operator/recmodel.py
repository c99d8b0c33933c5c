"""Reconciling a RecModel: from what is observed in the cluster to what to create, apply and report.

:func:`plan` is pure: it takes a :class:`ModelObservation` (the custom resource, its revision's
Job and pods, the Triton Deployment, the clock) and returns a :class:`ModelPlan`. The kopf
handler observes, plans and acts; calling it again with the same observation gives the same plan,
so a restarted operator (or a second handler racing the first) does no harm.

Lifecycle of a revision (a hash of every training setting, :func:`~recops.operator.naming.training_revision`)::

    Pending ─► Training (the revision's Job, created once) ─► Deploying (Triton Deployment) ─► Ready
                   └── Job failed ─► Failed          └── progress deadline exceeded ─► Failed

A serving-only change keeps the revision and rolls the Triton pods. A new revision trains while the
previous one keeps serving; once its Job succeeded, the serving ConfigMap names it and the reloader
beside Triton loads it in place (hot reload: no pod restarts, no request dropped).

``spec.artifact`` serves a model trained elsewhere (no Job). ``spec.retrain`` adds continuous
learning once the base revision is trained: :mod:`recops.operator.retrain`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from recops.api.loading import SpecError, parse_recmodel_spec
from recops.api.recmodel import RecModelSpec
from recops.api.status import RecModelPhase, RecModelStatus
from recops.operator.conditions import Event, set_condition
from recops.operator.manifests import recmodel as manifests
from recops.operator.manifests.common import Manifest, Owner, artifact_path, artifact_uri, mounted_path
from recops.operator.naming import serving_hash, training_revision
from recops.operator.retrain import RetrainObservation, plan_retrain
from recops.operator.settings import OperatorSettings
from recops.operator.termination import awaiting_report, numeric, termination_message

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
    retrain: RetrainObservation | None = None
    """The retrain Jobs and the candidate's objects (``spec.retrain`` only)."""


@dataclass(frozen=True)
class ModelPlan:
    """What the handler does: create objects that must exist once, apply the rest, write the status."""

    status: RecModelStatus
    create: tuple[Manifest, ...] = ()
    apply: tuple[Manifest, ...] = ()
    delete: tuple[Manifest, ...] = ()
    """Objects to delete (a retrained revision's candidate and experiment, once decided)."""
    events: tuple[Event, ...] = ()
    requeue: bool = field(default=True)


def _job_condition(job: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for condition in (job.get("status") or {}).get("conditions") or ():
        if condition.get("type") == type_ and condition.get("status") == "True":
            return condition
    return None


def trainer_metrics(pods: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """The metrics a succeeded trainer wrote into its termination message (``{"metrics": {...}}``).

    Non-numeric values are dropped (a status holds numbers only); ``None`` when no pod reported.
    """
    return numeric((termination_message(pods) or {}).get("metrics"))


def deployment_state(deployment: Mapping[str, Any] | None, spec: RecModelSpec) -> str:
    """``absent``, ``stale`` (not yet the wanted serving settings), ``progressing``, ``available`` or
    ``failed`` (progress deadline exceeded). The revision is not part of it: the pods reload each new one
    in place."""
    if deployment is None:
        return "absent"
    template = deployment["spec"]["template"]["metadata"]
    # A new revision reloads in place (the reloader follows the ConfigMap): only serving settings roll the pods.
    if template.get("annotations", {}).get("recops.dev/serving-hash") != serving_hash(spec):
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


def model_path(owner: Owner, spec: RecModelSpec, revision: str, settings: OperatorSettings) -> str:
    """Where a revision's exported model lies in the pods: ``spec.artifact`` if given, else the folder its
    Job (training or retrain) wrote on the artifact volume."""
    if spec.artifact is not None:
        return mounted_path(spec.artifact, settings.artifact_claim)
    return artifact_path(owner.namespace, owner.name, revision)


def plan(observation: ModelObservation, settings: OperatorSettings) -> ModelPlan:
    """The next step for one RecModel (pure)."""
    status = _Status(observation)
    previous_phase = observation.status.get("phase")
    owner = observation.owner
    try:
        spec = parse_recmodel_spec(dict(observation.spec), source=f"RecModel {owner.namespace}/{owner.name}")
        if spec.artifact is not None:
            mounted_path(spec.artifact, settings.artifact_claim)
    except (SpecError, ValueError) as error:
        message = str(error) if isinstance(error, SpecError) else f"spec.artifact: {error}"
        status.phase("Failed", message)
        status.condition(READY, "False", "InvalidSpec", message)
        return _finish(observation, status, previous_phase, events=[Event("Warning", "InvalidSpec", message)],
                       requeue=False)

    revision = training_revision(spec)
    status.value.revision = revision
    serving: tuple[Manifest, ...] = ()
    if status.value.serving_revision:
        # Keep the serving revision's Deployment in step with serving-only changes while a new one trains.
        serving = _serving_objects(owner, spec, status.value.serving_revision, observation, settings)
    if spec.artifact is not None:
        status.value.artifact_uri = spec.artifact
        status.condition(TRAINED, "True", "Artifact", f"serves {spec.artifact}, trained elsewhere")
        return _serve(observation, status, previous_phase, spec, revision, settings)

    job_name = manifests.training_job_name(owner.name, revision)
    status.value.training_job = job_name
    status.value.artifact_uri = artifact_uri(settings.artifact_claim, owner.namespace, owner.name, revision)
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
    if metrics is None and awaiting_report(job, observation.now, settings.metrics_grace_seconds):
        status.phase("Training", f"Job {job_name} succeeded; waiting for the trainer's metrics")
        return _finish(observation, status, previous_phase, apply=serving)
    if metrics is not None:
        status.value.metrics = metrics
        status.value.recall = metrics.get(RECALL_METRIC)
    trained_message = f"Job {job_name} succeeded" + ("" if metrics is not None else " (no metrics reported)")
    status.condition(TRAINED, "True", "JobSucceeded", trained_message)
    return _serve(observation, status, previous_phase, spec, revision, settings)


def _serve(observation: ModelObservation, status: _Status, previous_phase: str | None, spec: RecModelSpec,
           revision: str, settings: OperatorSettings) -> ModelPlan:
    """The base revision is trained: serve it, or the retrained revision that won since (``spec.retrain``)."""
    owner = observation.owner
    extra: tuple[Manifest, ...] = ()
    delete: tuple[Manifest, ...] = ()
    events: list[Event] = []
    serving_revision = revision
    if spec.retrain is not None:
        retrain = plan_retrain(owner, spec, revision, status.value.recall, observation.status.get("retrain"),
                               observation.retrain or RetrainObservation(), observation.now, settings)
        status.value.retrain = retrain.status
        extra, delete, events = retrain.apply, retrain.delete, list(retrain.events)
        if retrain.serving is not None:
            serving_revision = retrain.serving
            status.value.metrics = retrain.serving_metrics
            status.value.recall = (retrain.serving_metrics or {}).get(RECALL_METRIC)
    status.value.serving_revision = serving_revision
    status.value.endpoint = manifests.endpoint(owner)
    serving = _serving_objects(owner, spec, serving_revision, observation, settings)
    state = deployment_state(observation.deployment, spec)
    if state == "failed":
        message = f"Deployment {manifests.triton_name(owner.name)} exceeded its progress deadline"
        status.phase("Failed", message)
        status.condition(DEPLOYED, "False", "ProgressDeadlineExceeded", message)
        status.condition(READY, "False", "ProgressDeadlineExceeded", message)
        return _finish(observation, status, previous_phase, apply=serving + extra, delete=delete,
                       events=[Event("Warning", "DeploymentFailed", message), *events])
    if state != "available":
        status.phase("Deploying", f"rolling out revision {serving_revision} on Triton")
        status.condition(DEPLOYED, "False", "RollingOut", f"revision {serving_revision} is rolling out")
        return _finish(observation, status, previous_phase, apply=serving + extra, delete=delete, events=events,
                       always=tuple(events))
    message = f"revision {serving_revision} serves at {status.value.endpoint}"
    status.phase("Ready", message)
    status.condition(DEPLOYED, "True", "Available", message)
    status.condition(READY, "True", "Available", message)
    return _finish(observation, status, previous_phase, apply=serving + extra, delete=delete,
                   events=[Event("Normal", "Ready", message)], always=tuple(events))


def _serving_objects(owner: Owner, spec: RecModelSpec, revision: str, observation: ModelObservation,
                     settings: OperatorSettings) -> tuple[Manifest, ...]:
    objects = [
        manifests.serving_configmap(owner, spec, revision, model_path(owner, spec, revision, settings)),
        manifests.triton_deployment(owner, spec, revision, settings),
        manifests.triton_service(owner, revision),
    ]
    if observation.servicemonitors:
        objects.append(manifests.triton_servicemonitor(owner))
    return tuple(objects)


def _finish(observation: ModelObservation, status: _Status, previous_phase: str | None, *,
            create: tuple[Manifest, ...] = (), apply: tuple[Manifest, ...] = (), delete: tuple[Manifest, ...] = (),
            events: Sequence[Event] = (), always: tuple[Event, ...] = (), requeue: bool = True) -> ModelPlan:
    # Events mark transitions: only when the phase (or, for the first event, the job) is new. ``always``
    # are transitions of their own (a retrained revision's outcome) and are posted whatever the phase.
    changed = status.value.phase != previous_phase or bool(create)
    posted = (*(tuple(e for e in events if e not in always) if changed else ()), *always)
    return ModelPlan(status.value, create, apply, delete, posted, requeue)
