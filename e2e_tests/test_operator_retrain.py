"""Continuous learning through the real operator on the local control plane: the retrain CronJob, a
retrain Job (started from it as a user would, ``kubectl create job --from=cronjob/...``; kwok runs its
pod and the test writes what ``recops retrain`` reports) and the revision it becomes — served at once by
hot reload (``rollout: direct``), or tested by a RecExperiment whose gates are read by a real
Prometheus scraping a real router in front of two real Tritons (see e2e_tests/ab.py), and rolled back
when they fail."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from e2e_tests.ab import TERMINAL, experiment_status, routed
from e2e_tests.recops_fixtures import MODEL, get, job_succeeded, model_status, train_to_ready, wait_for
from e2e_tests.recops_fixtures import write_termination_message as report

pytestmark = pytest.mark.slow
EVENTS = {"training": 900, "feedback": 700, "new": 600, "duplicates": 100, "merged": 1500}


def retraining(retrain: dict) -> dict:
    model = copy.deepcopy(MODEL)
    model["spec"]["retrain"] = retrain
    return model


def run_retrain(cluster, namespace: str, job: str, message: dict) -> None:
    """One retrain now, from the CronJob's template (what ``kubectl create job --from`` is for)."""
    cluster.kubectl("create", "job", job, "--from=cronjob/ranker-retrain", "-n", namespace)
    wait_for(lambda: job_succeeded(cluster, namespace, job), f"Job {job} to succeed (kwok completes its pod)")
    report(cluster, namespace, job, {}, message=message)


def served_revision(cluster, namespace: str) -> dict:
    return json.loads(get(cluster, "configmap", "ranker-triton", namespace)["data"]["revision.json"])


def reasons(cluster, namespace: str, name: str = "ranker") -> set[str]:
    items = cluster.kubectl.json("get", "events", "-n", namespace, "--field-selector",
                                 f"involvedObject.name={name}")["items"]
    return {e["reason"] for e in items}


