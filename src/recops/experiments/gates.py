"""Experiment gates: verdicts on a RecExperiment's gates from the router's metrics in Prometheus.

Two layers, kept apart so the statistics can be tested without Prometheus:

* ``decide_*`` are pure functions from counts (or one measured value) and the gate's spec
  to a :class:`GateResult`;
* :func:`evaluate_gate` / :func:`evaluate_gates` fetch those counts with the PromQL of
  :mod:`recops.experiments.queries` and call them.

Verdicts (Argo Rollouts' four analysis outcomes):

``Successful``   the gate's condition is shown to hold.
``Failed``       it is shown not to hold (the treatment is worse, the split is broken, p99 too high...).
``Inconclusive`` not enough data to say either (below the minimum sample, no traffic, NaN).
``Error``        the metric could not be read (Prometheus down, query refused, inconsistent data).
                 Never Successful: a gate that cannot see does not pass.

How the step machine (:mod:`recops.experiments.rollout`, which has the full rules) uses them:
at every look it combines the gates. Failed ends the experiment with ``onFailure`` (rollback).
Error holds the step and counts towards ``analysis.maxConsecutiveErrors`` (then the experiment
pauses for a human; an outage never rolls back and never promotes). Inconclusive holds the step
and never promotes; past the step's pause it counts towards ``analysis.maxInconclusiveLooks``
(then ``onFailure``: no evidence for the treatment keeps the control). Once the step's pause has
elapsed, an intermediate step advances when every *guardrail* gate (sample ratio, latency, error
rate, promql) is Successful — the lift gates may still be Inconclusive there, since more traffic
is what they need — and the last step promotes (``onSuccess``) when every gate is Successful.

Windows: the lift gates (CTR, like rate, GMV/user) read counts since the experiment started
(``GateContext.window``), because the mSPRT's guarantee over repeated looks is for data that
only accumulates. The sample-ratio, latency, error-rate and promql gates read the current step
(``GateContext.step_window``): the SRM check compares against *this* step's weights, and
latency/errors should reflect the load at *this* weight. Pooling the lift data across steps
assumes the base rates do not drift in a way that correlates with the ramp (the treatment's
data lean towards later steps).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol

from recops.api.recexperiment import (
    CtrLiftGate,
    ErrorRateGate,
    Gate,
    GmvPerUserLiftGate,
    LatencyP99Gate,
    LikeRateLiftGate,
    PromqlGate,
    SampleRatioGate,
    parse_duration,
)
from recops.experiments import queries
from recops.experiments.prometheus import PrometheusError, Sample
from recops.experiments.statistics import (
    DEFAULT_TAU_SQUARED,
    msprt_confidence_interval,
    msprt_p_value,
    normal_msprt_interval,
    normal_msprt_p_value,
    ratio_metric_lift,
    sample_ratio_mismatch,
)
from recops.serving.assignment import ArmWeights

# Mixing scale of the mSPRT for GMV per user, relative to the pooled mean: a currency-free
# choice that puts the test's power on lifts of about 10%; any value keeps the test valid.
GMV_TAU_RELATIVE = 0.1

# Below 5 expected users in an arm the SRM gate calls the split neither healthy nor broken.
SRM_MIN_EXPECTED = 5.0

# Feedback posted late for an earlier slate, or increase() across a router restart (see queries),
# can leave successes a hair above trials; beyond this slack the metrics contradict each other and
# the gate reports Error instead of guessing.
_COUNT_SLACK = 0.01


class Verdict(StrEnum):
    """Outcome of one gate at one look (and of all gates together, see :func:`overall`)."""

    SUCCESSFUL = "Successful"
    FAILED = "Failed"
    INCONCLUSIVE = "Inconclusive"
    ERROR = "Error"


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict at one look.

    ``value`` is the gate's headline number (relative lift, SRM p-value, p99 in ms, error
    ratio, the promql value); ``interval`` the always-valid interval of a lift, relative to
    control; ``details`` the counts and statistics behind the verdict (JSON-friendly).
    """

    gate: str
    verdict: Verdict
    value: float | None = None
    interval: tuple[float, float] | None = None
    message: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RateCounts:
    """Events of one kind (clicks, likes) over impressions, for one arm."""

    successes: int
    trials: int


