"""Typed ``status`` of the recops custom resources, written by the operator and read by users.

The CRD status schemas are generated from these models (:mod:`recops.api.crds`), and the
operator builds its status patches with them, so a field the operator writes is a field the
apiserver keeps (an unknown one would be pruned silently).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

RecModelPhase = Literal["Pending", "Training", "Deploying", "Ready", "Failed"]
RecExperimentPhase = Literal["Pending", "Progressing", "Paused", "Promoted", "RolledBack", "Failed"]


class StatusModel(BaseModel):
    """Base of status models: camelCase on the wire; unknown keys ignored (older operators wrote them)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_patch(self) -> dict[str, Any]:
        """The camelCase dict for a ``status`` merge patch (unset fields left out)."""
        return self.model_dump(by_alias=True, mode="json", exclude_none=True)


class Condition(StatusModel):
    """A Kubernetes condition (the shape of ``metav1.Condition``)."""

    type: str = Field(max_length=316)
    status: Literal["True", "False", "Unknown"]
    reason: str = Field("", max_length=1024)
    message: str = Field("", max_length=32768)
    last_transition_time: str | None = Field(None, description="RFC 3339 time the status last changed.")
    observed_generation: int | None = Field(None, ge=0)


RetrainPhase = Literal["Testing", "Promoted", "RolledBack"]


class RetrainedRevision(StatusModel):
    """One revision a retrain Job produced, and what became of it."""

    revision: str = Field(description="The retrain Job's name: the revision's id and its artifact folder.")
    artifact_uri: str | None = None
    phase: RetrainPhase
    recall: float | None = Field(None, description="Recall@20 on the test split.")
    metrics: dict[str, float] | None = None
    events: dict[str, int] | None = Field(
        None, description="Event counts: training, feedback, new, duplicates (logged twice), merged.",
    )
    experiment: str | None = Field(None, description="The RecExperiment testing it (rollout: experiment).")
    message: str | None = None
    time: str | None = Field(None, description="RFC 3339 time of the last phase change.")


class RetrainStatus(StatusModel):
    """Continuous learning: the CronJob, the revision under test and the last outcomes."""

    cron_job: str | None = None
    base_revision: str | None = Field(None, description="The spec's revision the retrained ones descend from.")
    last_run: str | None = Field(None, description="The last retrain Job that finished.")
    last_run_time: str | None = Field(None, description="Its creation time (Jobs are taken in creation order).")
    last_run_message: str | None = Field(None, description="What it did (trained, or why it skipped).")
    candidate: RetrainedRevision | None = Field(None, description="The revision being tested now.")
    promoted: str | None = Field(None, description="The retrained revision serving now (none: the spec's own).")
    history: list[RetrainedRevision] | None = Field(None, description="The last ten outcomes, newest last.")


class RecModelStatus(StatusModel):
    """``status`` of a RecModel."""

    phase: RecModelPhase | None = None
    observed_generation: int | None = Field(None, ge=0, description="metadata.generation this status describes.")
    revision: str | None = Field(None, description="Hash of the training-relevant spec: a new one trains again.")
    training_job: str | None = Field(None, description="Name of the revision's training Job.")
    serving_revision: str | None = Field(None, description="The revision the Triton Deployment serves.")
    artifact_uri: str | None = Field(None, description="Where the revision's exported model is stored.")
    endpoint: str | None = Field(None, description="gRPC address of the Triton Service (host:port).")
    recall: float | None = Field(None, description="Recall@20 on the test split of the serving revision.")
    metrics: dict[str, float] | None = Field(None, description="Offline metrics reported by the trainer.")
    message: str | None = Field(None, description="What happened last, for people.")
    conditions: list[Condition] | None = Field(None, description="Trained, Deployed, Ready.")
    retrain: RetrainStatus | None = Field(None, description="Continuous learning (spec.retrain).")

    def to_patch(self) -> dict[str, Any]:
        """As :meth:`StatusModel.to_patch`, with a retrain's finished candidate and ended promotion written as
        null: a merge patch keeps the stored value of a key it leaves out."""
        patch = super().to_patch()
        if self.retrain is not None:
            patch["retrain"].setdefault("candidate", None)
            patch["retrain"].setdefault("promoted", None)
        return patch


class GateStatus(StatusModel):
    """One gate's last verdict."""

    verdict: str
    value: float | None = None
    message: str = ""


class RecExperimentStatus(StatusModel):
    """``status`` of a RecExperiment."""

    phase: RecExperimentPhase | None = None
    observed_generation: int | None = Field(None, ge=0)
    current_step: int | None = Field(None, ge=0, description="Index of the step in spec.steps.")
    weight: float | None = Field(None, ge=0, le=100, description="Percent of users on the treatment now.")
    winner: str | None = Field(None, description="The RecModel serving everyone after the experiment.")
    router: str | None = Field(None, description="Address of the router Service (host:port).")
    router_config_hash: str | None = Field(None, description="Hash of the router config last written.")
    gates: dict[str, GateStatus] | None = Field(None, description="Each gate's last verdict, by gate name.")
    message: str | None = None
    conditions: list[Condition] | None = None
    resumed: str | None = Field(None, description="The recops.dev/resume annotation value last acted on.")
    rollout: dict[str, Any] | None = Field(
        None, description="The step machine's state (recops.experiments.rollout): the operator resumes from it."
    )
