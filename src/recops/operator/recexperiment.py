"""Reconciling a RecExperiment: the router objects, the step machine's looks, promotion and rollback.

Pure, like :mod:`recops.operator.recmodel`. One reconcile is two calls around the only side effect
that is not a write: :func:`prepare` says whether a look at the gates is due; the handler then
evaluates the gates against Prometheus (:func:`recops.experiments.gates.evaluate_gates` over
:func:`look_context`) and passes the results to :func:`plan`, which runs the step machine
(:mod:`recops.experiments.rollout`) and returns the router ConfigMap at the new weight, the status
(the machine's whole state under ``status.rollout``, so a restarted operator resumes from it) and
an event for every transition.

Outside the gates, the treatment's health decides too: crash-looping Triton pods or a Deployment
past its progress deadline roll the experiment back, as Argo Rollouts aborts on a degraded canary.
A Paused experiment resumes when the ``recops.dev/resume`` annotation gets a new value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from recops.api.loading import SpecError, parse_recexperiment_spec
from recops.api.recexperiment import RecExperimentSpec
from recops.api.status import GateStatus, RecExperimentStatus
from recops.experiments import rollout
from recops.experiments.gates import GateContext, GateResult
from recops.experiments.routing import CONTROL, TREATMENT
from recops.operator.conditions import Event, set_condition
from recops.operator.manifests import router as manifests
from recops.operator.manifests.common import Manifest, Owner
from recops.operator.naming import short_hash
from recops.operator.settings import OperatorSettings

RESUME_ANNOTATION = "recops.dev/resume"
PROGRESSING, COMPLETED = "Progressing", "Completed"

_EVENTS: Mapping[rollout.Decision, tuple[str, str]] = {
    rollout.Decision.START: ("Normal", "Started"),
    rollout.Decision.ADVANCE: ("Normal", "StepAdvanced"),
    rollout.Decision.PROMOTE: ("Normal", "Promoted"),
    rollout.Decision.ROLLBACK: ("Warning", "RolledBack"),
    rollout.Decision.PAUSE: ("Warning", "Paused"),
    rollout.Decision.RESUME: ("Normal", "Resumed"),
    rollout.Decision.FAIL: ("Warning", "Failed"),
}


@dataclass(frozen=True)
class ExperimentObservation:
    """Everything :func:`prepare` and :func:`plan` look at."""

    owner: Owner
    generation: int
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    now: datetime
    annotations: Mapping[str, str]
    control: Mapping[str, Any] | None = None
    """The control RecModel (``None``: it does not exist)."""
    treatment: Mapping[str, Any] | None = None
    treatment_deployment: Mapping[str, Any] | None = None
    treatment_pods: Sequence[Mapping[str, Any]] = ()
    servicemonitors: bool = False


@dataclass(frozen=True)
class Prepared:
    """The validated spec and the machine's state before this reconcile's look."""

    spec: RecExperimentSpec | None
    state: rollout.RolloutState | None
    problem: str | None = None
    """Why there is no state to run: an invalid spec, a model not Ready yet, a corrupt status."""
    failed: bool = False
    """Whether ``problem`` ends the experiment (Failed) rather than keeping it Pending."""
    look_due: bool = False


@dataclass(frozen=True)
class ExperimentPlan:
    """What the handler does: apply the router objects, write the status, post the events."""

    status: RecExperimentStatus
    apply: tuple[Manifest, ...] = ()
    events: tuple[Event, ...] = ()


def _model_endpoint(model: Mapping[str, Any] | None) -> str | None:
    status = (model or {}).get("status") or {}
    return status.get("endpoint") if status.get("phase") == "Ready" else None


def _serving_endpoint(model: Mapping[str, Any] | None) -> str | None:
    """The model's Service while it serves: Ready, or Deploying again after it was (its Triton pods restarting
    or rolling). The Service's name does not change meanwhile, so the router keeps it: routing the arm's users
    elsewhere would mix another model's answers into the arm."""
    status = (model or {}).get("status") or {}
    return status.get("endpoint") if status.get("phase") in ("Ready", "Deploying") else None


