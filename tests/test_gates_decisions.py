"""Gate decisions from counts (no Prometheus), the overall combinator, and evaluation over a fake client."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recops.api.recexperiment import RecExperimentSpec
from recops.experiments import queries
from recops.experiments.gates import (
    GateContext,
    GateResult,
    GmvCounts,
    RateCounts,
    Verdict,
    decide_error_rate,
    decide_gmv,
    decide_latency,
    decide_lift,
    decide_promql,
    decide_sample_ratio,
    evaluate_gate,
    evaluate_gates,
    gmv_per_user_variance,
    overall,
)
from recops.experiments.prometheus import PrometheusError, Sample
from recops.serving import contract
from recops.serving.assignment import ArmWeights


def gate(**document):
    """One gate spec, validated as in a manifest."""
    spec = RecExperimentSpec.model_validate(
        {
            "control": {"model": "a"},
            "treatment": {"model": "b"},
            "assignment": {"salt": "s"},
            "steps": [{"weight": 50, "pause": "5m"}],
            "gates": [document],
            "prometheus": {"url": "http://prometheus:9090"},
        }
    )
    return spec.gates[0]


CTR = gate(type="ctrLift", minSamples=1000)

# --------------------------------------------------------------------------- rate lifts


def test_a_clearly_better_treatment_is_successful_with_an_interval_above_zero():
    result = decide_lift(RateCounts(500, 10_000), RateCounts(800, 10_000), CTR)
    assert result.verdict is Verdict.SUCCESSFUL, result.message
    assert result.value == pytest.approx(0.6)
    low, high = result.interval
    assert 0 < low < 0.6 < high
    assert result.details["pValue"] <= 0.05


def test_a_clearly_worse_treatment_fails_on_harm():
    result = decide_lift(RateCounts(800, 10_000), RateCounts(500, 10_000), CTR)
    assert result.verdict is Verdict.FAILED
    assert "significantly worse" in result.message
    assert result.interval[1] < 0


def test_equal_arms_are_inconclusive():
    result = decide_lift(RateCounts(500, 10_000), RateCounts(505, 10_000), CTR)
    assert result.verdict is Verdict.INCONCLUSIVE
    low, high = result.interval
    assert low < 0 < high


def test_below_min_samples_never_successful_however_large_the_lift():
    result = decide_lift(RateCounts(10, 999), RateCounts(900, 999), CTR)
    assert result.verdict is Verdict.INCONCLUSIVE
    assert "needs 1000 impressions per arm" in result.message
    assert result.value is None and result.interval is None


def test_min_lift_and_the_non_inferiority_margin():
    # 10% vs 9.8% at two million impressions per arm: a real 2% relative loss, measured to about ±1%.
    control, treatment = RateCounts(200_000, 2_000_000), RateCounts(196_000, 2_000_000)
    assert decide_lift(control, treatment, gate(type="ctrLift")).verdict is Verdict.FAILED  # harm
    margin = gate(type="ctrLift", minLift=-0.05, failOn="belowMinLift")
    assert decide_lift(control, treatment, margin).verdict is Verdict.SUCCESSFUL  # within a 5% margin
    strict = gate(type="ctrLift", minLift=0.0, failOn="belowMinLift")
    assert decide_lift(control, treatment, strict).verdict is Verdict.FAILED  # shown below 0
    # A better treatment that is not shown to reach +10% stays Inconclusive, not Successful.
    better = decide_lift(RateCounts(500, 10_000), RateCounts(560, 10_000), gate(type="ctrLift", minLift=0.1))
    assert better.verdict is Verdict.INCONCLUSIVE


def test_a_zero_control_rate_is_inconclusive():
    result = decide_lift(RateCounts(0, 5000), RateCounts(0, 5000), CTR)
    assert result.verdict is Verdict.INCONCLUSIVE and "control rate is 0" in result.message


# Each run: 20 looks, each adding 500 impressions per arm at the same 5% CTR (as in test_statistics).
LOOKS, BATCH, RUNS = 20, 500, 600


def test_a_a_traffic_is_promoted_at_most_alpha_of_the_time_over_20_looks():
    rng = np.random.default_rng(11)
    control = np.cumsum(rng.binomial(BATCH, 0.05, (RUNS, LOOKS)), axis=1)
    treatment = np.cumsum(rng.binomial(BATCH, 0.05, (RUNS, LOOKS)), axis=1)
    trials = BATCH * np.arange(1, LOOKS + 1)
    promoted = failed = 0
    for c_row, t_row in zip(control, treatment, strict=True):
        for c, t, n in zip(c_row.tolist(), t_row.tolist(), trials.tolist(), strict=True):
            verdict = decide_lift(RateCounts(c, n), RateCounts(t, n), CTR).verdict
            if verdict is not Verdict.INCONCLUSIVE:  # the experiment ends at its first verdict
                promoted += verdict is Verdict.SUCCESSFUL
                failed += verdict is Verdict.FAILED
                break
    # The guarantee is P(ever Successful) <= alpha = 5%; measured 0.3-0.8% over seeds (any verdict ~1.5%).
    assert promoted / RUNS <= 0.05
    assert (promoted + failed) / RUNS <= 0.06


def test_a_real_lift_is_usually_found_within_20_looks():
    rng = np.random.default_rng(12)
    runs = 100
    control = np.cumsum(rng.binomial(BATCH, 0.05, (runs, LOOKS)), axis=1)
    treatment = np.cumsum(rng.binomial(BATCH, 0.065, (runs, LOOKS)), axis=1)
    trials = BATCH * np.arange(1, LOOKS + 1)
    found = 0
    for c_row, t_row in zip(control, treatment, strict=True):
        verdicts = [
            decide_lift(RateCounts(c, n), RateCounts(t, n), CTR).verdict
            for c, t, n in zip(c_row.tolist(), t_row.tolist(), trials.tolist(), strict=True)
        ]
        found += Verdict.SUCCESSFUL in verdicts
        assert Verdict.FAILED not in verdicts
    assert found / runs >= 0.85


# --------------------------------------------------------------------------- GMV per user


def _simulate_gmv(rng, users, rate, mean_value):
    purchases = rng.poisson(rate, users)
    values = rng.lognormal(math.log(mean_value) - 0.125, 0.5, int(purchases.sum()))
    owner = np.repeat(np.arange(users), purchases)
    per_user = np.bincount(owner, weights=values, minlength=users)
    return GmvCounts(users, float(values.sum()), float(np.square(values).sum())), per_user


def test_compound_poisson_variance_matches_the_variance_of_per_user_totals():
    rng = np.random.default_rng(5)
    counts, per_user = _simulate_gmv(rng, 200_000, rate=0.8, mean_value=40.0)
    model = gmv_per_user_variance(counts.value_sumsq, counts.users)
    assert model == pytest.approx(per_user.var(ddof=1), rel=0.02)
    # The naive Σv²/n − mean² misses the cross terms of users with several purchases.
    naive = counts.value_sumsq / counts.users - (counts.value_sum / counts.users) ** 2
    assert naive < 0.8 * per_user.var(ddof=1)


def test_gmv_gate_better_worse_equal():
    rng = np.random.default_rng(6)
    gmv = gate(type="gmvPerUserLift", minSamples=1000)
    control, _ = _simulate_gmv(rng, 5000, 0.3, 50.0)
    better, _ = _simulate_gmv(rng, 5000, 0.45, 50.0)
    worse, _ = _simulate_gmv(rng, 5000, 0.2, 50.0)
    same, _ = _simulate_gmv(rng, 5000, 0.3, 50.0)
    result = decide_gmv(control, better, gmv)
    assert result.verdict is Verdict.SUCCESSFUL and result.interval[0] > 0, result.message
    assert result.details["welchPValue"] < 0.05  # the fixed-horizon Welch test agrees
    assert decide_gmv(control, worse, gmv).verdict is Verdict.FAILED
    assert decide_gmv(control, same, gmv).verdict is Verdict.INCONCLUSIVE
    assert decide_gmv(GmvCounts(999, 10.0, 100.0), better, gmv).verdict is Verdict.INCONCLUSIVE
    assert "no purchases" in decide_gmv(GmvCounts(2000, 0, 0), GmvCounts(2000, 0, 0), gmv).message


# --------------------------------------------------------------------------- sample ratio


SRM = gate(type="sampleRatio")


def test_srm_passes_a_fair_split_and_fails_a_forced_mis_assignment():
    half = ArmWeights.two_arm(5000)
    assert decide_sample_ratio({"treatment": 5030, "control": 4970}, half, SRM).verdict is Verdict.SUCCESSFUL
    failed = decide_sample_ratio({"treatment": 600, "control": 400}, half, SRM)
    assert failed.verdict is Verdict.FAILED and failed.value < 0.001
    # The same counts match a 60/40 step: the gate judges against the *current* step's weights.
    step = ArmWeights.two_arm(6000)
    assert decide_sample_ratio({"treatment": 600, "control": 400}, step, SRM).verdict is Verdict.SUCCESSFUL


def test_srm_weighs_a_user_counted_by_each_router_once():
    # 1,400 / 1,200 distinct users on a 50/50 step is no evidence of a mismatch; behind a Service
    # both routers see (and count) every one of them, which must not read as 2,800 / 2,400 users.
    half = ArmWeights.two_arm(5000)
    seen_once = decide_sample_ratio({"treatment": 1400, "control": 1200}, half, SRM)
    seen_twice = decide_sample_ratio({"treatment": 2800, "control": 2400}, half, SRM, routers=2)
    assert seen_once.verdict is seen_twice.verdict is Verdict.SUCCESSFUL
    assert seen_twice.value == pytest.approx(seen_once.value) and seen_twice.details["routers"] == 2
    assert decide_sample_ratio({"treatment": 2800, "control": 2400}, half, SRM).verdict is Verdict.FAILED
    with pytest.raises(ValueError, match="routers"):
        GateContext("shop", half, window=60, routers=0)


def test_srm_edge_cases():
    tenth = ArmWeights.two_arm(1000)
    assert decide_sample_ratio({}, tenth, SRM).verdict is Verdict.INCONCLUSIVE
    assert decide_sample_ratio({"treatment": 2, "control": 20}, tenth, SRM).verdict is Verdict.INCONCLUSIVE
    stray = decide_sample_ratio({"treatment": 100, "control": 900, "shadow": 3}, tenth, SRM)
    assert stray.verdict is Verdict.FAILED and "not configured" in stray.message
    everyone = ArmWeights.two_arm(10_000)  # last step: control has weight 0
    leaked = decide_sample_ratio({"treatment": 1000, "control": 1}, everyone, SRM)
    assert leaked.verdict is Verdict.FAILED and "weight 0" in leaked.message
    assert decide_sample_ratio({"treatment": 1000}, everyone, SRM).verdict is Verdict.SUCCESSFUL


# --------------------------------------------------------------------------- latency, errors, promql


def test_latency_thresholds_and_no_traffic():
    p99 = gate(type="latencyP99", maxMilliseconds=250, minRequests=100)
    assert decide_latency(0.1, 1000, p99).verdict is Verdict.SUCCESSFUL
    assert decide_latency(0.1, 1000, p99).value == pytest.approx(100.0)
    assert decide_latency(0.3, 1000, p99).verdict is Verdict.FAILED
    assert decide_latency(math.inf, 1000, p99).verdict is Verdict.FAILED
    assert decide_latency(math.nan, 1000, p99).verdict is Verdict.INCONCLUSIVE
    assert decide_latency(0.3, 99, p99).verdict is Verdict.INCONCLUSIVE  # too few requests to judge
    assert decide_latency(math.nan, math.nan, p99).verdict is Verdict.INCONCLUSIVE


def test_error_rate_thresholds_and_no_traffic():
    errors = gate(type="errorRate", maxRatio=0.01, minRequests=100)
    assert decide_error_rate(1, 1000, errors).verdict is Verdict.SUCCESSFUL
    assert decide_error_rate(10, 1000, errors).verdict is Verdict.SUCCESSFUL  # exactly at the limit
    assert decide_error_rate(11, 1000, errors).verdict is Verdict.FAILED
    assert decide_error_rate(0, 0, errors).verdict is Verdict.INCONCLUSIVE


@pytest.mark.parametrize(
    ("op", "value", "expected"),
    [
        ("lt", 1, Verdict.SUCCESSFUL),
        ("lt", 2, Verdict.FAILED),
        ("le", 2, Verdict.SUCCESSFUL),
        ("gt", 3, Verdict.SUCCESSFUL),
        ("ge", 1, Verdict.FAILED),
        ("eq", 2, Verdict.SUCCESSFUL),
        ("ne", 2, Verdict.FAILED),
        ("gt", math.inf, Verdict.SUCCESSFUL),
        ("lt", math.nan, Verdict.INCONCLUSIVE),
    ],
)
def test_promql_comparisons(op, value, expected):
    promql = gate(type="promql", query="vector(1)", op=op, threshold=2)
    assert decide_promql([Sample({}, value, 0.0)], promql).verdict is expected


def test_promql_needs_exactly_one_number():
    promql = gate(type="promql", query="up", op="gt", threshold=0)
    assert decide_promql([], promql).verdict is Verdict.INCONCLUSIVE
    two = [Sample({"i": "a"}, 1.0, 0.0), Sample({"i": "b"}, 1.0, 0.0)]
    assert decide_promql(two, promql).verdict is Verdict.ERROR


# --------------------------------------------------------------------------- overall


def _r(verdict):
    return GateResult("g", verdict)


@pytest.mark.parametrize(
    ("verdicts", "expected"),
    [
        ([Verdict.SUCCESSFUL, Verdict.SUCCESSFUL], Verdict.SUCCESSFUL),
        ([Verdict.SUCCESSFUL, Verdict.INCONCLUSIVE], Verdict.INCONCLUSIVE),
        ([Verdict.SUCCESSFUL, Verdict.ERROR, Verdict.INCONCLUSIVE], Verdict.ERROR),
        ([Verdict.ERROR, Verdict.FAILED], Verdict.FAILED),
        ([Verdict.FAILED, Verdict.SUCCESSFUL], Verdict.FAILED),
        ([], Verdict.INCONCLUSIVE),  # no gates is no evidence: never promote
    ],
)
def test_overall(verdicts, expected):
    assert overall([_r(v) for v in verdicts]) is expected


# --------------------------------------------------------------------------- evaluation over a fake client


class FakePrometheus:
    """Answers queries from a dict (or raises what it holds) and records what was asked."""

    def __init__(self, answers):
        self.answers = answers
        self.asked = []

    def query(self, promql, *, time=None):
        self.asked.append(promql)
        answer = self.answers.get(promql, [])
        if isinstance(answer, Exception):
            raise answer
        return answer


def _by_arm(**values):
    return [Sample({"arm": arm}, float(value), 0.0) for arm, value in values.items()]


CONTEXT = GateContext("exp", ArmWeights.two_arm(5000), window="1h", step_window="10m")


def test_lift_gates_share_the_impressions_query_and_read_the_experiment_window():
    impressions = queries.impressions_by_arm("exp", 3600)
    fake = FakePrometheus(
        {
            impressions: _by_arm(treatment=10_000.4, control=9_999.6),  # increase() extrapolates: not integers
            queries.feedback_by_arm("exp", "click", 3600): _by_arm(treatment=800, control=500),
            queries.feedback_by_arm("exp", "like", 3600): _by_arm(treatment=100),  # no like series in control yet
        }
    )
    results = evaluate_gates([CTR, gate(type="likeRateLift")], fake, CONTEXT)
    assert results[0].verdict is Verdict.SUCCESSFUL
    assert results[0].details["treatment"] == {"successes": 800, "trials": 10_000}
    # An absent series is zero events (not an error); a zero control rate leaves the relative lift undefined.
    assert results[1].details["control"] == {"successes": 0, "trials": 10_000}
    assert results[1].verdict is Verdict.INCONCLUSIVE and "control rate is 0" in results[1].message
    assert fake.asked.count(impressions) == 1


def test_srm_latency_and_errors_read_the_step_window():
    fake = FakePrometheus(
        {
            queries.users_by_arm("exp", 600): _by_arm(treatment=510, control=490),
            queries.latency_quantile("exp", "treatment", 600): [Sample({}, 0.12, 0.0)],
            queries.latency_count("exp", "treatment", 600): [Sample({}, 500.0, 0.0)],
            queries.requests_by_status("exp", "treatment", 600): [
                Sample({"status": "ok"}, 970.0, 0.0),
                Sample({"status": "timeout"}, 30.0, 0.0),
                Sample({"status": "bad_request"}, 500.0, 0.0),  # the client's fault: ignored
                Sample({"status": "overloaded"}, 100.0, 0.0),  # shed before reaching the model: ignored
            ],
        }
    )
    srm, p99, errors = evaluate_gates(
        [gate(type="sampleRatio"), gate(type="latencyP99", maxMilliseconds=100), gate(type="errorRate", maxRatio=0.02)],
        fake,
        CONTEXT,
    )
    assert srm.verdict is Verdict.SUCCESSFUL
    assert p99.verdict is Verdict.FAILED and p99.value == pytest.approx(120.0)
    assert errors.verdict is Verdict.FAILED and errors.value == pytest.approx(0.03)


def test_query_errors_and_inconsistent_metrics_are_error_not_a_verdict():
    down = PrometheusError("q", "cannot reach http://prometheus:9090: ConnectError")
    fake = FakePrometheus({queries.impressions_by_arm("exp", 3600): down})
    result = evaluate_gate(CTR, fake, CONTEXT)
    assert result.verdict is Verdict.ERROR and "cannot reach" in result.message

    more_clicks = FakePrometheus(
        {
            queries.impressions_by_arm("exp", 3600): _by_arm(treatment=1000, control=1000),
            queries.feedback_by_arm("exp", "click", 3600): _by_arm(treatment=2000, control=10),
        }
    )
    result = evaluate_gate(gate(type="ctrLift", minSamples=10), more_clicks, CONTEXT)
    assert result.verdict is Verdict.ERROR and "more clicks" in result.message

    nan_counts = FakePrometheus({queries.users_by_arm("exp", 600): _by_arm(treatment=math.nan, control=3)})
    assert evaluate_gate(gate(type="sampleRatio"), nan_counts, CONTEXT).verdict is Verdict.ERROR

    duplicated = FakePrometheus({queries.users_by_arm("exp", 600): _by_arm(treatment=1) + _by_arm(treatment=2)})
    assert evaluate_gate(gate(type="sampleRatio"), duplicated, CONTEXT).verdict is Verdict.ERROR


def test_promql_template_is_filled_for_the_chosen_arm():
    promql = gate(
        type="promql", query='sum(x{experiment="$experiment",arm="$arm"}[$window])', arm="control", op="lt", threshold=1
    )
    rendered = 'sum(x{experiment="exp",arm="control"}[600s])'
    result = evaluate_gate(promql, FakePrometheus({rendered: [Sample({}, 0.5, 0.0)]}), CONTEXT)
    assert result.verdict is Verdict.SUCCESSFUL and result.details["query"] == rendered


def test_gate_context_normalises_and_checks():
    context = GateContext("e", {"t": 1000, "c": 9000}, window="1h30m")
    assert (context.window, context.step_window, context.treatment, context.control) == (5400.0, 5400.0, "t", "c")
    with pytest.raises(ValueError, match="two arms"):
        GateContext("e", {"c": 10_000}, window=60)
    with pytest.raises(ValueError, match="window"):
        GateContext("e", ArmWeights.two_arm(10), window=0)
    with pytest.raises(ValueError, match="duration"):
        GateContext("e", ArmWeights.two_arm(10), window="5 min")


def test_the_contract_metric_names_are_what_the_queries_use():
    assert contract.IMPRESSIONS in queries.impressions_by_arm("e", 60)
    assert contract.USERS in queries.users_by_arm("e", 60)
    assert f"{contract.LATENCY}_bucket" in queries.latency_quantile("e", "a", 60)
    assert contract.REQUESTS in queries.requests_by_status("e", "a", 60)
    assert set(queries.ATTEMPT_STATUSES) <= set(contract.REQUEST_STATUSES)
