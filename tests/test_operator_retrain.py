"""Continuous learning in the RecModel reconciler (pure): the retrain CronJob, what each finished retrain
Job becomes (skipped, failed, promoted directly, tested by an experiment, rolled back) and the serving
revision that follows. The same objects are applied to a real apiserver in e2e_tests/."""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime, timedelta

import pytest

from recops.api import parse_recmodel_spec
from recops.api.loading import SpecError
from recops.operator import recmodel
from recops.operator.manifests import recmodel as manifests
from recops.operator.manifests.common import Owner
from recops.operator.retrain import RetrainObservation
from recops.operator.settings import OperatorSettings

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
OWNER = Owner("RecModel", "ranker", "shop", "uid-1")
SETTINGS = OperatorSettings(trainer_image="registry.example/trainer:1", triton_image="registry.example/triton:1")
EXPERIMENT = {
    "steps": [{"weight": 10, "pause": "10m"}, {"weight": 100, "pause": "10m"}],
    "gates": [{"type": "ctrLift", "minLift": 0.0}],
    "prometheus": {"url": "http://prometheus:9090"},
}
SPEC = {
    "data": {"source": "synthetic"},
    "backbone": {"name": "builtin:tiny-qwen2"},
    "training": {"epochs": 2},
    "serving": {"replicas": 1},
    "retrain": {"schedule": "*/30 * * * *", "minNewEvents": 500, "experiment": EXPERIMENT},
}
DIRECT = {**SPEC, "retrain": {"schedule": "@daily", "rollout": "direct"}}
BASE_METRICS = {"recall@20": 0.30}


def revision(spec=SPEC) -> str:
    return recmodel.revision_of(spec)


def finished(name: str, state: str = "Complete", minute: int = 0) -> dict:
    created = (NOW + timedelta(minutes=minute)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"metadata": {"name": name, "creationTimestamp": created},
            "status": {"conditions": [{"type": state, "status": "True"}], "succeeded": int(state == "Complete"),
                       "completionTime": created}}


def trained(recall: float) -> dict:
    return {"metrics": {"recall@20": recall, "ndcg@10": 0.1},
            "events": {"training": 900, "feedback": 700, "new": 600, "duplicates": 100, "merged": 1500}}


def deployment(spec=SPEC) -> dict:
    body = manifests.triton_deployment(OWNER, parse_recmodel_spec(spec), revision(spec), SETTINGS)
    body["metadata"]["generation"] = 1
    body["status"] = {"observedGeneration": 1, "updatedReplicas": 1, "availableReplicas": 1}
    return body


def plan(spec=SPEC, status=None, retrain=None, now=NOW):
    """The model's base revision trained (recall 0.30) and served; ``retrain`` what the handler observed."""
    job = {"metadata": {"name": manifests.training_job_name("ranker", revision(spec))},
           "status": {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1}}
    pod = {"status": {"containerStatuses": [{"state": {"terminated": {
        "exitCode": 0, "message": json.dumps({"metrics": BASE_METRICS})}}}]}}
    observation = recmodel.ModelObservation(
        owner=OWNER, generation=1, spec=spec, status=status or {"phase": "Ready"}, now=now, job=job, job_pods=[pod],
        deployment=deployment(spec), retrain=retrain or RetrainObservation())
    return recmodel.plan(observation, SETTINGS)


def by_kind(result, kind: str) -> list[dict]:
    return [m for m in result.apply if m["kind"] == kind]


def served(result) -> dict:
    return json.loads(by_kind(result, "ConfigMap")[0]["data"]["revision.json"])


