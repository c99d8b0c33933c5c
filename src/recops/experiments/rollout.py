"""The RecExperiment step machine: from gate verdicts to the treatment's share of traffic.

Pure and explicit, after Argo Rollouts' analysis controller: a frozen :class:`RolloutState`
and functions that return the next one. Nothing here reads a clock, Prometheus or the cluster:
the caller (the operator's kopf handler, ``recops demo``) evaluates the gates with
:func:`~recops.experiments.gates.evaluate_gates` (over :func:`gate_context`), passes the
results and its own ``now`` (float seconds) to :func:`observe`, writes :func:`arm_weights`
into the router config and looks again at :func:`next_look_at`. The state goes into the
custom resource's status as :meth:`RolloutState.to_status` and comes back with
:meth:`RolloutState.from_status`, so a restarted operator continues where it stopped.

Phases::

    Progressing ──(advance)──► Progressing ──(last step, all Successful)──► Promoted
        │    ▲                      │
        │    └─────(resume)───── Paused ◄──(maxConsecutiveErrors looks with an Error)
        └──(a gate Failed, or undecided for maxInconclusiveLooks past the pause)──► RolledBack
    any non-terminal ──(fail(): the experiment itself is broken)──► Failed

Rules of one look (:func:`observe`), in this order:

1. **Any gate Failed → RolledBack** (``onFailure``), at any step and whether or not the pause
   has elapsed: a failed gate is positive evidence of harm (or of a broken split), and the
   always-valid tests behind the lift gates make that evidence valid at every look.
2. **Any gate in Error → hold** the step; after ``analysis.maxConsecutiveErrors`` looks in a
   row with an Error → **Paused** for a human. An outage (Prometheus or a router unreachable)
   says nothing about the treatment, so it must neither promote nor roll back; pausing keeps
   the current weights and stops the machine from deciding on what it cannot see.
3. **Before the step's pause has elapsed → hold.** The pause is the minimum exposure at a
   weight; gates are still read (and a Failed one still rolls back).
4. **After the pause, at an intermediate step → advance** when every *guardrail* gate
   (``sampleRatio``, ``latencyP99``, ``errorRate``, ``promql``) is Successful. *Lift* gates
   (``ctrLift``, ``likeRateLift``, ``gmvPerUserLift``) may still be Inconclusive: at 1% of the
   traffic they rarely have the power to decide, and ramping up is how they get it. They are
   the promotion criterion, decided at the last step; before that they can only stop the ramp
   (Failed, rule 1). A guardrail that is not yet Successful holds the step.
5. **After the pause, at the last step → Promoted** (``onSuccess``) when *every* gate is
   Successful; otherwise hold. Never promote without evidence.
6. **Inconclusive for too long → RolledBack.** Looks past the pause that neither advance nor
   promote are counted per step; at ``analysis.maxInconclusiveLooks`` the experiment rolls back,
   at the last step with the message "no evidence of improvement" when a lift gate is among the
   undecided (the control stays: it needs no evidence to keep serving).
7. **Terminal phases stay terminal**, and Paused stays Paused until :func:`resume`: a look at
   them returns the state unchanged.

Error looks past the pause count towards rule 2, not rule 6: an outage should pause, not roll
back. A look's counters are per step (``looks``, ``inconclusive_looks``) or per run of looks
(``consecutive_errors``, reset by any look without an Error and by :func:`resume`).

This refines how :mod:`recops.experiments.gates`' docstring put it ("Inconclusive never
advances"): there every gate had to be Successful to advance, which would keep a ramp at its
first small weight until the lift was significant there, defeating the ramp. Here only
guardrails gate the ramp and lifts gate the promotion.

The caller must call :func:`observe` with one result for each of ``spec.gates``; the machine
does not enforce the interval between looks, :func:`next_look_at` only proposes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from recops.api.recexperiment import RecExperimentSpec
from recops.experiments.gates import GateContext, GateResult, Verdict, overall
from recops.serving.assignment import BUCKETS, ArmWeights

GUARDRAIL_GATE_TYPES = frozenset({"sampleRatio", "latencyP99", "errorRate", "promql"})
"""Gates that must be Successful before the ramp moves up (health of the treatment and the split)."""
LIFT_GATE_TYPES = frozenset({"ctrLift", "likeRateLift", "gmvPerUserLift"})
"""Gates that must be Successful before promotion (evidence the treatment is better)."""

MAX_HISTORY = 64
"""Decisions kept in the state (the oldest go first): the status of a custom resource must stay small."""
MAX_MESSAGE = 400
"""Characters kept of a gate's message in the state, for the same reason."""