@dataclass(frozen=True)
class GmvCounts:
    """Purchase value of one arm: distinct users, Σ value and Σ value² over its purchases."""

    users: int
    value_sum: float
    value_sumsq: float


class GateDataError(ValueError):
    """Metrics that contradict each other or the contract (e.g. clicks > impressions): verdict Error."""


class QueryClient(Protocol):
    """What the gates need from a Prometheus client (:class:`~recops.experiments.prometheus.PrometheusClient`)."""

    def query(self, promql: str, *, time: Any = None) -> list[Sample]: ...


@dataclass(frozen=True)
class GateContext:
    """Where and when the gates look.

    Args:
        experiment: the ``experiment`` label value the router puts on its metrics.
        arms: the current step's arms and weights (basis points), treatment first, control last
            (as :class:`~recops.serving.assignment.ArmWeights`; a ``{name: bp}`` mapping is accepted).
        window: time since the experiment started (seconds or a duration like ``"2h"``): the lift gates.
        step_window: time since the current step started: SRM, latency, error rate, promql
            (defaults to ``window``).
        time: evaluation time (unix seconds) for reproducible reads; ``None`` is Prometheus' now.
        routers: router replicas serving the experiment. Each router counts a user the first time
            *it* sees them, so behind a Service one user is counted up to this many times.
    """

    experiment: str
    arms: ArmWeights
    window: float
    step_window: float | None = None
    time: float | None = None
    routers: int = 1

    def __post_init__(self) -> None:
        arms = self.arms if isinstance(self.arms, ArmWeights) else ArmWeights(arms=self.arms)
        if len(arms.arms) < 2:
            raise ValueError("a gate context needs at least two arms (a treatment and the control, last)")
        if not self.experiment:
            raise ValueError("experiment must not be empty")
        if isinstance(self.routers, bool) or not isinstance(self.routers, int) or self.routers < 1:
            raise ValueError(f"routers must be a positive integer, got {self.routers!r}")
        # frozen: normalise through object.__setattr__ once, at construction.
        object.__setattr__(self, "arms", arms)
        object.__setattr__(self, "window", _seconds(self.window, "window"))
        step = self.window if self.step_window is None else _seconds(self.step_window, "step_window")
        object.__setattr__(self, "step_window", step)

    @property
    def treatment(self) -> str:
        """Name of the treatment arm (the first)."""
        return self.arms.names[0]

    @property
    def control(self) -> str:
        """Name of the control arm (the last)."""
        return self.arms.control

    def arm_name(self, role: str) -> str:
        """The arm name for a gate's ``arm: treatment|control``."""
        return self.treatment if role == "treatment" else self.control


