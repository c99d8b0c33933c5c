"""The RecExperiment step machine: each rule alone, whole rollouts from scripted verdicts, the status round trip."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest

from recops.api.recexperiment import RecExperimentSpec
from recops.experiments import rollout
from recops.experiments.gates import GateResult, Verdict
from recops.experiments.rollout import Decision, Phase, Reason, RolloutState
from recops.serving.assignment import ArmWeights

S, F, INC, E = Verdict.SUCCESSFUL, Verdict.FAILED, Verdict.INCONCLUSIVE, Verdict.ERROR
GATE_NAMES = ("ctrLift", "sampleRatio", "latencyP99", "errorRate")
STEPS = (1, 10, 50, 100)  # percent; pause 5m each, a look every minute
PAUSE, INTERVAL = 300.0, 60.0


def make_spec(*, max_inconclusive: int = 3, max_errors: int = 2, **overrides) -> RecExperimentSpec:
    document = {
        "control": {"model": "ranker-v1"},
        "treatment": {"model": "ranker-v2"},
        "assignment": {"salt": "s"},
        "steps": [{"weight": weight, "pause": "5m"} for weight in STEPS],
        "gates": [
            {"type": "ctrLift"},
            {"type": "sampleRatio"},
            {"type": "latencyP99", "maxMilliseconds": 250},
            {"type": "errorRate", "maxRatio": 0.01},
        ],
        "prometheus": {"url": "http://prometheus:9090"},
        "analysis": {"interval": "1m", "maxInconclusiveLooks": max_inconclusive, "maxConsecutiveErrors": max_errors},
        **overrides,
    }
    return RecExperimentSpec.model_validate(document)


SPEC = make_spec()


def look(default: Verdict = S, **verdicts: Verdict) -> list[GateResult]:
    """One result per gate of SPEC: ``default`` unless named."""
    unknown = set(verdicts) - set(GATE_NAMES)
    assert not unknown, unknown
    return [
        GateResult(name, verdicts.get(name, default), 0.5, message=f"{name} says {verdicts.get(name, default)}")
        for name in GATE_NAMES
    ]


def at_step(step: int, *, started: float = 0.0, step_started: float = 1000.0, **changes) -> RolloutState:
    """A Progressing state at ``step`` (index) that began at ``step_started``."""
    return RolloutState(Phase.PROGRESSING, step, started, step_started, **changes)


def weight(state: RolloutState) -> int:
    return rollout.treatment_weight_bp(SPEC, state)


# --------------------------------------------------------------------------- start, weights, timing


def test_start_is_the_first_step_and_proposes_a_look_one_interval_later():
    state = rollout.start(SPEC, now=100.0)
    assert (state.phase, state.step, state.started_at, state.step_started_at) == (Phase.PROGRESSING, 0, 100.0, 100.0)
    assert weight(state) == 100  # 1% in basis points
    assert rollout.arm_weights(SPEC, state, "ranker-v2", "ranker-v1") == ArmWeights(
        arms={"ranker-v2": 100, "ranker-v1": 9900}
    )
    assert rollout.next_look_at(SPEC, state) == 160.0
    assert [(h.decision, h.step, h.weight_bp, h.at) for h in state.history] == [(Decision.START, 0, 100, 100.0)]


def test_weights_by_phase():
    assert weight(at_step(2)) == 5000
    assert weight(RolloutState(Phase.PAUSED, 2, 0, 0)) == 5000
    assert weight(RolloutState(Phase.PROMOTED, 3, 0, 0)) == 10_000
    assert weight(RolloutState(Phase.ROLLED_BACK, 2, 0, 0)) == 0
    assert weight(RolloutState(Phase.FAILED, 2, 0, 0)) == 0
    assert weight(at_step(7)) == 0  # a step the spec does not have: control, never a guess
    promoted = rollout.arm_weights(SPEC, RolloutState(Phase.PROMOTED, 3, 0, 0))
    assert [(arm.name, arm.weight_bp) for arm in promoted.arms] == [("treatment", 10_000), ("control", 0)]


def test_gate_context_windows_are_whole_seconds_since_the_experiment_and_the_step():
    context = rollout.gate_context(SPEC, at_step(1, started=0.0, step_started=1000.0), "exp", 1234.2, time=1234.2)
    assert (context.window, context.step_window, context.time) == (1235.0, 235.0, 1234.2)
    assert context.treatment == "treatment" and context.arms.arms[0].weight_bp == 1000
    fresh = rollout.gate_context(SPEC, rollout.start(SPEC, 5.0), "exp", 5.0)
    assert (fresh.window, fresh.step_window) == (1.0, 1.0)  # never an empty window


def test_next_look_is_an_interval_after_the_last_look_and_none_when_nothing_will_be_decided():
    state = rollout.observe(SPEC, at_step(0, step_started=0.0), look(ctrLift=INC), now=60.0)
    assert rollout.next_look_at(SPEC, state) == 120.0
    assert rollout.next_look_at(SPEC, RolloutState(Phase.PAUSED, 0, 0, 0)) is None
    assert rollout.next_look_at(SPEC, RolloutState(Phase.PROMOTED, 3, 0, 0)) is None


# --------------------------------------------------------------------------- the rules, one by one


@pytest.mark.parametrize("now", [1060.0, 2000.0])  # before and after the pause
def test_any_failed_gate_rolls_back_at_once(now):
    state = rollout.observe(SPEC, at_step(1), look(latencyP99=F, errorRate=E, ctrLift=INC), now=now)
    assert state.phase is Phase.ROLLED_BACK and state.reason is Reason.GATE_FAILED
    assert weight(state) == 0
    assert "latencyP99 says Failed" in state.message and "step 2 of 4 (10%)" in state.message
    assert state.history[-1] == rollout.HistoryEntry(Decision.ROLLBACK, 1, 0, now, Verdict.FAILED)


def test_errors_hold_then_pause_and_a_clean_look_resets_the_count():
    spec = make_spec(max_errors=3)
    state = at_step(2, step_started=0.0)
    state = rollout.observe(spec, state, look(sampleRatio=E), now=600.0)  # past the pause: still only holds
    state = rollout.observe(spec, state, look(ctrLift=E), now=660.0)
    assert (state.phase, state.step, state.consecutive_errors, state.reason) == (
        Phase.PROGRESSING, 2, 2, Reason.GATE_ERROR
    )
    assert state.inconclusive_looks == 0  # an outage does not count towards giving up
    state = rollout.observe(spec, state, look(sampleRatio=INC), now=720.0)  # no Error: count starts again
    assert state.consecutive_errors == 0 and state.inconclusive_looks == 1
    for now in (780.0, 840.0):
        state = rollout.observe(spec, state, look(errorRate=E), now=now)
        assert state.phase is Phase.PROGRESSING
    state = rollout.observe(spec, state, look(errorRate=E), now=900.0)
    assert state.phase is Phase.PAUSED and state.reason is Reason.TOO_MANY_ERRORS
    assert weight(state) == 5000  # paused: the weight holds, nothing is promoted or rolled back
    assert state.history[-1] == rollout.HistoryEntry(Decision.PAUSE, 2, 5000, 900.0, Verdict.ERROR)


def test_paused_stays_paused_until_resumed():
    paused = rollout.observe(SPEC, at_step(0, consecutive_errors=1), look(errorRate=E), now=1060.0)
    assert paused.phase is Phase.PAUSED
    # Even a decisive look changes nothing while paused.
    assert rollout.observe(SPEC, paused, look(), now=5000.0) is paused
    assert rollout.observe(SPEC, paused, look(ctrLift=F), now=5000.0) is paused
    resumed = rollout.resume(paused, now=6000.0)
    assert (resumed.phase, resumed.consecutive_errors, resumed.reason) == (Phase.PROGRESSING, 0, Reason.RESUMED)
    assert resumed.history[-1] == rollout.HistoryEntry(Decision.RESUME, 0, 100, 6000.0, None)
    assert rollout.next_look_at(SPEC, resumed) == 1120.0  # overdue: look at once
    assert rollout.resume(resumed, now=6001.0) is resumed  # not paused: unchanged


def test_before_the_pause_the_step_holds_even_when_every_gate_is_successful():
    state = rollout.observe(SPEC, at_step(0, step_started=0.0), look(), now=PAUSE - 1)
    assert (state.phase, state.step, state.reason, state.looks) == (Phase.PROGRESSING, 0, Reason.STEP_PAUSE, 1)
    assert state.inconclusive_looks == 0 and "299s of its 300s pause" in state.message


def test_intermediate_steps_advance_on_guardrails_while_the_lift_is_still_inconclusive():
    state = at_step(0, step_started=0.0, looks=4)
    advanced = rollout.observe(SPEC, state, look(ctrLift=INC), now=PAUSE)
    assert (advanced.step, advanced.step_started_at, advanced.looks, advanced.reason) == (
        1, PAUSE, 0, Reason.STEP_ADVANCED
    )
    assert weight(advanced) == 1000
    assert advanced.history[-1] == rollout.HistoryEntry(Decision.ADVANCE, 1, 1000, PAUSE, Verdict.INCONCLUSIVE)


@pytest.mark.parametrize("guardrail", ["sampleRatio", "latencyP99", "errorRate"])
def test_an_undecided_guardrail_holds_an_intermediate_step(guardrail):
    state = rollout.observe(SPEC, at_step(1, step_started=0.0), look(**{guardrail: INC}), now=PAUSE)
    assert (state.step, state.reason, state.inconclusive_looks) == (1, Reason.AWAITING_GUARDRAILS, 1)
    assert guardrail in state.message


def test_a_promql_gate_is_a_guardrail():
    spec = make_spec(
        gates=[{"type": "ctrLift"}, {"type": "promql", "name": "q", "query": "vector(1)", "op": "gt", "threshold": 0}]
    )
    results = [GateResult("ctrLift", INC), GateResult("q", INC)]
    assert rollout.observe(spec, at_step(0, step_started=0.0), results, now=PAUSE).step == 0
    results = [GateResult("ctrLift", INC), GateResult("q", S)]
    assert rollout.observe(spec, at_step(0, step_started=0.0), results, now=PAUSE).step == 1


def test_the_last_step_promotes_only_when_every_gate_is_successful():
    state = at_step(3, step_started=0.0)
    held = rollout.observe(SPEC, state, look(ctrLift=INC), now=PAUSE)
    assert (held.phase, held.reason, held.inconclusive_looks) == (Phase.PROGRESSING, Reason.AWAITING_EVIDENCE, 1)
    promoted = rollout.observe(SPEC, held, look(), now=PAUSE + INTERVAL)
    assert promoted.phase is Phase.PROMOTED and promoted.reason is Reason.ALL_GATES_SUCCESSFUL
    assert weight(promoted) == 10_000
    assert promoted.history[-1] == rollout.HistoryEntry(Decision.PROMOTE, 3, 10_000, PAUSE + INTERVAL, S)


def test_an_inconclusive_lift_at_the_last_step_rolls_back_for_lack_of_evidence():
    state = at_step(3, step_started=0.0)
    for n in (1, 2):
        state = rollout.observe(SPEC, state, look(ctrLift=INC), now=PAUSE + n * INTERVAL)
        assert state.phase is Phase.PROGRESSING and state.inconclusive_looks == n
    state = rollout.observe(SPEC, state, look(ctrLift=INC), now=PAUSE + 3 * INTERVAL)
    assert state.phase is Phase.ROLLED_BACK and state.reason is Reason.NO_EVIDENCE
    assert state.message.startswith("no evidence of improvement after 3 inconclusive looks")
    assert weight(state) == 0


def test_an_undecided_guardrail_rolls_back_after_max_inconclusive_looks_too():
    state = at_step(1, step_started=0.0, inconclusive_looks=2)
    state = rollout.observe(SPEC, state, look(sampleRatio=INC, ctrLift=INC), now=PAUSE)
    assert state.phase is Phase.ROLLED_BACK and state.reason is Reason.GUARDRAILS_UNDECIDED
    assert "guardrails still undecided" in state.message


def test_terminal_phases_stay_terminal():
    for phase in (Phase.PROMOTED, Phase.ROLLED_BACK, Phase.FAILED):
        state = RolloutState(phase, 1, 0, 0)
        assert rollout.observe(SPEC, state, look(ctrLift=F), now=10_000.0) is state
        assert rollout.resume(state, now=10_000.0) is state
        assert rollout.fail(state, now=10_000.0, message="x") is state


def test_fail_marks_a_broken_experiment_and_sends_everyone_to_control():
    failed = rollout.fail(at_step(2), now=1500.0, message="RecModel ranker-v2 not found")
    assert (failed.phase, failed.reason, failed.message) == (
        Phase.FAILED, Reason.EXPERIMENT_FAILED, "RecModel ranker-v2 not found"
    )
    assert weight(failed) == 0 and failed.history[-1].decision is Decision.FAIL


def test_a_spec_without_the_states_step_fails_the_experiment():
    shorter = make_spec(steps=[{"weight": 5, "pause": "5m"}, {"weight": 100, "pause": "5m"}])
    state = rollout.observe(shorter, at_step(3), look(), now=2000.0)
    assert state.phase is Phase.FAILED and state.reason is Reason.SPEC_CHANGED
    assert "step 4" in state.message


def test_results_must_cover_exactly_the_specs_gates():
    with pytest.raises(ValueError, match="one result per gate"):
        rollout.observe(SPEC, at_step(0), look()[:-1], now=1060.0)
    with pytest.raises(ValueError, match="one result per gate"):
        rollout.observe(SPEC, at_step(0), [*look(), GateResult("extra", S)], now=1060.0)


def test_history_is_bounded():
    state = rollout.start(SPEC, 0.0)
    spec = make_spec(max_errors=1)
    for n in range(100):
        state = rollout.observe(spec, state, look(errorRate=E), now=60.0 * (2 * n + 1))
        state = rollout.resume(state, now=60.0 * (2 * n + 2))
    assert len(state.history) == rollout.MAX_HISTORY
    assert state.history[-1].decision is Decision.RESUME


# --------------------------------------------------------------------------- whole rollouts


Script = Callable[[int, int], dict[str, Verdict]]  # (step index, look in step) → named verdicts; the rest Successful


def drive(spec: RecExperimentSpec, script: Script, max_looks: int = 200) -> tuple[RolloutState, list[int]]:
    """Run the machine from start, looking when it asks, with verdicts from ``script``; the weights it applied."""
    state = rollout.start(spec, now=0.0)
    weights = [rollout.treatment_weight_bp(spec, state)]
    for _ in range(max_looks):
        when = rollout.next_look_at(spec, state)
        if when is None:
            break
        state = rollout.observe(spec, state, look(**script(state.step, state.looks)), now=when)
        weights.append(rollout.treatment_weight_bp(spec, state))
    return state, weights


def decisions(state: RolloutState) -> list[tuple[Decision, int, int]]:
    return [(h.decision, h.step, h.weight_bp) for h in state.history]


def test_rollout_promotes_once_the_lift_is_shown_at_the_last_step():
    # The CTR lift stays Inconclusive on the small steps and is shown after two looks past the last pause.
    def script(step: int, looks: int) -> dict[str, Verdict]:
        return {"ctrLift": S if step == 3 and looks >= 6 else INC}

    state, weights = drive(SPEC, script)
    assert state.phase is Phase.PROMOTED
    assert decisions(state) == [
        (Decision.START, 0, 100),
        (Decision.ADVANCE, 1, 1000),
        (Decision.ADVANCE, 2, 5000),
        (Decision.ADVANCE, 3, 10_000),
        (Decision.PROMOTE, 3, 10_000),
    ]
    # Each step lasts exactly its pause (5 looks a minute apart), then 2 more looks at the last.
    assert [h.at for h in state.history] == [0.0, 300.0, 600.0, 900.0, 1320.0]
    assert weights == sorted(weights) and weights[-1] == 10_000  # monotone non-decreasing until promotion
    assert weights.count(100) == 5 and weights.count(1000) == 5  # start + 4 holding looks; 1 advance + 4


def test_rollout_rolls_back_when_a_gate_fails_at_step_two():
    def script(step: int, looks: int) -> dict[str, Verdict]:
        return {"ctrLift": F if step == 1 and looks == 2 else INC}

    state, weights = drive(SPEC, script)
    assert state.phase is Phase.ROLLED_BACK and state.reason is Reason.GATE_FAILED
    assert decisions(state) == [(Decision.START, 0, 100), (Decision.ADVANCE, 1, 1000), (Decision.ROLLBACK, 1, 0)]
    assert state.history[-1].at == 300.0 + 3 * INTERVAL
    assert weights[:-1] == sorted(weights[:-1]) and weights[-1] == 0


def test_rollout_pauses_after_consecutive_errors_and_goes_on_when_resumed():
    outage = {"sampleRatio": E, "latencyP99": E, "errorRate": E, "ctrLift": E}

    def script(step: int, looks: int) -> dict[str, Verdict]:
        return outage if step == 2 and looks < 2 else {"ctrLift": S if step == 3 else INC}

    state, weights = drive(SPEC, script)
    assert state.phase is Phase.PAUSED and state.step == 2 and weights[-1] == 5000
    assert set(weights) == {100, 1000, 5000}  # nothing rolled back or promoted during the outage
    state = rollout.resume(state, now=10_000.0)
    assert rollout.next_look_at(SPEC, state) < 10_000.0  # overdue: look at once
    # Resumed on its own clock: the step's pause has long elapsed, so the next clean look advances.
    state = rollout.observe(SPEC, state, look(ctrLift=INC), now=10_000.0)
    assert state.step == 3
    state = rollout.observe(SPEC, state, look(), now=10_300.0)
    assert state.phase is Phase.PROMOTED
    assert [d for d, _, _ in decisions(state)] == [
        Decision.START, Decision.ADVANCE, Decision.ADVANCE, Decision.PAUSE, Decision.RESUME, Decision.ADVANCE,
        Decision.PROMOTE,
    ]


def test_rollout_holds_then_rolls_back_when_the_lift_stays_inconclusive():
    state, weights = drive(SPEC, lambda step, looks: {"ctrLift": INC})
    assert state.phase is Phase.ROLLED_BACK and state.reason is Reason.NO_EVIDENCE
    assert "no evidence of improvement" in state.message and "ctrLift" in state.message
    # Ramped to the last step (the lift need not be decided before), held 3 looks past its pause, gave up.
    assert decisions(state)[-2:] == [(Decision.ADVANCE, 3, 10_000), (Decision.ROLLBACK, 3, 0)]
    assert state.history[-1].at == 900.0 + PAUSE + 2 * INTERVAL
    assert weights[:-1] == sorted(weights[:-1]) and weights[-1] == 0


# --------------------------------------------------------------------------- status


def test_status_round_trips_through_json():
    state = rollout.start(SPEC, now=1.5)
    state = rollout.observe(SPEC, state, look(ctrLift=INC), now=61.5)
    state = rollout.observe(
        SPEC,
        state,
        [
            GateResult("ctrLift", INC, math.nan, message="needs 1000 impressions"),
            GateResult("sampleRatio", S, 0.43),
            GateResult("latencyP99", E, None, message="cannot reach http://prometheus:9090"),
            GateResult("errorRate", S, 0.0),
        ],
        now=121.5,
    )
    status = state.to_status()
    again = RolloutState.from_status(json.loads(json.dumps(status, allow_nan=False)))  # a CR status has no NaN
    assert again == state
    assert status["phase"] == "Progressing" and status["consecutiveErrors"] == 1
    assert status["gates"]["ctrLift"] == {"verdict": "Inconclusive", "value": None, "message": "needs 1000 impressions"}
    assert status["gates"]["latencyP99"]["verdict"] == "Error"
    assert status["history"] == [{"decision": "Start", "step": 0, "weightBp": 100, "at": 1.5, "verdict": None}]

    finished, _ = drive(SPEC, lambda step, looks: {"ctrLift": S if step == 3 else INC})
    assert RolloutState.from_status(json.loads(json.dumps(finished.to_status()))) == finished


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"phase": "Sleeping"}, "Sleeping"),
        ({"step": -1}, "step"),
        ({"stepStartedAt": "yesterday"}, "stepStartedAt"),
        ({"gates": [1]}, "gates"),
        ({"history": [{"decision": "Start"}]}, "step"),
    ],
)
def test_a_malformed_status_is_refused_by_field(change, match):
    status = {**rollout.start(SPEC, 0.0).to_status(), **change}
    with pytest.raises(ValueError, match=match):
        RolloutState.from_status(status)
    with pytest.raises(ValueError, match="lacks 'phase'"):
        RolloutState.from_status({"step": 0})


def test_a_step_starts_when_its_weights_are_live_not_when_they_were_chosen():
    state = rollout.start(SPEC, 100.0)
    later = rollout.weights_applied(state, 107.5)
    assert later.step_started_at == 107.5 and later.started_at == state.started_at
    assert rollout.weights_applied(later, 101.0).step_started_at == 107.5  # never moves back
