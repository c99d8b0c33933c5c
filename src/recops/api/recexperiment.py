"""The RecExperiment spec: two RecModels, a ramp of traffic steps and the gates that judge each look.

Like :mod:`recops.api.recmodel` this is the single source of the future CRD schema, so every
constraint a manifest can break is declared here and reported by its YAML path
(``spec.steps[1].weight: ...``).

Conventions
    * Durations (``steps[].pause``, ``analysis.interval``) are strings of whole hours, minutes
      and seconds in that order, Go/Prometheus style: ``30s``, ``5m``, ``1h30m``. One spelling
      for every duration in the resource; :func:`parse_duration` turns them into seconds.
    * ``steps[].weight`` is the percentage (0–100] of users sent to the treatment, with a
      resolution of 0.01% (one assignment bucket, see :mod:`recops.serving.assignment`).
    * Lifts (``minLift``) are relative: ``0.02`` means treatment ≥ control × 1.02.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, ConfigDict, Field, field_validator, model_validator

from recops.api.common import SpecModel, cel_rules
from recops.serving.assignment import Salt

_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
DURATION_PATTERN = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$"


def parse_duration(text: str) -> int:
    """Seconds in a duration like ``30s``, ``5m``, ``2h`` or ``1h30m``.

    Raises:
        ValueError: for anything else, including ``""``, fractions, days and ``0s``.
    """
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None or not any(match.groups()):
        raise ValueError(f"must be a duration such as 30s, 5m or 1h30m (hours, minutes, seconds), got {text!r}")
    hours, minutes, seconds = (int(group or 0) for group in match.groups())
    total = 3600 * hours + 60 * minutes + seconds
    if total <= 0:
        raise ValueError(f"must be a positive duration, got {text!r}")
    return total


def _check_duration(text: str) -> str:
    parse_duration(text)
    return text


# A string in the manifest (so it round-trips unchanged); the pattern goes into the CRD schema.
Duration = Annotated[
    str,
    Field(min_length=2, max_length=32, json_schema_extra={
        "pattern": DURATION_PATTERN,
        **cel_rules(("duration(self) > duration('0s')", "must be a positive duration such as 30s, 5m or 1h30m", None)),
    }),
    AfterValidator(_check_duration),
]


def _matching(pattern: str, what: str) -> AfterValidator:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.match(value):
            raise ValueError(f"must be {what}, got {value!r}")
        return value

    return AfterValidator(check)


# RecModel names become Deployment and Service names, so they must be DNS-1123 labels. The pattern is
# declared for the CRD schema and checked by the validator, whose message says what is allowed.
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
ResourceName = Annotated[
    str,
    Field(min_length=1, max_length=63, json_schema_extra={"pattern": _DNS_LABEL}),
    _matching(_DNS_LABEL, "a DNS-1123 label (lowercase letters, digits and '-', starting and ending alphanumeric)"),
]
# Gate names key the status; same alphabet as labels, camelCase allowed (gate types are camelCase).
_GATE_NAME = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
GateName = Annotated[
    str,
    Field(min_length=1, max_length=63, json_schema_extra={"pattern": _GATE_NAME}),
    _matching(_GATE_NAME, "letters, digits, '-', '_' and '.', starting and ending with a letter or digit"),
]

StrictFloat = Annotated[float, Field(strict=True)]
StrictInt = Annotated[int, Field(strict=True)]

PROMQL_PLACEHOLDERS = ("experiment", "arm", "window")
_PLACEHOLDER = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")

ArmRole = Literal["treatment", "control"]


class ModelRef(SpecModel):
    """A RecModel in the experiment's namespace."""

    model: ResourceName = Field(description="Name of a RecModel in the same namespace.")


class AssignmentSpec(SpecModel):
    """How users are split between the arms (sticky hash of salt and user id)."""

    salt: Salt = Field(description="Hash salt. A new salt reshuffles every user: give each experiment its own.")


class StepSpec(SpecModel):
    """One rung of the ramp: this share of users sees the treatment for at least ``pause``."""

    weight: StrictFloat = Field(gt=0, le=100, description="Percent of users sent to the treatment, (0, 100].")
    pause: Duration = Field(description="Minimum time at this weight before the step may advance, e.g. 10m.")

    @field_validator("weight")
    @classmethod
    def _whole_buckets(cls, weight: float) -> float:
        # One assignment bucket is 0.01%: finer weights cannot be realised.
        if not math.isclose(weight * 100, round(weight * 100), abs_tol=1e-6):
            raise ValueError(f"weight has a resolution of 0.01 percent, got {weight}")
        return weight

    @property
    def weight_bp(self) -> int:
        """The treatment's weight in basis points (assignment buckets)."""
        return round(self.weight * 100)

    @property
    def pause_seconds(self) -> int:
        """``pause`` in seconds."""
        return parse_duration(self.pause)


# --------------------------------------------------------------------------- gates


