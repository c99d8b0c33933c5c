"""Continuous learning for one RecModel (pure, like :mod:`recops.operator.recmodel`): what the retrain
CronJob's finished Jobs become, and where each retrained revision goes.

Once the spec's own revision (the *base*) is trained and served, the CronJob retrains on a schedule
from the serving revision and the router's feedback. Each Job that trained is a new revision, named
after the Job. Per finished Job, in creation order::

    skipped (too few new events) ─► nothing, the status says why
    failed ─► a Warning event; the serving revision stays
    trained ─► Recall@20 below (1 - maxRecallDrop) x the serving one's ─► RolledBack (never served)
            ├─ rollout: direct ─► Promoted: the Triton pods hot-reload it
            └─ rollout: experiment ─► Testing: a candidate RecModel serves it, a RecExperiment tests it
                   against the serving one (the CronJob is suspended meanwhile)
                   ├─ experiment Promoted ─► Promoted: the parent hot-reloads it
                   └─ experiment RolledBack/Failed ─► RolledBack: the parent keeps serving
               Either way the candidate and its experiment are deleted; the status keeps the record.

A change of the spec's own revision starts a new lineage: the new base trains, serves, and retrains
start from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from recops.api.recmodel import RecModelSpec
from recops.api.status import RetrainedRevision, RetrainStatus
from recops.operator.conditions import Event
from recops.operator.manifests import retrain as manifests
from recops.operator.manifests.common import Manifest, Owner, artifact_path, artifact_uri
from recops.operator.settings import OperatorSettings
from recops.operator.termination import awaiting_report, numeric

RECALL_METRIC = "recall@20"
HISTORY = 10
_DONE_EXPERIMENT = {"Promoted": "Promoted", "RolledBack": "RolledBack", "Failed": "RolledBack"}


@dataclass(frozen=True)
class RetrainObservation:
    """What :func:`plan_retrain` looks at, besides the parent's spec and status."""

    jobs: Sequence[Mapping[str, Any]] = ()
    """The model's retrain Jobs (any age, any state)."""
    messages: Mapping[str, Mapping[str, Any]] | None = None
    """Each succeeded Job's termination message, by Job name."""
    experiment: Mapping[str, Any] | None = None
    """The RecExperiment testing the candidate (its phase says when it has decided)."""


@dataclass(frozen=True)
class RetrainPlan:
    status: RetrainStatus
    serving: str | None
    """The retrained revision to serve (``None``: the base)."""
    serving_metrics: dict[str, float] | None
    apply: tuple[Manifest, ...] = ()
    delete: tuple[Manifest, ...] = ()
    events: tuple[Event, ...] = ()


def _job_state(job: Mapping[str, Any]) -> str | None:
    for condition in (job.get("status") or {}).get("conditions") or ():
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return str(condition["type"])
    return None


def job_key(job: Mapping[str, Any]) -> tuple[str, str]:
    """A Job's place in creation order (its creation time, then its name)."""
    meta = job.get("metadata") or {}
    return str(meta.get("creationTimestamp") or ""), str(meta.get("name") or "")