def _unavailable(observation: ExperimentObservation) -> str | None:
    """Why the step must hold now: an arm's model serves but is not Ready (no look, weights unchanged)."""
    for role, model in ((CONTROL, observation.control), (TREATMENT, observation.treatment)):
        status = (model or {}).get("status") or {}
        if status.get("phase") == "Deploying" and status.get("endpoint"):
            name = (model or {}).get("metadata", {}).get("name", "?")
            return f"holding: the {role} RecModel {name!r} is not Ready ({status.get('message') or 'Deploying'})"
    return None


def _waiting_for(spec: RecExperimentSpec, observation: ExperimentObservation) -> str | None:
    for role, ref, model in ((CONTROL, spec.control, observation.control),
                             (TREATMENT, spec.treatment, observation.treatment)):
        if model is None:
            return f"waiting for the {role} RecModel {ref.model!r}: it does not exist"
        if _model_endpoint(model) is None:
            phase = ((model.get("status") or {}).get("phase")) or "Pending"
            return f"waiting for the {role} RecModel {ref.model!r} to be Ready (it is {phase})"
    return None


def prepare(observation: ExperimentObservation) -> Prepared:
    """Validate the spec, restore (or start) the step machine and say whether a look is due."""
    owner = observation.owner
    try:
        spec = parse_recexperiment_spec(dict(observation.spec), source=f"RecExperiment {owner.namespace}/{owner.name}")
    except SpecError as error:
        return Prepared(None, None, str(error), failed=True)
    saved = (observation.status or {}).get("rollout")
    now = observation.now.timestamp()
    if saved is None:
        waiting = _waiting_for(spec, observation)
        if waiting:
            return Prepared(spec, None, waiting)
        return Prepared(spec, rollout.start(spec, now))
    try:
        state = rollout.RolloutState.from_status(saved)
    except ValueError as error:
        return Prepared(spec, None, f"status.rollout is unreadable ({error}); delete and re-create the experiment",
                        failed=True)
    if state.step >= len(spec.steps) and not state.terminal:
        state = rollout.fail(state, now, f"the spec has {len(spec.steps)} steps but the experiment is at step "
                                         f"{state.step + 1}", reason=rollout.Reason.SPEC_CHANGED)
    resume = observation.annotations.get(RESUME_ANNOTATION)
    if resume and resume != (observation.status or {}).get("resumed"):
        state = rollout.resume(state, now)
    due = rollout.next_look_at(spec, state)
    return Prepared(spec, state, look_due=due is not None and due <= now and _treatment_problem(observation) is None
                    and _unavailable(observation) is None)


def look_context(prepared: Prepared, observation: ExperimentObservation, settings: OperatorSettings) -> GateContext:
    """Where the gates look in this reconcile (only when ``prepared.look_due``); the SRM gate learns how
    many routers count users."""
    assert prepared.spec is not None and prepared.state is not None
    return rollout.gate_context(prepared.spec, prepared.state, observation.owner.name, observation.now.timestamp(),
                                treatment_arm=TREATMENT, control_arm=CONTROL, routers=settings.router_replicas)


def _treatment_problem(observation: ExperimentObservation) -> str | None:
    for pod in observation.treatment_pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or ():
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") == "CrashLoopBackOff":
                name = pod.get("metadata", {}).get("name", "?")
                return f"the treatment's Triton pod {name} is crash-looping ({container.get('name')})"
    deployment = observation.treatment_deployment or {}
    for condition in (deployment.get("status") or {}).get("conditions") or ():
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return f"the treatment's Deployment {deployment['metadata']['name']} exceeded its progress deadline"
    if ((observation.treatment or {}).get("status") or {}).get("phase") == "Failed":
        return "the treatment RecModel is Failed"
    return None