def _seconds(value: float | str, name: str) -> float:
    if isinstance(value, str):
        try:
            return float(parse_duration(value))
        except ValueError as error:
            raise ValueError(f"{name} {error}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds or a duration like '5m', got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- pure decisions


def _relative_interval(low: float, high: float, base: float) -> tuple[float, float]:
    # Dividing an interval of the difference by the observed control level ignores the control's own
    # uncertainty; at the sample sizes where gates decide, that is a second-order effect.
    return low / base, high / base


def _lift_verdict(
    gate: CtrLiftGate | LikeRateLiftGate | GmvPerUserLiftGate,
    significantly_worse: bool,
    relative: float,
    relative_interval: tuple[float, float],
) -> tuple[Verdict, str]:
    low, high = relative_interval
    if gate.fail_on == "harm" and significantly_worse:
        return Verdict.FAILED, f"treatment is significantly worse than control (lift {relative:+.2%})"
    if gate.fail_on == "belowMinLift" and high < gate.min_lift:
        return Verdict.FAILED, f"lift is below the required {gate.min_lift:+.2%} (interval up to {high:+.2%})"
    if low > gate.min_lift:
        return Verdict.SUCCESSFUL, f"lift {relative:+.2%} is above {gate.min_lift:+.2%} (interval from {low:+.2%})"
    return Verdict.INCONCLUSIVE, (
        f"lift {relative:+.2%}, interval [{low:+.2%}, {high:+.2%}] does not decide against {gate.min_lift:+.2%}"
    )


def decide_lift(
    control: RateCounts,
    treatment: RateCounts,
    gate: CtrLiftGate | LikeRateLiftGate,
    *,
    tau_squared: float = DEFAULT_TAU_SQUARED,
) -> GateResult:
    """Verdict of a rate-lift gate (CTR, like rate) from cumulative counts of both arms.

    Always-valid at every look (Johari et al. 2017's mixture SPRT, via
    :mod:`recops.experiments.statistics`):

    * below ``minSamples`` trials in either arm: Inconclusive — never Successful on little data;
    * ``failOn: harm`` and the mSPRT p-value ≤ alpha with treatment below control: Failed;
    * ``failOn: belowMinLift`` and the interval's upper bound below ``minLift``: Failed;
    * the always-valid ``1 - alpha`` interval's lower bound above ``minLift``: Successful;
    * otherwise Inconclusive.

    Lifts are relative to the control rate. Under equal rates the chance that *any* look
    of a run is Successful with ``minLift >= 0`` is at most ``alpha``.
    """
    name = gate.gate_name
    cs, cn, ts, tn = control.successes, control.trials, treatment.successes, treatment.trials
    details: dict[str, Any] = {
        "control": {"successes": cs, "trials": cn},
        "treatment": {"successes": ts, "trials": tn},
        "minSamples": gate.min_samples,
        "alpha": gate.alpha,
    }
    if cn < gate.min_samples or tn < gate.min_samples:
        return GateResult(
            name,
            Verdict.INCONCLUSIVE,
            message=f"needs {gate.min_samples} impressions per arm, has control {cn}, treatment {tn}",
            details=details,
        )
    pc, pt = cs / cn, ts / tn
    p_value = msprt_p_value(cs, cn, ts, tn, tau_squared=tau_squared)
    low, high = msprt_confidence_interval(cs, cn, ts, tn, alpha=gate.alpha, tau_squared=tau_squared)
    details.update(controlRate=pc, treatmentRate=pt, pValue=p_value, differenceInterval=[low, high])
    if pc == 0:
        return GateResult(
            name, Verdict.INCONCLUSIVE, message="control rate is 0: relative lift undefined", details=details
        )
    relative = pt / pc - 1.0
    interval = _relative_interval(low, high, pc)
    verdict, message = _lift_verdict(gate, p_value <= gate.alpha and pt < pc, relative, interval)
    return GateResult(name, verdict, relative, interval, message, details)


def gmv_per_user_variance(value_sumsq: float, users: int) -> float:
    """Variance of one user's total purchase value, assuming compound-Poisson purchases.

    Model: a user makes ``N ~ Poisson(λ)`` purchases of values ``v`` drawn independently
    of ``N`` with ``E[v] = μ``, ``E[v²] = m₂``. The user's total ``Y = Σ v`` then has
    ``E[Y] = λμ`` and ``Var(Y) = λ·m₂`` (a compound Poisson variance is the rate times the
    *raw* second moment of a jump; no mean is subtracted). The router's counters give
    ``Σ v²`` over all purchases, whose expectation is ``n·λ·m₂``, so
    ``Var(Y) ≈ Σv² / n`` — here with ``n - 1`` to match the unbiased variance Welch uses.

    Why not ``Σv²/n − mean²``: that is the variance only if each user bought at most once;
    ``Σv²`` over purchases lacks the cross terms ``2·v_i·v_j`` of users with several
    purchases, so it is not ``Σ_users Y²``. What the model misses: buyers more
    over-dispersed than Poisson (a few heavy buyers) make the true variance larger, and
    the gate over-confident; per-user totals would remove the assumption but need per-user
    state the router does not keep.
    """
    if users < 2:
        raise ValueError(f"users must be at least 2, got {users}")
    return value_sumsq / (users - 1)


def decide_gmv(control: GmvCounts, treatment: GmvCounts, gate: GmvPerUserLiftGate) -> GateResult:
    """Verdict of the GMV-per-user gate: mean = Σ value / distinct users, variance per :func:`gmv_per_user_variance`.

    The decision uses the normal mSPRT (always valid over looks) on the difference of means
    with the Welch variance ``Var_c/n_c + Var_t/n_t`` and a mixing scale of
    ``GMV_TAU_RELATIVE`` × the pooled mean; the fixed-horizon Welch result
    (:func:`~recops.experiments.statistics.ratio_metric_lift`) is reported in ``details``.
    Same verdict rules as :func:`decide_lift`, with ``minSamples`` counted in users.
    """
    name = gate.gate_name
    details: dict[str, Any] = {
        "control": {"users": control.users, "valueSum": control.value_sum, "valueSumSquares": control.value_sumsq},
        "treatment": {
            "users": treatment.users,
            "valueSum": treatment.value_sum,
            "valueSumSquares": treatment.value_sumsq,
        },
        "minSamples": gate.min_samples,
        "alpha": gate.alpha,
    }
    if control.users < gate.min_samples or treatment.users < gate.min_samples:
        return GateResult(
            name,
            Verdict.INCONCLUSIVE,
            message=f"needs {gate.min_samples} users per arm, has control {control.users}, treatment {treatment.users}",
            details=details,
        )
    for arm, counts in (("control", control), ("treatment", treatment)):
        if counts.value_sum < 0 or counts.value_sumsq < 0:
            raise GateDataError(f"{arm} purchase value sums must be non-negative, got {counts}")
    nc, nt = control.users, treatment.users
    mean_c, mean_t = control.value_sum / nc, treatment.value_sum / nt
    pooled = (control.value_sum + treatment.value_sum) / (nc + nt)
    if pooled == 0:
        return GateResult(name, Verdict.INCONCLUSIVE, message="no purchases in either arm yet", details=details)
    var_c, var_t = gmv_per_user_variance(control.value_sumsq, nc), gmv_per_user_variance(treatment.value_sumsq, nt)
    variance = var_c / nc + var_t / nt
    difference = mean_t - mean_c
    tau_squared = (GMV_TAU_RELATIVE * pooled) ** 2
    p_value = normal_msprt_p_value(difference, variance, tau_squared)
    low, high = normal_msprt_interval(difference, variance, gate.alpha, tau_squared)
    # Welch on the per-user Σ Y² the model implies, Σv² + (Σv)²/n: its sample variance is exactly Σv²/(n - 1).
    welch = ratio_metric_lift(
        control.value_sum,
        control.value_sumsq + control.value_sum**2 / nc,
        nc,
        treatment.value_sum,
        treatment.value_sumsq + treatment.value_sum**2 / nt,
        nt,
        alpha=gate.alpha,
    )
    details.update(
        controlMean=mean_c,
        treatmentMean=mean_t,
        pValue=p_value,
        differenceInterval=[low, high],
        welchPValue=welch.p_value,
        welchInterval=[welch.ci_low, welch.ci_high],
    )
    if mean_c == 0:
        return GateResult(
            name, Verdict.INCONCLUSIVE, message="control GMV is 0: relative lift undefined", details=details
        )
    relative = mean_t / mean_c - 1.0
    interval = _relative_interval(low, high, mean_c)
    verdict, message = _lift_verdict(gate, p_value <= gate.alpha and difference < 0, relative, interval)
    return GateResult(name, verdict, relative, interval, message, details)


def decide_sample_ratio(
    users: Mapping[str, int], arms: ArmWeights, gate: SampleRatioGate, routers: int = 1
) -> GateResult:
    """Verdict of the SRM gate: distinct users per arm against the step's weights (sequential test).

    Each of ``routers`` replicas counts a user once, so the counts are divided by ``routers``
    before the test: a user seen by every router would otherwise weigh as several independent
    users and make the test too eager (the split itself is unaffected, each router's new users
    split by the weights). Dividing is conservative: it is exact when every user reaches every
    router, and under-states the evidence otherwise.

    Failed when the anytime-valid p-value is at most alpha, or when any user landed in an arm
    that has weight 0 or is not configured at all (an assignment bug, whatever the counts).
    Inconclusive with no users, or while an arm expects fewer than 5 users (too few to call a
    split healthy). ``value`` is the p-value.
    """
    name = gate.gate_name
    names = arms.names
    stray = {arm: count for arm, count in users.items() if arm not in names and count > 0}
    counts = [int(users.get(arm, 0)) for arm in names]
    weights = [arm.weight_bp for arm in arms.arms]
    details: dict[str, Any] = {
        "users": dict(zip(names, counts, strict=True)),
        "weightsBp": dict(zip(names, weights, strict=True)),
        "routers": routers,
    }
    if stray:
        details["unconfiguredArms"] = stray
        return GateResult(
            name, Verdict.FAILED, 0.0, message=f"users in arms that are not configured: {stray}", details=details
        )
    if sum(counts) == 0:
        return GateResult(name, Verdict.INCONCLUSIVE, message="no users in the window yet", details=details)
    result = sample_ratio_mismatch([count / routers for count in counts], weights, alpha=gate.alpha)
    details.update(
        expected=dict(zip(names, result.expected_counts, strict=True)),
        logBayesFactor=result.log_bayes_factor,
        pValue=result.p_value,
    )
    if math.isinf(result.log_bayes_factor):
        return GateResult(
            name, Verdict.FAILED, result.p_value, message="users in an arm with weight 0", details=details
        )
    smallest = min(e for e, w in zip(result.expected_counts, weights, strict=True) if w > 0)
    if smallest < SRM_MIN_EXPECTED:
        return GateResult(
            name,
            Verdict.INCONCLUSIVE,
            result.p_value,
            message=f"too few users to judge the split (smallest expected {smallest:.1f} < 5)",
            details=details,
        )
    shares = ", ".join(f"{arm} {count / sum(counts):.2%}" for arm, count in zip(names, counts, strict=True))
    if result.mismatch:
        return GateResult(
            name,
            Verdict.FAILED,
            result.p_value,
            message=f"sample ratio mismatch (p={result.p_value:.2g} < {gate.alpha:g}): {shares}",
            details=details,
        )
    return GateResult(
        name,
        Verdict.SUCCESSFUL,
        result.p_value,
        message=f"split matches the weights (p={result.p_value:.2g}): {shares}",
        details=details,
    )


def decide_latency(p99_seconds: float, requests: float, gate: LatencyP99Gate) -> GateResult:
    """Verdict of the p99 gate: Failed above ``maxMilliseconds`` (an infinite p99 too).

    Inconclusive below ``minRequests`` in the window, or when the quantile is NaN (no
    traffic: histogram_quantile of empty buckets).
    """
    name = gate.gate_name
    details = {"requests": requests, "maxMilliseconds": gate.max_milliseconds}
    if math.isnan(requests) or requests < gate.min_requests:
        return GateResult(
            name,
            Verdict.INCONCLUSIVE,
            message=f"needs {gate.min_requests} requests, has {requests:.0f}",
            details=details,
        )
    if math.isnan(p99_seconds):
        return GateResult(name, Verdict.INCONCLUSIVE, message="p99 is NaN: no requests in the window", details=details)
    milliseconds = p99_seconds * 1000.0
    if milliseconds > gate.max_milliseconds:
        return GateResult(
            name,
            Verdict.FAILED,
            milliseconds,
            message=f"p99 {milliseconds:.1f} ms is above {gate.max_milliseconds:g} ms",
            details=details,
        )
    return GateResult(
        name,
        Verdict.SUCCESSFUL,
        milliseconds,
        message=f"p99 {milliseconds:.1f} ms is within {gate.max_milliseconds:g} ms",
        details=details,
    )


def decide_error_rate(errors: float, attempts: float, gate: ErrorRateGate) -> GateResult:
    """Verdict of the error-rate gate: Failed when ``errors / attempts > maxRatio``.

    Inconclusive below ``minRequests`` requests in the window.
    """
    name = gate.gate_name
    details = {"errors": errors, "requests": attempts, "maxRatio": gate.max_ratio}
    if attempts < gate.min_requests:
        return GateResult(
            name,
            Verdict.INCONCLUSIVE,
            message=f"needs {gate.min_requests} requests, has {attempts:.0f}",
            details=details,
        )
    ratio = errors / attempts
    if ratio > gate.max_ratio:
        return GateResult(
            name,
            Verdict.FAILED,
            ratio,
            message=f"error rate {ratio:.2%} is above {gate.max_ratio:.2%}",
            details=details,
        )
    return GateResult(
        name,
        Verdict.SUCCESSFUL,
        ratio,
        message=f"error rate {ratio:.2%} is within {gate.max_ratio:.2%}",
        details=details,
    )


_OPS: Mapping[str, tuple[Callable[[float, float], bool], str]] = {
    "lt": (operator.lt, "<"),
    "le": (operator.le, "<="),
    "gt": (operator.gt, ">"),
    "ge": (operator.ge, ">="),
    "eq": (operator.eq, "=="),
    "ne": (operator.ne, "!="),
}


def decide_promql(samples: Sequence[Sample], gate: PromqlGate) -> GateResult:
    """Verdict of a promql gate: Successful when ``value <op> threshold`` holds, else Failed.

    No series: Inconclusive (nothing measured yet). NaN: Inconclusive. More than one
    series: Error — the query must reduce to one number (wrap it in ``sum``/``max``).
    """
    name = gate.gate_name
    compare, symbol = _OPS[gate.op]
    if not samples:
        return GateResult(name, Verdict.INCONCLUSIVE, message="query returned no data")
    if len(samples) > 1:
        labels = [dict(s.labels) for s in samples[:3]]
        return GateResult(
            name,
            Verdict.ERROR,
            message=f"query returned {len(samples)} series (e.g. {labels}); it must return one number",
        )
    value = samples[0].value
    if math.isnan(value):
        return GateResult(name, Verdict.INCONCLUSIVE, value, message="query returned NaN")
    holds = compare(value, gate.threshold)
    verdict = Verdict.SUCCESSFUL if holds else Verdict.FAILED
    relation = symbol if holds else f"not {symbol}"
    return GateResult(
        name,
        verdict,
        value,
        message=f"{value:g} {relation} {gate.threshold:g}",
        details={"labels": dict(samples[0].labels)},
    )


def overall(results: Sequence[GateResult]) -> Verdict:
    """All gates' verdicts as one: any Failed → Failed; else any Error → Error; all Successful → Successful.

    Everything else — including no gates at all — is Inconclusive: without positive evidence
    from every gate the step holds, and it never promotes (see the module docstring).
    """
    verdicts = {result.verdict for result in results}
    if Verdict.FAILED in verdicts:
        return Verdict.FAILED
    if Verdict.ERROR in verdicts:
        return Verdict.ERROR
    if verdicts == {Verdict.SUCCESSFUL}:
        return Verdict.SUCCESSFUL
    return Verdict.INCONCLUSIVE


# --------------------------------------------------------------------------- fetching


class _Reader:
    """Runs each distinct query once per evaluation (CTR and like rate share impressions); errors too are remembered,
    so an unreachable Prometheus costs one timeout per query, not one per gate."""

    def __init__(self, client: QueryClient, time: float | None) -> None:
        self._client = client
        self._time = time
        self._cache: dict[str, list[Sample] | PrometheusError] = {}

    def query(self, promql: str) -> list[Sample]:
        if promql not in self._cache:
            try:
                self._cache[promql] = self._client.query(promql, time=self._time)
            except PrometheusError as error:
                self._cache[promql] = error
        answer = self._cache[promql]
        if isinstance(answer, PrometheusError):
            raise answer
        return answer

    def by_label(self, promql: str, label: str) -> dict[str, float]:
        values: dict[str, float] = {}
        for sample in self.query(promql):
            key = sample.labels.get(label, "")
            if key in values:
                raise GateDataError(f"query {promql!r} returned two series for {label}={key!r}")
            values[key] = sample.value
        return values

    def scalar(self, promql: str) -> float:
        """One number; an empty answer is NaN (no series: nothing observed)."""
        samples = self.query(promql)
        if len(samples) > 1:
            raise GateDataError(f"query {promql!r} returned {len(samples)} series, expected one")
        return samples[0].value if samples else math.nan


def _count(value: float, what: str) -> int:
    """A count from Prometheus: finite, non-negative, rounded (``increase()`` across a reset is fractional)."""
    if not math.isfinite(value) or value < -0.5:
        raise GateDataError(f"{what} is {value!r}, not a count")
    return max(0, round(value))


def _rate_counts(successes: float, trials: float, arm: str, event: str) -> RateCounts:
    s, n = _count(successes, f"{arm} {event}s"), _count(trials, f"{arm} impressions")
    if s > n:
        if s - n > max(1.0, _COUNT_SLACK * n):
            raise GateDataError(f"{arm} has more {event}s ({s}) than impressions ({n}): the metrics disagree")
        s = n  # within _COUNT_SLACK: late feedback or a reset's extrapolation
    return RateCounts(s, n)


def _evaluate(gate: Gate, reader: _Reader, context: GateContext) -> GateResult:
    experiment, treatment, control = context.experiment, context.treatment, context.control
    window, step_window = context.window, context.step_window
    if isinstance(gate, CtrLiftGate | LikeRateLiftGate):
        event = "click" if isinstance(gate, CtrLiftGate) else "like"
        impressions = reader.by_label(queries.impressions_by_arm(experiment, window), queries.ARM_LABEL)
        events = reader.by_label(queries.feedback_by_arm(experiment, event, window), queries.ARM_LABEL)
        # An arm absent from the answer has no series yet: zero of that event (it cannot pass min samples anyway).
        counts = {
            arm: _rate_counts(events.get(arm, 0.0), impressions.get(arm, 0.0), arm, event)
            for arm in (control, treatment)
        }
        return decide_lift(counts[control], counts[treatment], gate)
    if isinstance(gate, GmvPerUserLiftGate):
        users = reader.by_label(queries.users_by_arm(experiment, window), queries.ARM_LABEL)
        sums = reader.by_label(queries.purchase_value_by_arm(experiment, window), queries.ARM_LABEL)
        squares = reader.by_label(queries.purchase_value_squared_by_arm(experiment, window), queries.ARM_LABEL)
        gmv = {}
        for arm in (control, treatment):
            value_sum, value_sumsq = sums.get(arm, 0.0), squares.get(arm, 0.0)
            if not (math.isfinite(value_sum) and math.isfinite(value_sumsq)):
                raise GateDataError(f"{arm} purchase value sums are not finite: {value_sum}, {value_sumsq}")
            gmv[arm] = GmvCounts(
                _count(users.get(arm, 0.0), f"{arm} users"), max(value_sum, 0.0), max(value_sumsq, 0.0)
            )
        return decide_gmv(gmv[control], gmv[treatment], gate)
    if isinstance(gate, SampleRatioGate):
        users = reader.by_label(queries.users_by_arm(experiment, step_window), queries.ARM_LABEL)
        return decide_sample_ratio(
            {arm: _count(v, f"{arm or '(no arm label)'} users") for arm, v in users.items()},
            context.arms,
            gate,
            context.routers,
        )
    if isinstance(gate, LatencyP99Gate):
        arm = context.arm_name(gate.arm)
        p99 = reader.scalar(queries.latency_quantile(experiment, arm, step_window, 0.99))
        requests = reader.scalar(queries.latency_count(experiment, arm, step_window))
        result = decide_latency(p99, 0.0 if math.isnan(requests) else requests, gate)
        return GateResult(
            result.gate, result.verdict, result.value, result.interval, result.message, {**result.details, "arm": arm}
        )
    if isinstance(gate, ErrorRateGate):
        arm = context.arm_name(gate.arm)
        by_status = reader.by_label(queries.requests_by_status(experiment, arm, step_window), "status")
        for status, value in by_status.items():
            _count(value, f"{arm} requests with status {status}")  # NaN/Inf/negative: Error, not a silent 0
        errors = sum(by_status.get(s, 0.0) for s in queries.ERROR_STATUSES)
        attempts = sum(by_status.get(s, 0.0) for s in queries.ATTEMPT_STATUSES)
        result = decide_error_rate(errors, attempts, gate)
        return replace(result, details={**result.details, "arm": arm, "byStatus": by_status})
    if isinstance(gate, PromqlGate):
        arm = context.arm_name(gate.arm)
        promql = queries.render_template(gate.query, experiment, arm, step_window)
        result = decide_promql(reader.query(promql), gate)
        return replace(result, details={**result.details, "query": promql})
    raise TypeError(f"unknown gate type {type(gate).__name__}")


def evaluate_gate(gate: Gate, client: QueryClient, context: GateContext) -> GateResult:
    """Fetch what ``gate`` needs from Prometheus and decide it.

    A query that fails (:class:`~recops.experiments.prometheus.PrometheusError`) or metrics
    that contradict each other give verdict Error with the cause in ``message``.
    """
    return _evaluate_with(gate, _Reader(client, context.time), context)


def _evaluate_with(gate: Gate, reader: _Reader, context: GateContext) -> GateResult:
    try:
        return _evaluate(gate, reader, context)
    except PrometheusError as error:
        return GateResult(gate.gate_name, Verdict.ERROR, message=str(error), details={"query": error.query})
    except GateDataError as error:
        return GateResult(gate.gate_name, Verdict.ERROR, message=str(error))


def evaluate_gates(gates: Sequence[Gate], client: QueryClient, context: GateContext) -> list[GateResult]:
    """Every gate's result at this look, in order; combine them with :func:`overall`.

    Each distinct query is sent once per call, so gates that share a metric see the same numbers.
    """
    reader = _Reader(client, context.time)
    return [_evaluate_with(gate, reader, context) for gate in gates]