def _stamp(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def plan_retrain(owner: Owner, spec: RecModelSpec, base_revision: str, serving_recall: float | None,
                 saved: Mapping[str, Any] | None, observation: RetrainObservation, now: datetime,
                 settings: OperatorSettings) -> RetrainPlan:
    """The retrain step of a RecModel whose base revision is trained (``spec.retrain`` set).

    ``serving_recall`` is the base revision's Recall@20; once a retrained revision serves, its own counts.
    """
    assert spec.retrain is not None
    status = RetrainStatus.model_validate(dict(saved or {}))
    status.cron_job = manifests.cronjob_name(owner.name)
    delete: list[Manifest] = []
    events: list[Event] = []
    if status.base_revision != base_revision:
        if status.candidate is not None:  # tested against a base that no longer serves
            delete += _candidate_objects(owner, spec, status.candidate.revision, settings)
        status = RetrainStatus(cron_job=status.cron_job, base_revision=base_revision, last_run=status.last_run,
                               last_run_time=status.last_run_time, history=status.history)

    def record(revision: RetrainedRevision, phase: str, message: str) -> None:
        revision.phase, revision.message, revision.time = phase, message, _stamp(now)  # type: ignore[assignment]
        status.history = [*(status.history or []), revision][-HISTORY:]
        kind, reason = ("Normal", "RetrainPromoted") if phase == "Promoted" else ("Warning", "RetrainRolledBack")
        events.append(Event(kind, reason, f"{revision.revision}: {message}"))  # type: ignore[arg-type]
        if phase == "Promoted":
            status.promoted = revision.revision

    candidate = status.candidate
    if candidate is not None:
        phase = ((observation.experiment or {}).get("status") or {}).get("phase")
        if phase in _DONE_EXPERIMENT:
            message = ((observation.experiment or {}).get("status") or {}).get("message") or f"experiment {phase}"
            record(candidate, _DONE_EXPERIMENT[phase], f"experiment {candidate.experiment} {phase}: {message}")
            delete += _candidate_objects(owner, spec, candidate.revision, settings)
            status.candidate = candidate = None
    else:
        if status.promoted is not None:  # a retrained revision serves: the next one must keep *its* recall
            serving_recall = next((h.recall for h in reversed(status.history or []) if h.revision == status.promoted),
                                  serving_recall)
        candidate = _take_finished_job(owner, spec, status, observation, serving_recall, now, settings, record,
                                       events)

    serving = status.promoted
    serving_metrics = next((h.metrics for h in reversed(status.history or []) if h.revision == serving), None)
    previous = artifact_path(owner.namespace, owner.name, serving or base_revision)
    apply: list[Manifest] = [
        manifests.retrain_configmap(owner, spec),
        manifests.retrain_cronjob(owner, spec, previous, suspend=candidate is not None,
                                  claim=settings.artifact_claim, image=settings.trainer_image,
                                  pull_policy=settings.image_pull_policy),
    ]
    if candidate is not None:
        apply += _candidate_objects(owner, spec, candidate.revision, settings)
    return RetrainPlan(status, serving, serving_metrics, tuple(apply), tuple(delete), tuple(events))


def _candidate_objects(owner: Owner, spec: RecModelSpec, revision: str, settings: OperatorSettings) -> list[Manifest]:
    """The candidate RecModel and its RecExperiment (``rollout: experiment``)."""
    assert spec.retrain is not None
    uri = artifact_uri(settings.artifact_claim, owner.namespace, owner.name, revision)
    return [manifests.candidate_recmodel(owner, spec, revision, uri),
            manifests.retrain_experiment(owner, spec.retrain, revision)]


def _take_finished_job(owner: Owner, spec: RecModelSpec, status: RetrainStatus, observation: RetrainObservation,
                       serving_recall: float | None, now: datetime, settings: OperatorSettings, record: Any,
                       events: list[Event]) -> RetrainedRevision | None:
    """Act on the oldest retrain Job that finished since the last one taken; returns the new candidate."""
    assert spec.retrain is not None
    last = (status.last_run_time or "", status.last_run or "")
    finished = sorted((j for j in observation.jobs if _job_state(j) and job_key(j) > last), key=job_key)
    if not finished:
        return None
    job = finished[0]
    name = job["metadata"]["name"]
    message = (observation.messages or {}).get(name) or {}
    if _job_state(job) == "Complete" and not message and awaiting_report(job, now, settings.metrics_grace_seconds):
        status.last_run_message = f"Job {name} succeeded; waiting for its report"
        return None  # not taken yet: looked at again on the next reconcile
    status.last_run_time, status.last_run = job_key(job)
    if _job_state(job) == "Failed":
        status.last_run_message = f"Job {name} failed; the serving revision stays"
        events.append(Event("Warning", "RetrainFailed", status.last_run_message))
        return None
    if "skipped" in message:
        status.last_run_message = f"Job {name}: {message['skipped']}"
        return None
    metrics = numeric(message.get("metrics"))
    revision = RetrainedRevision(
        revision=name, artifact_uri=artifact_uri(settings.artifact_claim, owner.namespace, owner.name, name),
        phase="Testing", metrics=metrics, recall=(metrics or {}).get(RECALL_METRIC),
        events=numeric(message.get("events"), int),
    )
    status.last_run_message = f"Job {name} trained revision {name}"
    events.append(Event("Normal", "Retrained", f"revision {name} trained by Job {name}"))
    floor = None if serving_recall is None else (1 - spec.retrain.max_recall_drop) * serving_recall
    if metrics is None:
        record(revision, "RolledBack", "the Job reported no metrics: a revision is never served unmeasured")
    elif floor is not None and (revision.recall is None or revision.recall < floor):
        record(revision, "RolledBack", f"Recall@20 {revision.recall} is below {floor:.4g} (the serving "
                                       f"{serving_recall:.4g} less maxRecallDrop {spec.retrain.max_recall_drop:g})")
    elif spec.retrain.rollout == "direct":
        record(revision, "Promoted", f"Recall@20 {revision.recall}; served directly (rollout: direct)")
    else:
        revision.experiment = name
        revision.message = f"tested by RecExperiment {name}"
        status.candidate = revision
        return revision
    return None