def plan(
    observation: ExperimentObservation,
    settings: OperatorSettings,
    results: Sequence[GateResult] | None = None,
    prepared: Prepared | None = None,
) -> ExperimentPlan:
    """The next step for one RecExperiment (pure). ``results``: the gates' results when a look was due."""
    prepared = prepared or prepare(observation)
    owner = observation.owner
    now = observation.now.timestamp()
    status = RecExperimentStatus.model_validate(dict(observation.status or {}))
    status.observed_generation = observation.generation
    if prepared.state is None or prepared.spec is None:
        status.phase = "Failed" if prepared.failed else "Pending"
        status.message = prepared.problem
        status.conditions = set_condition(status.conditions or [], PROGRESSING, "False",
                                          "InvalidSpec" if prepared.failed else "WaitingForModels",
                                          prepared.problem or "", observation.now, observation.generation)
        changed = (observation.status or {}).get("message") != prepared.problem
        events = (Event("Warning" if prepared.failed else "Normal",
                        "InvalidSpec" if prepared.failed else "Waiting", prepared.problem or ""),) if changed else ()
        return ExperimentPlan(status, (), events)

    spec, state = prepared.spec, prepared.state
    before = rollout.treatment_weight_bp(spec, state)
    problem = _treatment_problem(observation)
    if problem is not None:
        state = rollout.roll_back(state, now, problem)
    elif results is not None:
        state = rollout.observe(spec, state, results, now)
    weight = rollout.treatment_weight_bp(spec, state)
    if weight != before and not state.terminal:
        # The new step's window opens once routers serve the new weights (ConfigMap sync, reload, scrapes).
        state = rollout.weights_applied(state, now + settings.router_settle_seconds)

    endpoints = {TREATMENT: _serving_endpoint(observation.treatment) or "",
                 CONTROL: _serving_endpoint(observation.control)}
    if not endpoints[CONTROL]:
        # The control is what users fall back on; without it there is nothing safe to route to.
        state = rollout.fail(state, now, f"the control RecModel {spec.control.model!r} is not serving")
        weight = rollout.treatment_weight_bp(spec, state)
    objects: tuple[Manifest, ...] = ()
    if endpoints[CONTROL]:
        endpoints[TREATMENT] = endpoints[TREATMENT] or endpoints[CONTROL]  # a gone treatment gets no users (weight 0)
        configmap = manifests.router_configmap(owner, spec, weight, endpoints)
        status.router_config_hash = short_hash(configmap["data"])
        objects = (configmap, manifests.router_deployment(owner, settings), manifests.router_service(owner))
        if observation.servicemonitors:
            objects += (manifests.router_servicemonitor(owner),)

    status.phase = str(state.phase)  # type: ignore[assignment]
    status.current_step = state.step
    status.weight = weight / 100
    status.router = manifests.router_address(owner)
    status.gates = {g.gate: GateStatus(verdict=str(g.verdict), value=g.value, message=g.message) for g in state.gates}
    status.winner = {rollout.Phase.PROMOTED: spec.treatment.model,
                     rollout.Phase.ROLLED_BACK: spec.control.model}.get(state.phase)
    status.message = state.message
    holding = None if state.terminal else _unavailable(observation)
    if holding:
        status.message = holding
    status.rollout = state.to_status()
    if observation.annotations.get(RESUME_ANNOTATION):
        status.resumed = observation.annotations[RESUME_ANNOTATION]
    progressing = "False" if state.terminal or state.phase is rollout.Phase.PAUSED else "True"
    status.conditions = set_condition(status.conditions or [], PROGRESSING, progressing, str(state.reason),
                                      state.message, observation.now, observation.generation)
    if state.terminal:
        done = "True" if state.phase is rollout.Phase.PROMOTED else "False"
        status.conditions = set_condition(status.conditions, COMPLETED, done, str(state.reason), state.message,
                                          observation.now, observation.generation)
    return ExperimentPlan(status, objects, _transition_events(observation, state, spec))


def _transition_events(observation: ExperimentObservation, state: rollout.RolloutState,
                       spec: RecExperimentSpec) -> tuple[Event, ...]:
    saved = ((observation.status or {}).get("rollout") or {}).get("history") or []
    seen = len(saved)
    new = state.history[seen:] if seen <= len(state.history) else state.history[-1:]
    events = []
    for entry in new:
        kind, reason = _EVENTS[entry.decision]
        message = f"step {entry.step + 1} of {len(spec.steps)}, treatment at {entry.weight_bp / 100:g}%"
        if entry is state.history[-1] and state.message:
            message += f": {state.message}"
        events.append(Event(kind, reason, message))  # type: ignore[arg-type]
    return tuple(events)
