"""Gates against a real Prometheus scraping a simulated router (metric names from serving.contract).

One Prometheus and one exporter for the module; every scenario is its own ``experiment`` label
value, so scenarios cannot see each other's counts. Each test drives traffic, waits until
Prometheus has scraped the final counter values (polling, not sleeping), then evaluates gates.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from _prometheus import ArmBehaviour, SimulatedRouter
from recops.api.recexperiment import RecExperimentSpec
from recops.experiments.gates import GateContext, Verdict, evaluate_gate, evaluate_gates, overall
from recops.experiments.prometheus import PrometheusClient, PrometheusError
from recops.experiments.queries import label_value
from recops.serving import contract
from recops.serving.assignment import ArmWeights, assign_many

ARMS = ("treatment", "control")
HALF = ArmWeights.two_arm(5000)
# Label values with a quote, a backslash and non-ASCII: the queries must escape them for real.
BETTER = 'ranker "v2" \\ better é'
WORSE = "ranker-v2-worse"
SRM = "ranker-v2-srm"
EXACT = "ranker-v2-exact"
RESTARTED = "ranker-v2-restarted"
EXPERIMENTS = (BETTER, WORSE, SRM, EXACT, RESTARTED)


def _gates(*documents: dict) -> list:
    """Gate specs validated exactly as a manifest's would be."""
    spec = RecExperimentSpec.model_validate(
        {
            "control": {"model": "a"},
            "treatment": {"model": "b"},
            "assignment": {"salt": "s"},
            "steps": [{"weight": 50, "pause": "5m"}],
            "gates": list(documents),
            "prometheus": {"url": "http://127.0.0.1:9090"},
        }
    )
    return list(spec.gates)


CTR = {"type": "ctrLift", "minSamples": 2000}
SAMPLE_RATIO = {"type": "sampleRatio"}


@pytest.fixture(scope="module")
def stack(prometheus_factory):
    """(router, prometheus, client) with every scenario's series created at 0 and scraped once."""
    router = SimulatedRouter()
    try:
        for experiment in EXPERIMENTS:
            router.open_experiment(experiment, ARMS)
        prometheus = prometheus_factory([router.target])
        zero_series = f"count({contract.IMPRESSIONS} == 0)"
        prometheus.wait_for_values(zero_series, "", {"": len(EXPERIMENTS) * len(ARMS)})
        with PrometheusClient(prometheus.url, timeout=5.0) as client:
            yield router, prometheus, client
    finally:
        router.close()


def _serve_and_wait(stack, experiment, arm_of_user, behaviour, seed):
    router, prometheus, _ = stack
    totals = router.serve(experiment, arm_of_user, behaviour, np.random.default_rng(seed))
    selector = f"{{experiment={label_value(experiment)}}}"
    # Raw counter values (no increase()): exact, so equality means the final scrape has landed.
    prometheus.wait_for_values(f"sum by (arm) ({contract.IMPRESSIONS}{selector})", "arm", totals.impressions)
    prometheus.wait_for_values(f"sum by (arm) ({contract.LATENCY}_count{selector})", "arm", totals.requests)
    prometheus.wait_for_values(f"sum by (arm) ({contract.USERS}{selector})", "arm", totals.users)
    return totals


def _last_scrape(prometheus, experiment):
    """Timestamp of the newest sample: evaluating there makes increase() exact (no extrapolation)."""
    result = prometheus.query(f"max(timestamp({contract.IMPRESSIONS}{{experiment={label_value(experiment)}}}))")
    return float(result[0]["value"][1])