class _GateBase(SpecModel):
    name: GateName | None = Field(None, description="Key of this gate in the status; defaults to its type.")

    @property
    def gate_name(self) -> str:
        """The gate's name in results and status: ``name`` or else ``type``."""
        return self.name or self.type  # type: ignore[attr-defined]


class _LiftGate(_GateBase):
    """Treatment against control with an always-valid (mSPRT) test: safe to check at every look."""

    min_lift: StrictFloat = Field(
        0.0,
        gt=-1,
        le=10,
        description=(
            "Relative lift the treatment must be shown to exceed to pass (the always-valid interval's lower "
            "bound is above it). 0: significantly better; -0.01: at most 1% worse (non-inferiority)."
        ),
    )
    alpha: StrictFloat = Field(0.05, gt=0, le=0.5, description="Error rate over all looks together.")
    fail_on: Literal["harm", "belowMinLift"] = Field(
        "harm",
        description=(
            "harm: fail when the treatment is significantly worse than control (mSPRT); belowMinLift: fail when "
            "the lift is shown to be below minLift (the interval's upper bound is below it), the choice for a "
            "non-inferiority margin (minLift < 0), where a small significant loss should still pass."
        ),
    )


class CtrLiftGate(_LiftGate):
    """Click-through rate (clicks / impressions) of treatment against control."""

    type: Literal["ctrLift"]
    min_samples: StrictInt = Field(1000, ge=1, description="Impressions each arm needs before any verdict.")


class LikeRateLiftGate(_LiftGate):
    """Like rate (likes / impressions) of treatment against control."""

    type: Literal["likeRateLift"]
    min_samples: StrictInt = Field(1000, ge=1, description="Impressions each arm needs before any verdict.")


class GmvPerUserLiftGate(_LiftGate):
    """Purchase value per assigned user of treatment against control."""

    type: Literal["gmvPerUserLift"]
    min_samples: StrictInt = Field(1000, ge=2, description="Distinct users each arm needs before any verdict.")


class SampleRatioGate(_GateBase):
    """Distinct users per arm against the current step's weights (anytime-valid test); fails on a mismatch."""

    type: Literal["sampleRatio"]
    alpha: StrictFloat = Field(
        0.001,
        gt=0,
        le=0.1,
        description="Chance of ever failing a healthy split, over all looks at a step. Strict by default: "
        "a false alarm stops a healthy rollout.",
    )


class LatencyP99Gate(_GateBase):
    """p99 of the router's request duration for one arm, from its histogram."""

    type: Literal["latencyP99"]
    arm: ArmRole = "treatment"
    max_milliseconds: StrictFloat = Field(gt=0, le=600_000, description="Fail when the p99 is above this.")
    min_requests: StrictInt = Field(100, ge=1, description="Requests the arm needs in the window before a verdict.")


class ErrorRateGate(_GateBase):
    """Share of the arm's requests that failed upstream (Triton error or timeout)."""

    type: Literal["errorRate"]
    arm: ArmRole = "treatment"
    max_ratio: StrictFloat = Field(ge=0, le=1, description="Fail when errors / requests is above this.")
    min_requests: StrictInt = Field(100, ge=1, description="Requests the arm needs in the window before a verdict.")


class PromqlGate(_GateBase):
    """Any PromQL query returning one number, compared with a threshold.

    ``$experiment``, ``$arm`` and ``$window`` in the query are replaced by the escaped
    experiment name, the escaped arm name (of ``arm``) and the step's window (``123s``); write
    them inside quotes where they are label values: ``{experiment="$experiment"}``.
    """

    type: Literal["promql"]
    query: str = Field(min_length=1, max_length=4096)
    arm: ArmRole = "treatment"
    op: Literal["lt", "le", "gt", "ge", "eq", "ne"] = Field(
        description="Passes when `value <op> threshold` holds (lt <, le <=, gt >, ge >=, eq ==, ne !=)."
    )
    threshold: StrictFloat

    @field_validator("query")
    @classmethod
    def _known_placeholders(cls, query: str) -> str:
        # PromQL itself never uses '$', so any other $name is a typo that would reach Prometheus verbatim.
        unknown = sorted({name for name in _PLACEHOLDER.findall(query) if name not in PROMQL_PLACEHOLDERS})
        if unknown:
            known = ", ".join(f"${name}" for name in PROMQL_PLACEHOLDERS)
            raise ValueError(f"unknown placeholder(s) {', '.join('$' + n for n in unknown)}; known: {known}")
        return query


Gate = Annotated[
    CtrLiftGate | LikeRateLiftGate | GmvPerUserLiftGate | SampleRatioGate | LatencyP99Gate | ErrorRateGate | PromqlGate,
    Field(discriminator="type"),
]
GATE_TYPES = ("ctrLift", "likeRateLift", "gmvPerUserLift", "sampleRatio", "latencyP99", "errorRate", "promql")


