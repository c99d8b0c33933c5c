"""RecExperiments through the real operator, judged by a real Prometheus scraping a real router
(see e2e_tests/ab.py for how the router, Tritons and Prometheus run beside kwok's fake pods).
The operator walks the steps, reads the gates and writes the weights back."""

from __future__ import annotations

import pytest
import yaml

from e2e_tests.ab import CONTROL_MODEL, TREATMENT_MODEL, ab_test, experiment_status, finish
from e2e_tests.recops_fixtures import wait_for

pytestmark = pytest.mark.slow


def test_a_better_treatment_is_promoted(cluster, namespace, artifacts, operator, stack):
    with ab_test(cluster, namespace, stack, "better-wins"):
        status = finish(cluster, namespace, "better-wins")
    assert status["phase"] == "Promoted", status.get("message")
    assert status["winner"] == TREATMENT_MODEL and status["weight"] == 100
    assert status["gates"]["ctrLift"]["verdict"] == "Successful"
    steps = [entry["step"] for entry in status["rollout"]["history"] if entry["decision"] in ("Start", "Advance")]
    assert steps == [0, 1, 2]  # every step in order, none skipped
    weights = yaml.safe_load(
        cluster.kubectl.json("get", "configmap", "better-wins-router", "-n", namespace)["data"]["router.yaml"]
    )["arms"]
    assert [(arm["name"], arm["weightBp"]) for arm in weights] == [("treatment", 10_000), ("control", 0)]
    table = cluster.kubectl("get", "rexp", "-n", namespace).stdout
    assert "Promoted" in table and TREATMENT_MODEL in table
    reasons = [
        e["reason"]
        for e in cluster.kubectl.json(
            "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=better-wins"
        )["items"]
    ]
    assert {"Started", "StepAdvanced", "Promoted"} <= set(reasons)


def test_a_worse_treatment_is_rolled_back(cluster, namespace, artifacts, operator, stack):
    with ab_test(cluster, namespace, stack, "worse-loses", treatment="weaker"):
        status = finish(cluster, namespace, "worse-loses")
    assert status["phase"] == "RolledBack", status.get("message")
    assert status["winner"] == CONTROL_MODEL and status["weight"] == 0
    assert status["gates"]["ctrLift"]["verdict"] == "Failed"


def test_prometheus_stopped_mid_step_holds_the_step_then_pauses_until_resumed(cluster, namespace, artifacts,
                                                                               operator, stack):
    name = "blind-hold"

    def status() -> dict:
        return experiment_status(cluster, namespace, name)

    with ab_test(cluster, namespace, stack, name, maxConsecutiveErrors=6) as running:
        wait_for(lambda: status().get("rollout", {}).get("looks", 0) >= 1, "a first look", timeout=60)
        running["prometheus"].stop()
        before = status()
        held = wait_for(lambda: (s := status()).get("rollout", {}).get("consecutiveErrors", 0) >= 4 and s,
                        "four looks without Prometheus", timeout=60)
        assert held["phase"] == "Progressing"
        assert (held["currentStep"], held["weight"]) == (before["currentStep"], before["weight"])
        assert {gate["verdict"] for gate in held["gates"].values()} == {"Error"}
        # Six in a row: Paused for a human, weights kept. The README's annotate command resumes it.
        paused = wait_for(lambda: (s := status()).get("phase") == "Paused" and s, "Paused", timeout=60)
        assert (paused["currentStep"], paused["weight"]) == (before["currentStep"], before["weight"])
        cluster.kubectl("annotate", "rexp", name, "-n", namespace, "recops.dev/resume=after-the-outage", "--overwrite")
        resumed = wait_for(lambda: (s := status()).get("resumed") == "after-the-outage" and s, "the resume",
                           timeout=30)
        assert resumed["phase"] in ("Progressing", "Paused")  # Prometheus is still down: it may pause again
        history = [entry["decision"] for entry in resumed["rollout"]["history"]]
        assert history[-2:] == ["Pause", "Resume"] or history[-3:-1] == ["Pause", "Resume"]


def test_a_mis_assignment_fails_the_sample_ratio_gate(cluster, namespace, artifacts, operator, stack):
    def half_and_half(config: dict) -> dict:
        # A broken rollout: the routers send 50% to the treatment whatever the operator wrote.
        for arm in config["arms"]:
            arm["weightBp"] = 5000
        return config

    with ab_test(cluster, namespace, stack, "skewed", tamper=half_and_half):
        status = finish(cluster, namespace, "skewed")
    assert status["phase"] == "RolledBack"
    assert status["gates"]["sampleRatio"]["verdict"] == "Failed", status["gates"]