def test_better_treatment_passes_and_every_gate_reads_its_metric(stack):
    _, prometheus, client = stack
    users = [f"user-{i}" for i in range(4000)]
    behaviour = {
        "control": ArmBehaviour(ctr=0.05, latency_seconds=0.03),
        # Better CTR and GMV, but 3% of requests slow and 3% failing upstream, plus client errors that don't count.
        "treatment": ArmBehaviour(
            ctr=0.08,
            latency_seconds=0.08,
            slow_fraction=0.03,
            error_fraction=0.03,
            bad_request_fraction=0.05,
            purchases_per_user=0.45,
        ),
    }
    totals = _serve_and_wait(stack, BETTER, assign_many("salt-1", users, HALF), behaviour, seed=1)
    context = GateContext(BETTER, HALF, window="5m", time=_last_scrape(prometheus, BETTER))
    gates = _gates(
        CTR,
        SAMPLE_RATIO,
        {"type": "gmvPerUserLift", "name": "gmv", "minSamples": 1000},
        {"type": "latencyP99", "name": "p99-treatment", "arm": "treatment", "maxMilliseconds": 250},
        {"type": "latencyP99", "name": "p99-control", "arm": "control", "maxMilliseconds": 250},
        {"type": "errorRate", "name": "errors-treatment", "maxRatio": 0.01},
        {"type": "errorRate", "name": "errors-control", "arm": "control", "maxRatio": 0.01},
        {
            "type": "promql",
            "name": "impressions",
            "query": f'sum(increase({contract.IMPRESSIONS}{{experiment="$experiment",arm="$arm"}}[$window]))',
            "op": "ge",
            "threshold": 5000,
        },
    )
    results = {r.gate: r for r in evaluate_gates(gates, client, context)}

    ctr = results["ctrLift"]
    assert ctr.verdict is Verdict.SUCCESSFUL, ctr.message
    # Evaluated at the last scrape, increase() from the 0 sample is exact: the gate saw precisely what was sent.
    for arm in ARMS:
        assert ctr.details[arm] == {"successes": totals.clicks[arm], "trials": totals.impressions[arm]}
    assert ctr.interval[0] > 0 and ctr.value == pytest.approx(
        (totals.clicks["treatment"] / totals.impressions["treatment"])
        / (totals.clicks["control"] / totals.impressions["control"])
        - 1
    )

    assert results["sampleRatio"].verdict is Verdict.SUCCESSFUL, results["sampleRatio"].message
    assert results["sampleRatio"].details["users"] == totals.users
    assert results["gmv"].verdict is Verdict.SUCCESSFUL, results["gmv"].message

    slow = results["p99-treatment"]
    assert slow.verdict is Verdict.FAILED and 250 < slow.value <= 500, slow.message  # the 3% at 400 ms
    fast = results["p99-control"]
    assert fast.verdict is Verdict.SUCCESSFUL and 25 <= fast.value <= 50, fast.message  # all at 30 ms

    errors = results["errors-treatment"]
    assert errors.verdict is Verdict.FAILED, errors.message
    # bad_request is excluded from numerator and denominator.
    by_status = errors.details["byStatus"]
    assert errors.value == pytest.approx(by_status["upstream_error"] / (by_status["ok"] + by_status["upstream_error"]))
    assert by_status["bad_request"] > 0
    assert results["errors-control"].verdict is Verdict.SUCCESSFUL

    promql = results["impressions"]
    assert promql.verdict is Verdict.SUCCESSFUL and promql.value == totals.impressions["treatment"]

    assert overall(list(results.values())) is Verdict.FAILED  # the slow, erroring treatment must not promote


def test_worse_treatment_fails_the_ctr_gate(stack):
    _, _, client = stack
    users = [f"user-{i}" for i in range(4000)]
    behaviour = {"control": ArmBehaviour(ctr=0.08), "treatment": ArmBehaviour(ctr=0.05)}
    _serve_and_wait(stack, WORSE, assign_many("salt-2", users, HALF), behaviour, seed=2)
    # Evaluated at "now", as the operator does: increase() extrapolates a little, the verdict holds.
    context = GateContext(WORSE, HALF, window=300)
    result = evaluate_gate(_gates(CTR)[0], client, context)
    assert result.verdict is Verdict.FAILED, result.message
    assert result.value < 0 and result.interval[1] < 0
    assert "significantly worse" in result.message


def test_forced_mis_assignment_fails_the_sample_ratio_gate(stack):
    _, _, client = stack
    # 60/40 distinct users although the step says 50/50: e.g. a cache that sticks users to treatment.
    arm_of_user = ["treatment"] * 600 + ["control"] * 400
    behaviour = {arm: ArmBehaviour(ctr=0.05) for arm in ARMS}
    _serve_and_wait(stack, SRM, arm_of_user, behaviour, seed=3)
    context = GateContext(SRM, HALF, window=300)
    srm = evaluate_gate(_gates(SAMPLE_RATIO)[0], client, context)
    assert srm.verdict is Verdict.FAILED, srm.message
    assert srm.value < 0.001 and "sample ratio mismatch" in srm.message
    # Against the weights that really produced this split, the same counts pass.
    matching = GateContext(SRM, ArmWeights(arms={"treatment": 6000, "control": 4000}), window=300)
    assert evaluate_gate(_gates(SAMPLE_RATIO)[0], client, matching).verdict is Verdict.SUCCESSFUL