# --------------------------------------------------------------------------- the rest


class PrometheusSpec(SpecModel):
    """The Prometheus that scrapes the router."""

    url: str = Field(min_length=1, max_length=2048, description="Base URL, e.g. http://prometheus.monitoring:9090.")
    timeout_seconds: StrictFloat = Field(10.0, gt=0, le=300, description="Per query.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"must be an http:// or https:// URL with a host, got {url!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"must not have a query or fragment, got {url!r}")
        return url


class AnalysisSpec(SpecModel):
    """How often the gates are read and how long an undecided or failing read may last."""

    interval: Duration = Field("1m", description="Time between two looks at the gates.")
    max_inconclusive_looks: StrictInt = Field(
        60,
        ge=1,
        le=100_000,
        description=(
            "Looks a step may stay Inconclusive after its pause has elapsed; then the experiment ends with "
            "onFailure (no evidence for the treatment keeps the control)."
        ),
    )
    max_consecutive_errors: StrictInt = Field(
        10,
        ge=1,
        le=100_000,
        description="Looks in a row with a gate in Error (e.g. Prometheus down) before the experiment pauses.",
    )

    @property
    def interval_seconds(self) -> int:
        """``interval`` in seconds."""
        return parse_duration(self.interval)


_PAUSE_RULE = (
    "!has(self.analysis) || !has(self.analysis.interval) || "
    "self.steps.all(s, duration(s.pause) >= duration(self.analysis.interval))",
    "every steps[].pause must be at least analysis.interval (a step would end before its first look)",
    ".steps",
)


class ExperimentPlanSpec(SpecModel):
    """How a treatment is tested against the control: steps, gates, Prometheus, analysis.

    A RecExperiment adds the two models and the assignment salt; ``RecModel.spec.retrain.experiment``
    is this alone (the operator fills in the models and a salt per retrained revision).
    """

    model_config = ConfigDict(json_schema_extra=cel_rules(_PAUSE_RULE))

    steps: list[StepSpec] = Field(min_length=1, max_length=20, json_schema_extra=cel_rules(
        ("self.map(s, s.weight).isSorted()", "weights must not decrease from one step to the next", None),
        # Weights do not decrease, so only the second-to-last step needs checking.
        ("size(self) < 2 || self[size(self) - 2].weight < 100.0",
         "only the last step may send all users (weight 100) to the treatment", None),
    ))
    gates: list[Gate] = Field(min_length=1, max_length=32, json_schema_extra=cel_rules(
        ("self.all(g, self.filter(h, (has(h.name) ? h.name : h.type) == (has(g.name) ? g.name : g.type)).size() == 1)",
         "gate names must be unique (set 'name' on repeated types)", None),
    ))
    prometheus: PrometheusSpec
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)
    on_success: Literal["promote"] = Field("promote", description="Treatment becomes the serving model.")
    on_failure: Literal["rollback"] = Field("rollback", description="All traffic back to control.")

    @field_validator("steps")
    @classmethod
    def _ramp(cls, steps: list[StepSpec]) -> list[StepSpec]:
        for index in range(1, len(steps)):
            if steps[index].weight < steps[index - 1].weight:
                raise ValueError(
                    f"weights must not decrease: steps[{index}].weight ({steps[index].weight:g}) is below "
                    f"steps[{index - 1}].weight ({steps[index - 1].weight:g})"
                )
        for index, step in enumerate(steps[:-1]):
            if step.weight == 100:
                raise ValueError(f"steps[{index}].weight is 100: only the last step may send all users to treatment")
        return steps

    @field_validator("gates")
    @classmethod
    def _unique_names(cls, gates: list[Gate]) -> list[Gate]:
        names = [gate.gate_name for gate in gates]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"gate names must be unique (set 'name' on repeated types); duplicated: {duplicates}")
        return gates

    @model_validator(mode="after")
    def _pauses_cover_a_look(self) -> ExperimentPlanSpec:
        interval = self.analysis.interval_seconds
        for index, step in enumerate(self.steps):
            if step.pause_seconds < interval:
                raise ValueError(
                    f"steps[{index}].pause ({step.pause}) is shorter than analysis.interval "
                    f"({self.analysis.interval}): the step would end before its first look"
                )
        return self


class RecExperimentSpec(ExperimentPlanSpec):
    """``spec`` of a RecExperiment."""

    model_config = ConfigDict(json_schema_extra=cel_rules(
        ("self.control.model != self.treatment.model", "treatment.model must differ from control.model",
         ".treatment.model"),
        _PAUSE_RULE,
    ))

    control: ModelRef
    treatment: ModelRef
    assignment: AssignmentSpec

    @model_validator(mode="after")
    def _two_models(self) -> RecExperimentSpec:
        if self.control.model == self.treatment.model:
            raise ValueError(f"treatment.model must differ from control.model (both {self.control.model!r})")
        return self