class Phase(StrEnum):
    """Where the experiment is."""

    PROGRESSING = "Progressing"  # ramping: looking at the gates every interval
    PAUSED = "Paused"  # holding the current weight until a human resumes
    PROMOTED = "Promoted"  # onSuccess: the treatment serves everyone
    ROLLED_BACK = "RolledBack"  # onFailure: everyone back on control
    FAILED = "Failed"  # the experiment itself is broken (e.g. the spec no longer fits the state)


TERMINAL_PHASES = frozenset({Phase.PROMOTED, Phase.ROLLED_BACK, Phase.FAILED})


class Decision(StrEnum):
    """What a history entry records."""

    START = "Start"
    ADVANCE = "Advance"
    PROMOTE = "Promote"
    ROLLBACK = "Rollback"
    PAUSE = "Pause"
    RESUME = "Resume"
    FAIL = "Fail"


class Reason(StrEnum):
    """Why the state is what it is: a short machine-readable word, like a Kubernetes condition's reason."""

    STARTED = "Started"
    STEP_PAUSE = "StepPause"  # holding: the step's pause has not elapsed
    AWAITING_GUARDRAILS = "AwaitingGuardrails"  # holding: a guardrail is not yet Successful
    AWAITING_EVIDENCE = "AwaitingEvidence"  # holding at the last step: a gate is not yet Successful
    GATE_ERROR = "GateError"  # holding: a gate could not be read
    STEP_ADVANCED = "StepAdvanced"
    RESUMED = "Resumed"
    TOO_MANY_ERRORS = "TooManyErrors"  # Paused
    ALL_GATES_SUCCESSFUL = "AllGatesSuccessful"  # Promoted
    GATE_FAILED = "GateFailed"  # RolledBack
    NO_EVIDENCE = "NoEvidence"  # RolledBack: a lift gate stayed Inconclusive
    GUARDRAILS_UNDECIDED = "GuardrailsUndecided"  # RolledBack: a guardrail stayed Inconclusive
    TREATMENT_UNHEALTHY = "TreatmentUnhealthy"  # RolledBack: the treatment's pods crash or never became available
    SPEC_CHANGED = "SpecChanged"  # Failed: the state's step is not in the spec any more
    EXPERIMENT_FAILED = "ExperimentFailed"  # Failed, by fail()


@dataclass(frozen=True)
class GateSummary:
    """One gate's result at the last look, as kept in the status (no details: those stay in logs and reports).

    ``value`` is ``None`` when the gate had none or it was not finite (NaN cannot be written to a status).
    """

    gate: str
    verdict: Verdict
    value: float | None = None
    message: str = ""

    @classmethod
    def of(cls, result: GateResult) -> GateSummary:
        value = result.value if result.value is not None and math.isfinite(result.value) else None
        return cls(result.gate, Verdict(result.verdict), value, result.message[:MAX_MESSAGE])


@dataclass(frozen=True)
class HistoryEntry:
    """A decision: what happened, the step and treatment weight *after* it, when, and the look's overall verdict.

    ``verdict`` is :func:`~recops.experiments.gates.overall` of the look that decided (``None`` for
    start, resume and fail, which are not looks); an advance's may be Inconclusive (lifts undecided).
    """

    decision: Decision
    step: int
    weight_bp: int
    at: float
    verdict: Verdict | None = None