def test_counts_are_the_scraped_differences_at_any_evaluation_time(stack):
    # increase() would stretch the sampled interval to the window's edges (the last scrape was up to a
    # second ago): a count a few percent high, and a chi-square inflated with it. The gates see exact users.
    _, _, client = stack
    users = [f"user-{i}" for i in range(3000)]
    totals = _serve_and_wait(stack, EXACT, assign_many("salt-4", users, HALF),
                             {arm: ArmBehaviour(ctr=0.05) for arm in ARMS}, seed=4)
    context = GateContext(EXACT, HALF, window=300)  # at "now", as the operator evaluates
    srm, ctr = evaluate_gates(_gates(SAMPLE_RATIO, CTR), client, context)
    assert srm.details["users"] == totals.users, srm.message
    for arm in ARMS:
        assert ctr.details[arm] == {"successes": totals.clicks[arm], "trials": totals.impressions[arm]}


def test_a_router_restart_in_the_window_is_counted_across_its_reset(stack):
    router, prometheus, client = stack
    arms = assign_many("salt-5", [f"user-{i}" for i in range(2000)], HALF)
    behaviour = {arm: ArmBehaviour(ctr=0.05) for arm in ARMS}
    before = _serve_and_wait(stack, RESTARTED, arms[:1000], behaviour, seed=5)
    for arm in ARMS:  # the restarted router's counters start at 0 again
        router.users.remove(RESTARTED, arm)
        router.users.labels(RESTARTED, arm)
    prometheus.wait_for_values(f"sum by (arm) ({contract.USERS}{{experiment={label_value(RESTARTED)}}})", "arm",
                               dict.fromkeys(ARMS, 0))
    after = router.serve(RESTARTED, arms[1000:], behaviour, np.random.default_rng(6))
    prometheus.wait_for_values(f"sum by (arm) ({contract.USERS}{{experiment={label_value(RESTARTED)}}})", "arm",
                               after.users)
    # At the last scrape, from the 0 sample, increase() is exact: what both router lives counted.
    context = GateContext(RESTARTED, HALF, window=300, time=_last_scrape(prometheus, RESTARTED))
    srm = evaluate_gate(_gates(SAMPLE_RATIO)[0], client, context)
    assert srm.details["users"] == {arm: before.users[arm] + after.users[arm] for arm in ARMS}, srm.message


def test_an_arm_without_traffic_is_inconclusive_and_bad_queries_are_errors(stack):
    _, _, client = stack
    context = GateContext("no-such-experiment", HALF, window=300)
    gates = _gates(
        CTR,
        SAMPLE_RATIO,
        {"type": "latencyP99", "maxMilliseconds": 250, "minRequests": 1},
        {"type": "errorRate", "maxRatio": 0.01},
        {"type": "promql", "name": "nothing", "query": 'sum(up{job="none"})', "op": "gt", "threshold": 0},
        {"type": "promql", "name": "broken", "query": "sum(rate(up[5m]", "op": "gt", "threshold": 0},
        {"type": "promql", "name": "many", "query": "up or vector(1)", "op": "gt", "threshold": 0},
    )
    results = {r.gate: r for r in evaluate_gates(gates, client, context)}
    for name in ("ctrLift", "sampleRatio", "latencyP99", "errorRate", "nothing"):
        assert results[name].verdict is Verdict.INCONCLUSIVE, (name, results[name].message)
    assert results["broken"].verdict is Verdict.ERROR and "bad_data" in results["broken"].message
    assert results["many"].verdict is Verdict.ERROR and "2 series" in results["many"].message


def test_a_stopped_prometheus_gives_error_never_a_verdict(prometheus_factory):
    router = SimulatedRouter()
    try:
        router.open_experiment("down", ARMS)
        prometheus = prometheus_factory([router.target])
        with PrometheusClient(prometheus.url, timeout=2.0) as client:
            assert client.query("vector(1)")[0].value == 1.0  # it was up
            prometheus.kill()
            with pytest.raises(PrometheusError, match="cannot reach"):
                client.query("vector(1)")
            gates = _gates(
                CTR,
                SAMPLE_RATIO,
                {"type": "likeRateLift"},
                {"type": "gmvPerUserLift"},
                {"type": "latencyP99", "maxMilliseconds": 250},
                {"type": "errorRate", "maxRatio": 0.01},
                {"type": "promql", "query": "vector(1)", "op": "gt", "threshold": 0},
            )
            results = evaluate_gates(gates, client, GateContext("down", HALF, window=60))
    finally:
        router.close()
    assert [r.verdict for r in results] == [Verdict.ERROR] * len(gates)
    assert all("cannot reach" in r.message for r in results)
    assert overall(results) is Verdict.ERROR
    assert not any(math.isfinite(r.value) for r in results if r.value is not None)