def test_a_trained_model_gets_a_retrain_cronjob_from_its_serving_revision():
    result = plan()
    assert result.status.phase == "Ready" and result.status.serving_revision == revision()
    (cronjob,) = by_kind(result, "CronJob")
    assert cronjob["metadata"]["name"] == "ranker-retrain" and cronjob["spec"]["schedule"] == "*/30 * * * *"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid" and cronjob["spec"]["suspend"] is False
    container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[0] == "retrain"
    assert args[args.index("--previous") + 1] == f"/artifacts/shop/ranker/{revision()}"
    assert args[args.index("--feedback") + 1] == "/artifacts/feedback/shop"  # where the namespace's routers write
    assert args[args.index("--out") + 1] == "/artifacts/shop/ranker/$(RECOPS_JOB_NAME)"
    assert args[args.index("--min-new-events") + 1] == "500"
    env = {e["name"]: e for e in container["env"]}
    assert env["RECOPS_JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['batch.kubernetes.io/job-name']"
    spec_map = next(m for m in by_kind(result, "ConfigMap") if m["metadata"]["name"] == "ranker-retrain")
    assert "retrain:" in spec_map["data"]["recmodel.yaml"]
    assert result.status.retrain.base_revision == revision() and result.status.retrain.cron_job == "ranker-retrain"


def test_nothing_retrains_before_the_base_revision_is_trained():
    observation = recmodel.ModelObservation(owner=OWNER, generation=1, spec=SPEC, status={}, now=NOW,
                                            retrain=RetrainObservation())
    result = recmodel.plan(observation, SETTINGS)
    assert "CronJob" not in [m["kind"] for m in result.create + result.apply]


def test_the_retrain_policy_is_not_part_of_the_revision():
    without = {key: value for key, value in SPEC.items() if key != "retrain"}
    assert revision(without) == revision(SPEC) == revision(DIRECT)


def test_a_skipped_run_is_reported_and_changes_nothing():
    jobs = [finished("ranker-retrain-100")]
    messages = {"ranker-retrain-100": {"skipped": "12 new feedback events, fewer than the 500 a retrain needs"}}
    result = plan(retrain=RetrainObservation(jobs=jobs, messages=messages))
    assert result.status.retrain.last_run == "ranker-retrain-100"
    assert "12 new feedback events" in result.status.retrain.last_run_message
    assert result.status.retrain.candidate is None and result.status.retrain.history is None
    assert served(result)["revision"] == revision() and result.events == ()


def test_direct_rollout_serves_the_retrained_revision_by_hot_reload():
    jobs = [finished("ranker-retrain-100")]
    first = plan(DIRECT, retrain=RetrainObservation(jobs=jobs, messages={"ranker-retrain-100": trained(0.31)}))
    assert first.status.serving_revision == "ranker-retrain-100"
    assert served(first) == {"revision": "ranker-retrain-100", "model": "/artifacts/shop/ranker/ranker-retrain-100"}
    assert first.status.recall == 0.31 and first.status.metrics["recall@20"] == 0.31
    assert first.status.phase == "Ready"  # the pod template did not change: nothing rolls
    (entry,) = first.status.retrain.history
    assert (entry.phase, entry.events["new"]) == ("Promoted", 600)
    assert [e.reason for e in first.events] == ["Retrained", "RetrainPromoted"]
    cronjob = by_kind(first, "CronJob")[0]
    args = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--previous") + 1] == "/artifacts/shop/ranker/ranker-retrain-100"  # the next starts here

    # The same observation again (the next reconcile): the Job is not taken twice.
    again = plan(DIRECT, status=first.status.to_patch(),
                 retrain=RetrainObservation(jobs=jobs, messages={"ranker-retrain-100": trained(0.31)}))
    assert len(again.status.retrain.history) == 1 and again.events == ()
    assert again.status.serving_revision == "ranker-retrain-100"


def test_a_revision_that_lost_recall_is_rolled_back_without_being_served():
    jobs = [finished("ranker-retrain-100")]
    result = plan(DIRECT, retrain=RetrainObservation(jobs=jobs, messages={"ranker-retrain-100": trained(0.20)}))
    assert result.status.serving_revision == revision() and served(result)["revision"] == revision()
    (entry,) = result.status.retrain.history
    assert entry.phase == "RolledBack" and "Recall@20 0.2 is below 0.285" in entry.message
    assert ("Warning", "RetrainRolledBack") in [(e.type, e.reason) for e in result.events]


def test_the_recall_floor_follows_the_revision_serving_now():
    jobs = [finished("ranker-retrain-100", minute=1), finished("ranker-retrain-200", minute=2)]
    messages = {"ranker-retrain-100": trained(0.40), "ranker-retrain-200": trained(0.35)}
    first = plan(DIRECT, retrain=RetrainObservation(jobs=jobs, messages=messages))
    assert first.status.serving_revision == "ranker-retrain-100"
    # 0.35 is within 5% of the base's 0.30, but 12% below the 0.40 that serves now.
    second = plan(DIRECT, status=first.status.to_patch(), retrain=RetrainObservation(jobs=jobs, messages=messages))
    assert second.status.serving_revision == "ranker-retrain-100"
    outcome = second.status.retrain.history[-1]
    assert outcome.phase == "RolledBack" and "below 0.38 (the serving 0.4" in outcome.message


def test_a_succeeded_job_whose_report_is_not_in_its_pod_yet_is_waited_for_then_rolled_back_unmeasured():
    jobs = [finished("ranker-retrain-100")]
    early = plan(DIRECT, retrain=RetrainObservation(jobs=jobs, messages={"ranker-retrain-100": {}}),
                 now=NOW + timedelta(seconds=SETTINGS.metrics_grace_seconds / 2))
    assert early.status.retrain.last_run is None and early.status.retrain.history is None
    assert "waiting for its report" in early.status.retrain.last_run_message and early.events == ()
    # The report arrives: the Job is taken with it.
    arrived = plan(DIRECT, status=early.status.to_patch(),
                   retrain=RetrainObservation(jobs=jobs, messages={"ranker-retrain-100": trained(0.31)}))
    assert arrived.status.serving_revision == "ranker-retrain-100"
    # It never does: past the grace the revision is rolled back, never served unmeasured.
    late = plan(DIRECT, retrain=RetrainObservation(jobs=jobs, messages={"ranker-retrain-100": {}}),
                now=NOW + timedelta(seconds=SETTINGS.metrics_grace_seconds + 1))
    (entry,) = late.status.retrain.history
    assert entry.phase == "RolledBack" and "no metrics" in entry.message
    assert late.status.serving_revision == revision()


def test_a_failed_retrain_job_is_a_warning_and_the_serving_revision_stays():
    result = plan(retrain=RetrainObservation(jobs=[finished("ranker-retrain-100", "Failed")]))
    assert "failed" in result.status.retrain.last_run_message
    assert [(e.type, e.reason) for e in result.events] == [("Warning", "RetrainFailed")]
    assert result.status.serving_revision == revision()


def test_jobs_are_taken_one_at_a_time_in_creation_order():
    jobs = [finished("ranker-retrain-200", minute=2), finished("ranker-retrain-100", minute=1)]
    messages = {"ranker-retrain-100": trained(0.31), "ranker-retrain-200": trained(0.32)}
    first = plan(DIRECT, retrain=RetrainObservation(jobs=jobs, messages=messages))
    assert first.status.serving_revision == "ranker-retrain-100"
    second = plan(DIRECT, status=first.status.to_patch(), retrain=RetrainObservation(jobs=jobs, messages=messages))
    assert second.status.serving_revision == "ranker-retrain-200"
    assert [h.revision for h in second.status.retrain.history] == ["ranker-retrain-100", "ranker-retrain-200"]


def experiment_with(phase: str | None, message: str = "") -> dict:
    return {"status": {"phase": phase, "message": message}} if phase else {"status": {}}


def test_an_experiment_tests_the_retrained_revision_against_the_serving_one():
    jobs = [finished("ranker-retrain-100")]
    messages = {"ranker-retrain-100": trained(0.31)}
    testing = plan(retrain=RetrainObservation(jobs=jobs, messages=messages))
    assert testing.status.serving_revision == revision()  # the parent serves the base while the test runs
    candidate = testing.status.retrain.candidate
    assert (candidate.revision, candidate.phase, candidate.experiment) == ("ranker-retrain-100", "Testing",
                                                                          "ranker-retrain-100")
    (model,) = by_kind(testing, "RecModel")
    assert model["metadata"]["name"] == "ranker-retrain-100"
    assert model["metadata"]["ownerReferences"][0]["name"] == "ranker"
    assert model["spec"]["artifact"] == "pvc://recops-artifacts/shop/ranker/ranker-retrain-100"
    assert "retrain" not in model["spec"]  # a candidate never retrains itself
    (experiment,) = by_kind(testing, "RecExperiment")
    assert experiment["spec"]["control"] == {"model": "ranker"}
    assert experiment["spec"]["treatment"] == {"model": "ranker-retrain-100"}
    assert experiment["spec"]["assignment"] == {"salt": "ranker-retrain-100"}  # a fresh split per revision
    assert experiment["spec"]["steps"][0] == {"weight": 10.0, "pause": "10m"}
    assert by_kind(testing, "CronJob")[0]["spec"]["suspend"] is True  # the next retrain starts from the winner
    # The candidate spec validates as a RecModel, and the experiment spec as a RecExperiment.
    from recops.api import parse_recexperiment_spec
    assert parse_recmodel_spec(model["spec"]).artifact.endswith("ranker-retrain-100")
    assert parse_recexperiment_spec(experiment["spec"]).treatment.model == "ranker-retrain-100"

    observe = RetrainObservation(jobs=jobs, messages=messages)
    running = plan(status=testing.status.to_patch(), retrain=observe)
    assert running.status.retrain.candidate is not None and running.delete == () and running.events == ()

    promoted = plan(status=testing.status.to_patch(), retrain=RetrainObservation(
        jobs=jobs, messages=messages,
        experiment=experiment_with("Promoted", "every gate passed at step 2")))
    assert promoted.status.serving_revision == "ranker-retrain-100" and promoted.status.recall == 0.31
    assert served(promoted)["model"] == "/artifacts/shop/ranker/ranker-retrain-100"
    assert sorted(m["kind"] for m in promoted.delete) == ["RecExperiment", "RecModel"]
    assert promoted.status.retrain.candidate is None
    assert promoted.status.retrain.history[-1].phase == "Promoted"
    assert "every gate passed" in promoted.status.retrain.history[-1].message
    assert by_kind(promoted, "CronJob")[0]["spec"]["suspend"] is False
    assert not by_kind(promoted, "RecModel")


@pytest.mark.parametrize("phase", ["RolledBack", "Failed"])
def test_a_retrained_revision_that_fails_its_gates_is_rolled_back(phase):
    jobs = [finished("ranker-retrain-100")]
    messages = {"ranker-retrain-100": trained(0.31)}
    testing = plan(retrain=RetrainObservation(jobs=jobs, messages=messages))
    result = plan(status=testing.status.to_patch(), retrain=RetrainObservation(
        jobs=jobs, messages=messages, experiment=experiment_with(phase, "ctrLift failed")))
    assert result.status.serving_revision == revision() and served(result)["revision"] == revision()
    assert result.status.retrain.history[-1].phase == "RolledBack"
    assert "ctrLift failed" in result.status.retrain.history[-1].message
    assert {m["metadata"]["name"] for m in result.delete} == {"ranker-retrain-100"}
    assert result.status.to_patch()["retrain"]["candidate"] is None  # a merge patch must clear it explicitly
    assert ("Warning", "RetrainRolledBack") in [(e.type, e.reason) for e in result.events]


def test_a_new_base_revision_starts_a_new_lineage():
    jobs = [finished("ranker-retrain-100")]
    first = plan(DIRECT, retrain=RetrainObservation(jobs=jobs, messages={"ranker-retrain-100": trained(0.31)}))
    changed = copy.deepcopy(DIRECT)
    changed["training"]["epochs"] = 3
    result = plan(changed, status=first.status.to_patch(),
                  retrain=RetrainObservation(jobs=jobs, messages={"ranker-retrain-100": trained(0.31)}))
    assert result.status.serving_revision == revision(changed)  # the newly trained base
    assert result.status.retrain.base_revision == revision(changed) and result.status.retrain.promoted is None
    assert [h.revision for h in result.status.retrain.history] == ["ranker-retrain-100"]  # the record stays


def test_a_candidate_serves_its_artifact_without_training():
    spec = {**{k: v for k, v in SPEC.items() if k != "retrain"},
            "artifact": "pvc://recops-artifacts/shop/ranker/ranker-retrain-100"}
    observation = recmodel.ModelObservation(owner=Owner("RecModel", "ranker-retrain-100", "shop", "uid-2"),
                                            generation=1, spec=spec, status={}, now=NOW)
    result = recmodel.plan(observation, SETTINGS)
    assert result.create == () and result.status.phase == "Deploying"
    assert served(result)["model"] == "/artifacts/shop/ranker/ranker-retrain-100"
    assert result.status.artifact_uri == spec["artifact"] and result.status.training_job is None


def test_an_artifact_off_the_artifact_volume_is_refused_naming_the_field():
    spec = {**{k: v for k, v in SPEC.items() if k != "retrain"}, "artifact": "pvc://other-claim/x"}
    result = recmodel.plan(recmodel.ModelObservation(owner=OWNER, generation=1, spec=spec, status={}, now=NOW),
                           SETTINGS)
    assert result.status.phase == "Failed" and "spec.artifact" in result.status.message
    assert "pvc://recops-artifacts/" in result.status.message and result.apply == () and result.create == ()


@pytest.mark.parametrize(("retrain", "message"), [
    ({"schedule": "@hourly"}, "rollout 'experiment' (the default) needs 'experiment'"),
    ({"schedule": "every hour", "rollout": "direct"}, "must be a cron schedule"),
    ({"rollout": "blind"}, "rollout"),
    ({"rollout": "direct", "minNewEvents": 0}, "minNewEvents"),
    ({"rollout": "direct", "maxRecallDrop": 2}, "maxRecallDrop"),
])
def test_a_bad_retrain_spec_is_refused_naming_the_field(retrain, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_recmodel_spec({**SPEC, "retrain": retrain})


@pytest.mark.parametrize(("feedback", "expected"), [
    (None, ["--feedback", "/artifacts/feedback/shop"]),
    ("pvc://recops-artifacts/logs/shop", ["--feedback", "/artifacts/logs/shop"]),
    ("file:///mnt/logs", ["--feedback", "/mnt/logs"]),
    # A topic is pulled into a store on the artifact volume first, under a consumer group of the model's own.
    ("kafka://kafka.infra:9092/recops-feedback", [
        "--feedback", "kafka://kafka.infra:9092/recops-feedback?group=recops-retrain-shop-ranker",
        "--feedback-store", "/artifacts/feedback/shop-kafka/ranker"]),
    ("kafka://k1:9092,k2:9092/fb?group=mine", [
        "--feedback", "kafka://k1:9092,k2:9092/fb?group=mine",
        "--feedback-store", "/artifacts/feedback/shop-kafka/ranker"]),
])
def test_the_retrain_job_reads_the_feedback_where_the_spec_says(feedback, expected):
    spec = copy.deepcopy(DIRECT)
    if feedback:
        spec["retrain"]["feedback"] = feedback
    args = by_kind(plan(spec), "CronJob")[0]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    start = args.index("--feedback")
    assert args[start:start + len(expected)] == expected


@pytest.mark.parametrize(("feedback", "message"), [
    ("kafka://broker:9092/", "the broker and one topic"),
    ("kafka://broker:9092/t?partition=1", "unknown parameter 'partition'"),
    ("s3://bucket/logs", "expected pvc://CLAIM/PATH, file:///PATH or kafka://HOST:PORT/TOPIC"),
])
def test_a_bad_feedback_uri_is_refused_naming_it(feedback, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_recmodel_spec({**DIRECT, "retrain": {"rollout": "direct", "feedback": feedback}})