@dataclass(frozen=True)
class RolloutState:
    """Everything the step machine knows; times are the caller's clock in seconds.

    Attributes:
        phase: see :class:`Phase`.
        step: index into ``spec.steps`` of the current step.
        started_at: when the experiment started (the lift gates' window begins here).
        step_started_at: when the current step started (its pause and the guardrails' window begin here).
        looks: looks at the gates in this step.
        inconclusive_looks: looks in this step past its pause that neither advanced nor promoted.
        consecutive_errors: looks in a row with a gate in Error.
        last_look_at: time of the last look, ``None`` before the first.
        gates: each gate's result at the last look, in the spec's order.
        reason: a :class:`Reason` for the current state; ``message`` says it in words.
        history: the decisions so far, oldest first (at most :data:`MAX_HISTORY`).
    """

    phase: Phase
    step: int
    started_at: float
    step_started_at: float
    looks: int = 0
    inconclusive_looks: int = 0
    consecutive_errors: int = 0
    last_look_at: float | None = None
    gates: tuple[GateSummary, ...] = ()
    reason: Reason = Reason.STARTED
    message: str = ""
    history: tuple[HistoryEntry, ...] = field(default_factory=tuple)

    @property
    def terminal(self) -> bool:
        """Promoted, RolledBack or Failed: nothing changes it any more."""
        return self.phase in TERMINAL_PHASES

    def to_status(self) -> dict[str, Any]:
        """The state as a JSON-friendly dict with camelCase keys, for the custom resource's ``status``."""
        return {
            "phase": str(self.phase),
            "step": self.step,
            "startedAt": self.started_at,
            "stepStartedAt": self.step_started_at,
            "looks": self.looks,
            "inconclusiveLooks": self.inconclusive_looks,
            "consecutiveErrors": self.consecutive_errors,
            "lastLookAt": self.last_look_at,
            "gates": {g.gate: {"verdict": str(g.verdict), "value": g.value, "message": g.message} for g in self.gates},
            "reason": str(self.reason),
            "message": self.message,
            "history": [
                {
                    "decision": str(h.decision),
                    "step": h.step,
                    "weightBp": h.weight_bp,
                    "at": h.at,
                    "verdict": None if h.verdict is None else str(h.verdict),
                }
                for h in self.history
            ],
        }

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> RolloutState:
        """The state back from :meth:`to_status`'s dict.

        Raises:
            ValueError: naming the field, when ``status`` is not such a dict (e.g. edited by hand).
        """
        if not isinstance(status, Mapping):
            raise ValueError(f"status must be a mapping, got {type(status).__name__}")
        try:
            gates = status.get("gates", {})
            if not isinstance(gates, Mapping):
                raise ValueError(f"gates must be a mapping, got {gates!r}")
            history = status.get("history", [])
            if not isinstance(history, list):
                raise ValueError(f"history must be a list, got {history!r}")
            return cls(
                phase=Phase(status["phase"]),
                step=_count(status["step"], "step"),
                started_at=_time(status["startedAt"], "startedAt"),
                step_started_at=_time(status["stepStartedAt"], "stepStartedAt"),
                looks=_count(status.get("looks", 0), "looks"),
                inconclusive_looks=_count(status.get("inconclusiveLooks", 0), "inconclusiveLooks"),
                consecutive_errors=_count(status.get("consecutiveErrors", 0), "consecutiveErrors"),
                last_look_at=None if status.get("lastLookAt") is None else _time(status["lastLookAt"], "lastLookAt"),
                gates=tuple(
                    GateSummary(
                        str(name),
                        Verdict(entry["verdict"]),
                        None if entry.get("value") is None else _time(entry["value"], f"gates.{name}.value"),
                        str(entry.get("message", "")),
                    )
                    for name, entry in gates.items()
                ),
                reason=Reason(status.get("reason", Reason.STARTED)),
                message=str(status.get("message", "")),
                history=tuple(
                    HistoryEntry(
                        Decision(entry["decision"]),
                        _count(entry["step"], "history.step"),
                        _count(entry["weightBp"], "history.weightBp"),
                        _time(entry["at"], "history.at"),
                        None if entry.get("verdict") is None else Verdict(entry["verdict"]),
                    )
                    for entry in history
                ),
            )
        except KeyError as error:
            raise ValueError(f"status lacks {error.args[0]!r}") from None
        except (TypeError, AttributeError) as error:
            raise ValueError(f"malformed status: {error}") from None


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _time(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- weights


def treatment_weight_bp(spec: RecExperimentSpec, state: RolloutState) -> int:
    """The treatment's share of users now, in basis points.

    The current step's weight while Progressing or Paused; 10000 once Promoted; 0 once
    RolledBack or Failed, and 0 for a state whose step the spec does not have (traffic goes back
    to the control whenever the machine cannot say what the treatment deserves).
    """
    if state.phase is Phase.PROMOTED:
        return BUCKETS
    if state.phase in (Phase.ROLLED_BACK, Phase.FAILED) or state.step >= len(spec.steps):
        return 0
    return spec.steps[state.step].weight_bp


def arm_weights(
    spec: RecExperimentSpec, state: RolloutState, treatment_arm: str = "treatment", control_arm: str = "control"
) -> ArmWeights:
    """What the router config should say now: the treatment's weight first, the control (the rest) last."""
    return ArmWeights.two_arm(treatment_weight_bp(spec, state), treatment=treatment_arm, control=control_arm)


def gate_context(
    spec: RecExperimentSpec,
    state: RolloutState,
    experiment: str,
    now: float,
    *,
    treatment_arm: str = "treatment",
    control_arm: str = "control",
    time: float | None = None,
    routers: int = 1,
) -> GateContext:
    """Where the gates look at ``now``: the current weights, the experiment's and the step's windows.

    Windows are whole seconds (rounded up, at least one), so successive looks send tidy PromQL.
    ``time`` is the gates' evaluation time (``None``: the metrics source's now); ``routers`` the
    router replicas (each counts a user once: see :class:`GateContext`).
    """
    return GateContext(
        experiment,
        arm_weights(spec, state, treatment_arm, control_arm),
        window=max(1, math.ceil(now - state.started_at)),
        step_window=max(1, math.ceil(now - state.step_started_at)),
        time=time,
        routers=routers,
    )


# --------------------------------------------------------------------------- transitions


def _entry(decision: Decision, step: int, weight_bp: int, at: float, verdict: Verdict | None = None) -> HistoryEntry:
    return HistoryEntry(decision, step, weight_bp, float(at), verdict)


def _with_history(state: RolloutState, entry: HistoryEntry, **changes: Any) -> RolloutState:
    return replace(state, history=(*state.history, entry)[-MAX_HISTORY:], **changes)


def _percent(weight_bp: int) -> str:
    return f"{weight_bp / 100:g}%"


def _where(spec: RecExperimentSpec, step: int) -> str:
    return f"step {step + 1} of {len(spec.steps)} ({_percent(spec.steps[step].weight_bp)})"


def _gate_list(results: Sequence[GateResult]) -> str:
    return "; ".join(f"{r.gate}: {r.message}" if r.message else r.gate for r in results)


def start(spec: RecExperimentSpec, now: float) -> RolloutState:
    """A new experiment at its first step."""
    weight = spec.steps[0].weight_bp
    return RolloutState(
        phase=Phase.PROGRESSING,
        step=0,
        started_at=float(now),
        step_started_at=float(now),
        reason=Reason.STARTED,
        message=f"started at {_where(spec, 0)}",
        history=(_entry(Decision.START, 0, weight, now),),
    )


def observe(spec: RecExperimentSpec, state: RolloutState, results: Sequence[GateResult], now: float) -> RolloutState:
    """One look: the state after the gates gave ``results`` at ``now`` (rules in the module docstring).

    Raises:
        ValueError: when ``results`` do not hold exactly one result for each gate of the spec
            (a caller's bug: a missing gate must not pass by being absent).
    """
    if state.terminal or state.phase is Phase.PAUSED:
        return state
    if state.step >= len(spec.steps):
        # The spec was edited under a running experiment: what the treatment deserves is unknown.
        message = f"the state is at step {state.step + 1} but the spec has {len(spec.steps)} steps"
        return fail(state, now, message, reason=Reason.SPEC_CHANGED)
    gate_types = {gate.gate_name: gate.type for gate in spec.gates}
    names = [result.gate for result in results]
    if sorted(names) != sorted(gate_types):
        raise ValueError(f"observe() needs one result per gate of the spec {sorted(gate_types)}, got {sorted(names)}")

    step, weight = state.step, spec.steps[state.step].weight_bp
    verdict = overall(results)
    looked = replace(
        state,
        looks=state.looks + 1,
        last_look_at=float(now),
        gates=tuple(GateSummary.of(result) for result in results),
    )

    # 1. Evidence of harm ends the experiment, whatever the step and its pause.
    failed = [r for r in results if r.verdict is Verdict.FAILED]
    if failed:
        return _with_history(
            looked,
            _entry(Decision.ROLLBACK, step, 0, now, verdict),
            phase=Phase.ROLLED_BACK,
            consecutive_errors=0,
            reason=Reason.GATE_FAILED,
            message=f"rolled back at {_where(spec, step)}: {_gate_list(failed)}",
        )

    # 2. A gate that cannot see holds; enough of them in a row pause for a human.
    errors = [r for r in results if r.verdict is Verdict.ERROR]
    if errors:
        count = state.consecutive_errors + 1
        limit = spec.analysis.max_consecutive_errors
        if count >= limit:
            return _with_history(
                looked,
                _entry(Decision.PAUSE, step, weight, now, verdict),
                phase=Phase.PAUSED,
                consecutive_errors=count,
                reason=Reason.TOO_MANY_ERRORS,
                message=f"paused at {_where(spec, step)} after {count} looks in a row with an Error: "
                f"{_gate_list(errors)}",
            )
        return replace(
            looked,
            consecutive_errors=count,
            reason=Reason.GATE_ERROR,
            message=f"holding {_where(spec, step)}, Error {count} of {limit} in a row: {_gate_list(errors)}",
        )
    looked = replace(looked, consecutive_errors=0)

    # 3. The pause is the minimum exposure at this weight.
    elapsed, pause = now - state.step_started_at, spec.steps[step].pause_seconds
    if elapsed < pause:
        return replace(
            looked,
            reason=Reason.STEP_PAUSE,
            message=f"holding {_where(spec, step)}: {elapsed:.0f}s of its {pause}s pause",
        )

    # 4./5. Past the pause: guardrails move the ramp, every gate (lifts included) promotes.
    last = step == len(spec.steps) - 1
    needed = results if last else [r for r in results if gate_types[r.gate] in GUARDRAIL_GATE_TYPES]
    undecided = [r for r in needed if r.verdict is not Verdict.SUCCESSFUL]
    if not undecided:
        if last:
            return _with_history(
                looked,
                _entry(Decision.PROMOTE, step, BUCKETS, now, verdict),
                phase=Phase.PROMOTED,
                reason=Reason.ALL_GATES_SUCCESSFUL,
                message=f"promoted after {_where(spec, step)}: every gate Successful",
            )
        following = step + 1
        return _with_history(
            looked,
            _entry(Decision.ADVANCE, following, spec.steps[following].weight_bp, now, verdict),
            step=following,
            step_started_at=float(now),
            looks=0,
            inconclusive_looks=0,
            reason=Reason.STEP_ADVANCED,
            message=f"advanced to {_where(spec, following)}: guardrails Successful",
        )

    # 6. Undecided past the pause: hold, and give up after maxInconclusiveLooks.
    count = state.inconclusive_looks + 1
    limit = spec.analysis.max_inconclusive_looks
    if count >= limit:
        no_lift = any(gate_types[r.gate] in LIFT_GATE_TYPES for r in undecided)
        what = "no evidence of improvement" if no_lift else "guardrails still undecided"
        return _with_history(
            looked,
            _entry(Decision.ROLLBACK, step, 0, now, verdict),
            phase=Phase.ROLLED_BACK,
            inconclusive_looks=count,
            reason=Reason.NO_EVIDENCE if no_lift else Reason.GUARDRAILS_UNDECIDED,
            message=f"{what} after {count} inconclusive looks past the pause of {_where(spec, step)}: "
            f"{_gate_list(undecided)}",
        )
    return replace(
        looked,
        inconclusive_looks=count,
        reason=Reason.AWAITING_EVIDENCE if last else Reason.AWAITING_GUARDRAILS,
        message=f"holding {_where(spec, step)}, inconclusive look {count} of {limit}: {_gate_list(undecided)}",
    )


def weights_applied(state: RolloutState, now: float) -> RolloutState:
    """The router serves the current step's weights from ``now`` on.

    A weight change reaches the router some time after the look that decided it (a ConfigMap takes
    up to a minute to propagate; the local router polls every second). Users assigned in between
    still follow the old split, so the step — its pause and the guardrails' window, the sample-ratio
    check above all — starts when the new weights are confirmed live, not when they were chosen.
    """
    return replace(state, step_started_at=max(state.step_started_at, float(now)))


def resume(state: RolloutState, now: float) -> RolloutState:
    """A Paused experiment back to Progressing (a human has looked); any other state is returned unchanged.

    The step keeps its start and its counters, except ``consecutive_errors`` which starts again:
    after a long outage the next look comes at once (:func:`next_look_at`).
    """
    if state.phase is not Phase.PAUSED:
        return state
    weight = state.history[-1].weight_bp if state.history else 0
    return _with_history(
        state,
        _entry(Decision.RESUME, state.step, weight, now),
        phase=Phase.PROGRESSING,
        consecutive_errors=0,
        reason=Reason.RESUMED,
        message="resumed",
    )


def fail(state: RolloutState, now: float, message: str, *, reason: Reason = Reason.EXPERIMENT_FAILED) -> RolloutState:
    """Mark a non-terminal experiment Failed: it is broken (a model is missing, the router refuses the config...).

    Failed is not a verdict on the treatment (that is RolledBack); traffic goes to control all the same
    (:func:`treatment_weight_bp`). Terminal states are returned unchanged.
    """
    if state.terminal:
        return state
    return _with_history(
        state,
        _entry(Decision.FAIL, state.step, 0, now),
        phase=Phase.FAILED,
        reason=reason,
        message=message,
    )


def roll_back(
    state: RolloutState, now: float, message: str, *, reason: Reason = Reason.TREATMENT_UNHEALTHY
) -> RolloutState:
    """Roll a non-terminal experiment back (``onFailure``) for a reason outside the gates: the
    treatment's serving pods crash-loop or its Deployment missed its progress deadline, which is
    evidence against the treatment as much as a failed gate. Terminal states are returned unchanged."""
    if state.terminal:
        return state
    return _with_history(
        state,
        _entry(Decision.ROLLBACK, state.step, 0, now),
        phase=Phase.ROLLED_BACK,
        reason=reason,
        message=message,
    )


def next_look_at(spec: RecExperimentSpec, state: RolloutState) -> float | None:
    """When to look next: ``analysis.interval`` after the last look (or the step's start); ``None`` when Paused or
    terminal (nothing to look at until a human resumes, or ever). A time in the past means "now"."""
    if state.terminal or state.phase is Phase.PAUSED:
        return None
    last = state.step_started_at if state.last_look_at is None else max(state.last_look_at, state.step_started_at)
    return last + spec.analysis.interval_seconds
