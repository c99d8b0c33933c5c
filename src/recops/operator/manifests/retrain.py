"""Continuous learning's children of a RecModel: the retrain CronJob (and its spec ConfigMap), and for
``rollout: experiment`` the candidate RecModel serving a retrained revision and the RecExperiment
testing it against the serving one. Pure functions of the spec, the revisions and the settings."""

from __future__ import annotations

from recops.api.loading import API_VERSION
from recops.api.recmodel import RecModelSpec, RetrainSpec
from recops.operator.manifests.common import (
    ARTIFACTS_MOUNT,
    Manifest,
    Owner,
    artifacts_volume,
    container_security,
    feedback_path,
    metadata,
    pod_security,
    resources,
)
from recops.operator.manifests.recmodel import SPEC_FILE, SPEC_MOUNT, spec_document
from recops.operator.naming import MODEL_LABEL, RETRAIN_LABEL, child_name, labels

RETRAIN = "retrain"
CRONJOB_NAME_LIMIT = 52  # the CronJob controller appends "-<minutes>" to name its Jobs within 63
JOB_NAME_ENV = "RECOPS_JOB_NAME"


def cronjob_name(model: str) -> str:
    """The retrain CronJob's name (also its spec ConfigMap's); its Jobs are ``<name>-<scheduled minute>``."""
    return child_name(model, RETRAIN, limit=CRONJOB_NAME_LIMIT)


def retrain_labels(model: str) -> dict[str, str]:
    return labels(model, RETRAIN, **{MODEL_LABEL: model, RETRAIN_LABEL: model})


def retrain_selector(model: str) -> str:
    """The label selector of a model's retrain Jobs and their pods."""
    return f"{RETRAIN_LABEL}={model},app.kubernetes.io/component={RETRAIN}"


def feedback_args(owner: Owner, retrain: RetrainSpec, claim: str) -> list[str]:
    """Where the retrain Job reads feedback: the namespace's router logs by default, the spec's folder or
    file, or a Kafka topic pulled into a store on the artifact volume first (a consumer group per model,
    unless the URI names one: the store keeps what was pulled whatever becomes of the retrain)."""
    feedback = retrain.feedback
    if feedback is None:
        return ["--feedback", feedback_path(owner.namespace)]
    if feedback.startswith("kafka://"):
        if "group=" not in feedback:
            feedback += f"{'&' if '?' in feedback else '?'}group=recops-retrain-{owner.namespace}-{owner.name}"
        return ["--feedback", feedback, "--feedback-store", f"{feedback_path(owner.namespace)}-kafka/{owner.name}"]
    prefix = f"pvc://{claim}/"
    return ["--feedback", f"{ARTIFACTS_MOUNT}/{feedback.removeprefix(prefix)}" if feedback.startswith(prefix)
            else feedback.removeprefix("file://")]


def retrain_configmap(owner: Owner, spec: RecModelSpec) -> Manifest:
    """The spec retrain Jobs read (applied on every spec change: the next run trains with it)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(owner, cronjob_name(owner.name), retrain_labels(owner.name)),
        "data": {SPEC_FILE: spec_document(owner, spec)},
    }


def retrain_cronjob(owner: Owner, spec: RecModelSpec, previous: str, suspend: bool, claim: str, image: str,
                    pull_policy: str) -> Manifest:
    """On each tick, ``recops retrain`` from the serving revision's folder (``previous``) into
    ``/artifacts/<ns>/<model>/<Job name>``: the Job's name is the new revision's id. It exits 0 having
    trained, or having found fewer than ``minNewEvents`` new events (the termination message says which).

    ``suspend`` while a retrained revision is being tested, so that the next one starts from the winner.
    """
    assert spec.retrain is not None
    retrain = spec.retrain
    name = cronjob_name(owner.name)
    out = f"{ARTIFACTS_MOUNT}/{owner.namespace}/{owner.name}/$({JOB_NAME_ENV})"
    container: Manifest = {
        "name": "trainer",
        "image": image,
        "imagePullPolicy": pull_policy,
        "args": ["retrain", "--file", f"{SPEC_MOUNT}/{SPEC_FILE}", "--previous", previous,
                 *feedback_args(owner, retrain, claim), "--out", out, "--min-new-events", str(retrain.min_new_events)],
        "env": [
            {"name": JOB_NAME_ENV,
             "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}},
            {"name": "RECOPS_TERMINATION_LOG", "value": "/dev/termination-log"},
            {"name": "HOME", "value": "/tmp"},
            {"name": "HF_HOME", "value": "/cache/huggingface"},
        ],
        "resources": resources(spec.training.resources.model_copy(update={"gpu": spec.training.gpus()})),
        "securityContext": container_security(),
        "terminationMessagePolicy": "File",
        "volumeMounts": [
            {"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True},
            {"name": "artifacts", "mountPath": ARTIFACTS_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": "/cache"},
        ],
    }
    job_labels = retrain_labels(owner.name)
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": metadata(owner, name, job_labels),
        "spec": {
            "schedule": retrain.schedule,
            "suspend": suspend,
            "concurrencyPolicy": "Forbid",  # one retrain at a time: each starts from the last one's winner
            "startingDeadlineSeconds": 600,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "metadata": {"labels": job_labels},
                "spec": {
                    "backoffLimit": 1,
                    "template": {
                        "metadata": {"labels": job_labels},
                        "spec": {
                            "restartPolicy": "Never",
                            "securityContext": pod_security(),
                            "containers": [container],
                            "volumes": [
                                {"name": "spec", "configMap": {"name": name}},
                                artifacts_volume(claim, read_only=False),
                                {"name": "tmp", "emptyDir": {}},
                                {"name": "cache", "emptyDir": {}},
                            ],
                        },
                    },
                },
            },
        },
    }


def candidate_recmodel(owner: Owner, spec: RecModelSpec, revision: str, artifact_uri: str) -> Manifest:
    """A RecModel serving a retrained revision beside the parent (``spec.artifact``: nothing trains), so
    that a RecExperiment can split users between the two. Its name is the revision's."""
    candidate = spec.model_copy(update={"retrain": None, "artifact": artifact_uri})
    return {
        "apiVersion": API_VERSION,
        "kind": "RecModel",
        "metadata": metadata(owner, revision, retrain_labels(owner.name)),
        "spec": candidate.to_manifest_dict(),
    }


def retrain_experiment(owner: Owner, retrain: RetrainSpec, revision: str) -> Manifest:
    """The RecExperiment testing the candidate (treatment) against the parent (control), with the
    spec's steps and gates and a salt of its own (a fresh split of users for every revision)."""
    assert retrain.experiment is not None
    return {
        "apiVersion": API_VERSION,
        "kind": "RecExperiment",
        "metadata": metadata(owner, revision, retrain_labels(owner.name)),
        "spec": {
            **retrain.experiment.to_manifest_dict(),
            "control": {"model": owner.name},
            "treatment": {"model": revision},
            "assignment": {"salt": revision},
        },
    }
