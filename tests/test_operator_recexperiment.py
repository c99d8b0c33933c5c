"""The RecExperiment reconciler (pure): waiting for models, the router objects at each weight, looks,
promotion, rollback on gates and on an unhealthy treatment, pause and resume, restart from status.
The same lifecycle runs against a real apiserver, router and Prometheus in e2e_tests/."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import yaml

from recops.experiments.gates import GateResult, Verdict
from recops.operator import recexperiment as rx
from recops.operator.manifests.common import Owner
from recops.operator.settings import OperatorSettings

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
OWNER = Owner("RecExperiment", "v2-vs-v1", "shop", "uid-9")
SETTINGS = OperatorSettings(router_settle_seconds=10)
SPEC = {
    "control": {"model": "v1"}, "treatment": {"model": "v2"}, "assignment": {"salt": "v2-vs-v1"},
    "steps": [{"weight": 10, "pause": "1m"}, {"weight": 50, "pause": "1m"}, {"weight": 100, "pause": "1m"}],
    "gates": [{"type": "sampleRatio"}, {"type": "ctrLift", "minSamples": 10}],
    "prometheus": {"url": "http://prometheus:9090"},
    "analysis": {"interval": "30s", "maxConsecutiveErrors": 2},
}


def model(name: str, phase: str = "Ready") -> dict:
    return {"metadata": {"name": name}, "status": {"phase": phase, "endpoint": f"{name}-triton.shop.svc:8001"}}


def observe(status=None, now=T0, spec=SPEC, annotations=None, **kw) -> rx.ExperimentObservation:
    kw.setdefault("control", model("v1"))
    kw.setdefault("treatment", model("v2"))
    return rx.ExperimentObservation(owner=OWNER, generation=1, spec=spec, status=status or {}, now=now,
                                    annotations=annotations or {}, **kw)


def results(ratio: Verdict, lift: Verdict) -> list[GateResult]:
    return [GateResult("sampleRatio", ratio, 0.5), GateResult("ctrLift", lift, 0.04)]


def reconcile(status, now, verdicts=None, **kw):
    """One handler pass: prepare, look when due (with the given verdicts), plan."""
    observation = observe(status=status, now=now, **kw)
    prepared = rx.prepare(observation)
    looked = results(*verdicts) if prepared.look_due and verdicts else None
    return rx.plan(observation, SETTINGS, looked, prepared), prepared


def weight_in(plan) -> int:
    config = yaml.safe_load(plan.apply[0]["data"]["router.yaml"])
    return {arm["name"]: arm["weightBp"] for arm in config["arms"]}["treatment"]


def test_it_waits_for_both_models_to_be_ready():
    plan = rx.plan(observe(treatment=model("v2", "Training")), SETTINGS)
    assert plan.status.phase == "Pending"
    assert "treatment RecModel 'v2' to be Ready (it is Training)" in plan.status.message
    assert plan.apply == ()
    missing = rx.plan(observe(control=None), SETTINGS)
    assert "control RecModel 'v1': it does not exist" in missing.status.message


def test_start_writes_the_router_at_the_first_step():
    plan, prepared = reconcile({}, T0)
    assert not prepared.look_due
    assert [m["kind"] for m in plan.apply] == ["ConfigMap", "Deployment", "Service"]
    assert weight_in(plan) == 1000
    config = yaml.safe_load(plan.apply[0]["data"]["router.yaml"])
    assert config["salt"] == "v2-vs-v1" and config["arms"][1]["triton"]["url"] == "v1-triton.shop.svc:8001"
    assert (plan.status.phase, plan.status.current_step, plan.status.weight) == ("Progressing", 0, 10)
    assert plan.status.router == "v2-vs-v1-router.shop.svc:8080"
    assert [e.reason for e in plan.events] == ["Started"]


def _run(timeline):
    """Reconcile at each (seconds, verdicts) of the timeline, feeding each status to the next."""
    status: dict = {}
    plans = []
    for seconds, verdicts in timeline:
        plan, _ = reconcile(status, T0 + timedelta(seconds=seconds), verdicts)
        status = plan.status.to_patch()
        plans.append(plan)
    return plans


S, UNDECIDED = Verdict.SUCCESSFUL, Verdict.INCONCLUSIVE


def test_a_good_treatment_ramps_up_and_is_promoted():
    # Step 1's pause ends at 60 s; step 2 starts at 70 s (the router settle time) and ends at 130 s.
    plans = _run([(0, None), (30, (S, UNDECIDED)), (60, (S, UNDECIDED)), (75, (S, UNDECIDED)),
                  (140, (S, UNDECIDED)), (170, (S, S)), (240, (S, S))])
    assert [p.status.weight for p in plans] == [10, 10, 50, 50, 100, 100, 100]
    assert plans[2].status.current_step == 1 and [e.reason for e in plans[2].events] == ["StepAdvanced"]
    # The new step's window opens only after the routers had time to load the new weights.
    assert plans[2].status.rollout["stepStartedAt"] == (T0 + timedelta(seconds=70)).timestamp()
    assert not rx.prepare(observe(status=plans[2].status.to_patch(), now=T0 + timedelta(seconds=75))).look_due
    final = plans[-1]
    assert final.status.phase == "Promoted" and final.status.winner == "v2" and weight_in(final) == 10_000
    assert "Promoted" in [e.reason for p in plans for e in p.events]
    assert {c.type: c.status for c in final.status.conditions} == {"Progressing": "False", "Completed": "True"}


def test_a_failed_gate_rolls_back_to_the_control():
    plans = _run([(0, None), (30, (S, Verdict.FAILED))])
    assert plans[-1].status.phase == "RolledBack" and plans[-1].status.winner == "v1"
    assert weight_in(plans[-1]) == 0
    assert [(e.type, e.reason) for e in plans[-1].events] == [("Warning", "RolledBack")]
    assert plans[-1].status.gates["ctrLift"].verdict == "Failed"


def test_gate_errors_pause_and_the_resume_annotation_resumes():
    plans = _run([(0, None), (30, (Verdict.ERROR, UNDECIDED)), (60, (Verdict.ERROR, UNDECIDED))])
    paused = plans[-1].status
    assert paused.phase == "Paused" and weight_in(plans[-1]) == 1000  # weights kept while paused
    plan, _ = reconcile(paused.to_patch(), T0 + timedelta(seconds=90), (S, UNDECIDED),
                               annotations={rx.RESUME_ANNOTATION: "1"})
    assert plan.status.phase == "Progressing" and plan.status.resumed == "1"
    assert "Resumed" in [e.reason for e in plan.events]
    # The same annotation value does not resume twice.
    again = rx.prepare(observe(status=plan.status.to_patch(), now=T0 + timedelta(seconds=95),
                               annotations={rx.RESUME_ANNOTATION: "1"}))
    assert again.state.phase.value == "Progressing"


def test_a_crash_looping_treatment_rolls_back_without_a_look():
    pods = [{"metadata": {"name": "v2-triton-1"},
             "status": {"containerStatuses": [{"name": "triton",
                                               "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}}]
    start, _ = reconcile({}, T0)
    plan, prepared = reconcile(start.status.to_patch(), T0 + timedelta(seconds=30), (S, S), treatment_pods=pods)
    assert not prepared.look_due
    assert plan.status.phase == "RolledBack" and "crash-looping" in plan.status.message
    assert weight_in(plan) == 0


def test_a_deployment_past_its_deadline_rolls_back():
    deployment = {"metadata": {"name": "v2-triton"},
                  "status": {"conditions": [{"type": "Progressing", "reason": "ProgressDeadlineExceeded"}]}}
    start, _ = reconcile({}, T0)
    plan, _ = reconcile(start.status.to_patch(), T0 + timedelta(seconds=5), None, treatment_deployment=deployment)
    assert plan.status.phase == "RolledBack" and "progress deadline" in plan.status.message


def test_a_restarted_operator_continues_from_the_status():
    # Same timeline, but every reconcile starts from the status alone (as after a restart):
    # _run already does that; here the intermediate plans are re-planned twice to show idempotence.
    status: dict = {}
    for seconds, verdicts in [(0, None), (30, (S, UNDECIDED)), (60, (S, UNDECIDED))]:
        first, _ = reconcile(status, T0 + timedelta(seconds=seconds), verdicts)
        second, _ = reconcile(status, T0 + timedelta(seconds=seconds), verdicts)
        assert first.status == second.status and first.apply == second.apply
        status = first.status.to_patch()
    assert status["currentStep"] == 1


def test_an_invalid_spec_fails_with_the_field_named():
    bad = {**SPEC, "treatment": {"model": "v1"}}
    plan = rx.plan(observe(spec=bad), SETTINGS)
    assert plan.status.phase == "Failed" and "treatment.model must differ" in plan.status.message
    assert [e.reason for e in plan.events] == ["InvalidSpec"]


def test_a_spec_with_fewer_steps_than_the_state_fails():
    plans = _run([(0, None), (30, (S, UNDECIDED)), (60, (S, UNDECIDED))])
    shorter = {**SPEC, "steps": SPEC["steps"][:1]}
    plan, _ = reconcile(plans[-1].status.to_patch(), T0 + timedelta(seconds=90), None, spec=shorter)
    assert plan.status.phase == "Failed" and weight_in(plan) == 0


def test_a_lost_control_fails_the_experiment_and_writes_no_router():
    start, _ = reconcile({}, T0)
    plan, _ = reconcile(start.status.to_patch(), T0 + timedelta(seconds=5), None, control=model("v1", "Failed"))
    assert plan.status.phase == "Failed" and plan.apply == ()


def arm_urls(plan) -> dict[str, str]:
    config = yaml.safe_load(plan.apply[0]["data"]["router.yaml"])
    return {arm["name"]: arm["triton"]["url"] for arm in config["arms"]}


def test_a_model_whose_triton_pods_restart_holds_the_step_and_keeps_its_own_arm():
    """Found on the real node: a killed control Triton put its RecModel back to Deploying, and the experiment
    Failed ("the control RecModel is not Ready"). A model that serves but is not Ready now holds the step (no
    look, weights kept); each arm keeps its own Service, never the other model's."""
    start, _ = reconcile({}, T0)
    for role in ("control", "treatment"):
        name = "v1" if role == "control" else "v2"
        plan, prepared = reconcile(start.status.to_patch(), T0 + timedelta(seconds=75), (S, S),
                                   **{role: model(name, "Deploying")})
        assert plan.status.phase == "Progressing" and not prepared.look_due
        assert plan.status.message.startswith(f"holding: the {role} RecModel {name!r} is not Ready")
        assert weight_in(plan) == 1_000 and plan.status.current_step == 0
        assert arm_urls(plan) == {"treatment": "v2-triton.shop.svc:8001", "control": "v1-triton.shop.svc:8001"}
    # Ready again: the look happens and the ramp goes on.
    plan, prepared = reconcile(start.status.to_patch(), T0 + timedelta(seconds=75), (S, UNDECIDED))
    assert prepared.look_due and plan.status.current_step == 1 and not plan.status.message.startswith("holding")


def test_operator_metrics_follow_the_status():
    from prometheus_client import CollectorRegistry, generate_latest

    from recops.operator.metrics import OperatorMetrics

    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    plans = _run([(0, None), (30, (S, Verdict.FAILED))])
    metrics.experiment("shop", "v2-vs-v1", plans[-1].status.to_patch())
    text = generate_latest(registry).decode()
    assert 'recops_experiment_phase{experiment="v2-vs-v1",namespace="shop",phase="RolledBack"} 1.0' in text
    assert 'recops_experiment_treatment_weight_percent{experiment="v2-vs-v1",namespace="shop"} 0.0' in text
    assert 'gate="ctrLift",namespace="shop",verdict="Failed"} 1.0' in text
    assert 'gate="ctrLift",namespace="shop",verdict="Successful"} 0.0' in text
    metrics.forget("RecExperiment", "shop", "v2-vs-v1")
    assert "v2-vs-v1" not in generate_latest(registry).decode()