def test_a_retrained_revision_is_served_directly_by_hot_reload(cluster, namespace, artifacts, operator):
    cluster.kubectl("apply", "-n", namespace, "-f", "-",
                    input=yaml.safe_dump(retraining({"schedule": "@hourly", "rollout": "direct", "minNewEvents": 100})))
    base = train_to_ready(cluster, namespace)
    cronjob = wait_for(lambda: get(cluster, "cronjob", "ranker-retrain", namespace), "the retrain CronJob")
    args = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--previous") + 1] == f"/artifacts/{namespace}/ranker/{base['revision']}"
    assert args[args.index("--min-new-events") + 1] == "100" and cronjob["spec"]["suspend"] is False
    before = get(cluster, "deployment", "ranker-triton", namespace)

    # Too few new events: the Job says so and nothing changes.
    run_retrain(cluster, namespace, "ranker-retrain-1", {"skipped": "12 new feedback events, fewer than the 100",
                                                         "events": {"new": 12}})
    status = wait_for(lambda: (s := model_status(cluster, namespace)).get("retrain", {}).get("lastRun") ==
                      "ranker-retrain-1" and s, "the skipped run in the status")
    assert "12 new feedback events" in status["retrain"]["lastRunMessage"]
    assert status["servingRevision"] == base["revision"]

    run_retrain(cluster, namespace, "ranker-retrain-2", {"metrics": {"recall@20": 0.33}, "events": EVENTS})
    status = wait_for(lambda: (s := model_status(cluster, namespace)).get("servingRevision") == "ranker-retrain-2"
                      and s, "the retrained revision to serve")
    assert status["phase"] == "Ready" and status["recall"] == 0.33
    assert status["retrain"]["history"][-1] | {"time": None} == {
        "revision": "ranker-retrain-2", "artifactUri": f"pvc://recops-artifacts/{namespace}/ranker/ranker-retrain-2",
        "phase": "Promoted", "recall": 0.33, "metrics": {"recall@20": 0.33}, "events": EVENTS,
        "message": "Recall@20 0.33; served directly (rollout: direct)", "time": None}
    assert served_revision(cluster, namespace) == {"revision": "ranker-retrain-2",
                                                   "model": f"/artifacts/{namespace}/ranker/ranker-retrain-2"}
    # Hot reload: the pods' template did not change, so Kubernetes restarted nothing.
    after = get(cluster, "deployment", "ranker-triton", namespace)
    assert after["spec"]["template"] == before["spec"]["template"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert after["metadata"]["labels"]["recops.dev/revision"] == "ranker-retrain-2"
    # The next retrain starts from the revision now serving.
    cronjob = get(cluster, "cronjob", "ranker-retrain", namespace)
    args = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--previous") + 1] == f"/artifacts/{namespace}/ranker/ranker-retrain-2"
    assert {"Retrained", "RetrainPromoted"} <= reasons(cluster, namespace)

    # A revision that lost recall is never served.
    run_retrain(cluster, namespace, "ranker-retrain-3", {"metrics": {"recall@20": 0.2}, "events": EVENTS})
    status = wait_for(lambda: (s := model_status(cluster, namespace))["retrain"]["history"][-1]["revision"] ==
                      "ranker-retrain-3" and s, "the third run's outcome")
    assert status["retrain"]["history"][-1]["phase"] == "RolledBack"
    assert status["servingRevision"] == "ranker-retrain-2"
    assert "RetrainRolledBack" in reasons(cluster, namespace)
    operator.check_alive()


def test_a_retrained_revision_that_fails_its_gates_is_rolled_back(cluster, namespace, artifacts, operator, stack):
    """The experiment path with real gates: the candidate (a RecModel serving the retrained artifact) is
    answered by the weaker model, so the CTR-lift gate fails and the operator rolls it back on its own."""
    from recops.demo.run import DEFAULT_EXPERIMENT, load_experiment
    from recops.experiments.prometheus_server import PrometheusProcess, prometheus_binary
    from recops.serving.processes import free_port

    binary = prometheus_binary()
    assert binary, "this test needs a real Prometheus (apt-get install prometheus)"
    work = stack.work / f"retrain-{namespace}"
    work.mkdir()
    port = free_port()
    prometheus = PrometheusProcess(binary, work / "prometheus", [f"127.0.0.1:{port}"]).start()
    try:
        plan = load_experiment(DEFAULT_EXPERIMENT, quick=True).model_dump(by_alias=True, mode="json",
                                                                           exclude_none=True)
        plan = {k: v for k, v in plan.items() if k not in ("control", "treatment", "assignment")}
        plan["prometheus"] = {"url": prometheus.url, "timeoutSeconds": 2}
        cluster.kubectl("apply", "-n", namespace, "-f", "-",
                        input=yaml.safe_dump(retraining({"schedule": "@hourly", "experiment": plan})))
        base = train_to_ready(cluster, namespace)
        wait_for(lambda: get(cluster, "cronjob", "ranker-retrain", namespace), "the retrain CronJob")
        run_retrain(cluster, namespace, "ranker-retrain-1", {"metrics": {"recall@20": 0.31}, "events": EVENTS})

        candidate = wait_for(lambda: model_status(cluster, namespace, "ranker-retrain-1").get("phase") == "Ready"
                             and get(cluster, "recmodel", "ranker-retrain-1", namespace), "the candidate to be Ready")
        assert candidate["spec"]["artifact"] == f"pvc://recops-artifacts/{namespace}/ranker/ranker-retrain-1"
        assert not cluster.kubectl.json("get", "jobs", "-n", namespace, "-l",
                                        "app.kubernetes.io/instance=ranker-retrain-1")["items"]  # nothing trains
        experiment = get(cluster, "rexp", "ranker-retrain-1", namespace)
        assert experiment["spec"]["control"] == {"model": "ranker"}
        assert experiment["spec"]["treatment"] == {"model": "ranker-retrain-1"}
        assert get(cluster, "cronjob", "ranker-retrain", namespace)["spec"]["suspend"] is True
        assert model_status(cluster, namespace)["retrain"]["candidate"]["phase"] == "Testing"

        endpoints = {"treatment": stack.tritons["weaker"], "control": stack.tritons["better"]}
        def decided() -> bool:
            # The parent deletes the experiment as soon as it has decided: look at the parent first.
            if not model_status(cluster, namespace)["retrain"].get("candidate"):
                return True
            return experiment_status(cluster, namespace, "ranker-retrain-1").get("phase") in TERMINAL

        with routed(cluster, namespace, stack, "ranker-retrain-1", work, port, prometheus, endpoints):
            wait_for(decided, "the experiment to decide", timeout=240, interval=1)
    finally:
        prometheus.stop()

    status = wait_for(lambda: (s := model_status(cluster, namespace))["retrain"].get("history") and s,
                      "the outcome in the parent's status")
    outcome = status["retrain"]["history"][-1]
    assert (outcome["revision"], outcome["phase"]) == ("ranker-retrain-1", "RolledBack"), outcome
    assert "RolledBack" in outcome["message"] and "candidate" not in status["retrain"]
    assert status["servingRevision"] == base["revision"] and served_revision(cluster, namespace)["revision"] == \
        base["revision"]
    # The candidate and its experiment are gone (their record stays in the status and the events).
    wait_for(lambda: cluster.kubectl("get", "rm", "ranker-retrain-1", "-n", namespace, check=False).returncode != 0,
             "the candidate RecModel to be deleted")
    wait_for(lambda: cluster.kubectl("get", "rexp", "ranker-retrain-1", "-n", namespace, check=False).returncode
             != 0, "the experiment to be deleted")
    assert get(cluster, "cronjob", "ranker-retrain", namespace)["spec"]["suspend"] is False
    assert "RetrainRolledBack" in reasons(cluster, namespace)
    operator.check_alive()
