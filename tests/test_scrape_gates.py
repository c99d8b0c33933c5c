"""Gates without Prometheus: the router scrape client evaluates the gates' own queries over scraped /metrics.

The simulated router (``tests/_prometheus.py``) is driven with known traffic; the client must see
exactly those counts and give the verdicts the Prometheus path gives (compared with a real Prometheus
when the binary is there). Counter resets, windows, several routers, no data and unreachable routers
use routers served through ``httpx.MockTransport`` from a ``prometheus_client`` registry.
"""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from _prometheus import ArmBehaviour, SimulatedRouter
from recops.api.recexperiment import RecExperimentSpec
from recops.experiments import queries
from recops.experiments.gates import GateContext, Verdict, evaluate_gates, overall
from recops.experiments.prometheus import PrometheusClient, PrometheusError
from recops.experiments.queries import label_value
from recops.experiments.scrape import RouterScrapeClient, bucket_quantile, counter_increase
from recops.serving import contract
from recops.serving.assignment import ArmWeights, assign_many
from recops.serving.processes import free_port

ARMS = ("treatment", "control")
HALF = ArmWeights.two_arm(5000)
EXPERIMENT = 'ranker "v2" é'  # a quote and non-ASCII: matched as values, not as PromQL text


def _gates(*documents: dict) -> list:
    spec = RecExperimentSpec.model_validate({
        "control": {"model": "a"},
        "treatment": {"model": "b"},
        "assignment": {"salt": "s"},
        "steps": [{"weight": 50, "pause": "5m"}],
        "gates": list(documents),
        "prometheus": {"url": "http://127.0.0.1:9090"},
    })
    return list(spec.gates)


BUILT_IN = _gates(
    {"type": "ctrLift", "minSamples": 2000},
    {"type": "likeRateLift", "minSamples": 2000},
    {"type": "sampleRatio"},
    {"type": "gmvPerUserLift", "name": "gmv", "minSamples": 1000},
    {"type": "latencyP99", "name": "p99-treatment", "maxMilliseconds": 250},
    {"type": "latencyP99", "name": "p99-control", "arm": "control", "maxMilliseconds": 250},
    {"type": "errorRate", "name": "errors-treatment", "maxRatio": 0.01},
    {"type": "errorRate", "name": "errors-control", "arm": "control", "maxRatio": 0.01},
)
PROMQL = _gates({"type": "promql", "query": "sum(up)", "op": "gt", "threshold": 0})[0]
BEHAVIOUR = {
    "control": ArmBehaviour(ctr=0.05, latency_seconds=0.03),
    # Better CTR and GMV, but slow and failing: the guardrails must catch it.
    "treatment": ArmBehaviour(
        ctr=0.08, latency_seconds=0.08, slow_fraction=0.03, error_fraction=0.03, bad_request_fraction=0.05,
        purchases_per_user=0.45,
    ),
}
EXPECTED = {
    "ctrLift": Verdict.SUCCESSFUL,
    "likeRateLift": Verdict.INCONCLUSIVE,  # same like rate in both arms
    "sampleRatio": Verdict.SUCCESSFUL,
    "gmv": Verdict.SUCCESSFUL,
    "p99-treatment": Verdict.FAILED,
    "p99-control": Verdict.SUCCESSFUL,
    "errors-treatment": Verdict.FAILED,
    "errors-control": Verdict.SUCCESSFUL,
}


@pytest.fixture
def router():
    router = SimulatedRouter()
    router.open_experiment(EXPERIMENT, ARMS)
    try:
        yield router
    finally:
        router.close()


def _serve(router: SimulatedRouter, seed: int = 1):
    users = [f"user-{i}" for i in range(4000)]
    return router.serve(EXPERIMENT, assign_many("salt-1", users, HALF), BEHAVIOUR, np.random.default_rng(seed))


def _assert_counts(results: dict, totals) -> None:
    for arm in ARMS:
        assert results["ctrLift"].details[arm] == {"successes": totals.clicks[arm], "trials": totals.impressions[arm]}
        likes = {"successes": totals.likes[arm], "trials": totals.impressions[arm]}
        assert results["likeRateLift"].details[arm] == likes
        assert results["gmv"].details[arm]["users"] == totals.users[arm]
    assert results["sampleRatio"].details["users"] == totals.users
    by_status = results["errors-treatment"].details["byStatus"]
    assert sum(by_status.values()) == totals.requests["treatment"] and by_status["bad_request"] > 0


# --------------------------------------------------------------------------- against the simulated router


def test_exact_counts_and_the_verdicts_of_the_prometheus_path(router):
    with RouterScrapeClient(router.target, auto_scrape=False) as client:
        client.scrape(at=1000.0)  # every series at 0, as a Prometheus scrape before the traffic
        totals = _serve(router)
        client.scrape(at=1010.0)
        results = {r.gate: r for r in evaluate_gates([*BUILT_IN, PROMQL], client, GateContext(EXPERIMENT, HALF, "5m"))}

    _assert_counts(results, totals)
    assert {name: results[name].verdict for name in EXPECTED} == EXPECTED, {n: r.message for n, r in results.items()}
    assert 250 < results["p99-treatment"].value <= 500  # the 3% at 400 ms
    assert 25 <= results["p99-control"].value <= 50
    promql = results["promql"]
    assert promql.verdict is Verdict.ERROR and "needs a Prometheus server" in promql.message
    assert overall(list(results.values())) is Verdict.FAILED


def test_same_counts_verdicts_and_p99_as_a_real_prometheus(router, prometheus_factory):
    prometheus = prometheus_factory([router.target])
    selector = f"{{experiment={label_value(EXPERIMENT)}}}"
    prometheus.wait_for_values(f"count({contract.IMPRESSIONS}{selector} == 0)", "", {"": 2})
    with RouterScrapeClient(router.target, auto_scrape=False) as scraper:
        scraper.scrape()
        totals = _serve(router, seed=7)
        scraper.scrape()
        prometheus.wait_for_values(f"sum by (arm) ({contract.IMPRESSIONS}{selector})", "arm", totals.impressions)
        prometheus.wait_for_values(f"sum by (arm) ({contract.LATENCY}_count{selector})", "arm", totals.requests)
        prometheus.wait_for_values(f"sum by (arm) ({contract.USERS}{selector})", "arm", totals.users)
        newest = prometheus.query(f"max(timestamp({contract.IMPRESSIONS}{selector}))")
        # At Prometheus' last scrape, with the zero sample in the window, increase() is exact there too.
        context = GateContext(EXPERIMENT, HALF, "10m", time=float(newest[0]["value"][1]))
        with PrometheusClient(prometheus.url, timeout=5.0) as client:
            from_prometheus = {r.gate: r for r in evaluate_gates(BUILT_IN, client, context)}
        from_scrapes = {r.gate: r for r in evaluate_gates(BUILT_IN, scraper, GateContext(EXPERIMENT, HALF, "10m"))}

    _assert_counts(from_scrapes, totals)
    for name, result in from_prometheus.items():
        mine = from_scrapes[name]
        assert mine.verdict is result.verdict, (name, mine.message, result.message)
        assert _close(mine.value, result.value), (name, mine.value, result.value)
        assert _close(dict(mine.details), dict(result.details)), (name, mine.details, result.details)


def _close(mine, theirs) -> bool:
    """Equal, floats to 1e-9 relative (Prometheus and Python may sum the same floats in another order)."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        return mine.keys() == theirs.keys() and all(_close(mine[k], theirs[k]) for k in mine)
    if isinstance(mine, list | tuple) and isinstance(theirs, list | tuple):
        return len(mine) == len(theirs) and all(_close(a, b) for a, b in zip(mine, theirs, strict=True))
    if isinstance(mine, float) or isinstance(theirs, float):
        return mine == pytest.approx(theirs, rel=1e-9, nan_ok=True)
    return mine == theirs


def test_a_router_that_stops_answering_makes_every_gate_error(router):
    client = RouterScrapeClient(router.target, auto_scrape=False, timeout=2.0)
    client.scrape(at=0.0)
    _serve(router)
    client.scrape(at=10.0)
    context = GateContext(EXPERIMENT, HALF, "5m")
    assert all(r.verdict is not Verdict.ERROR for r in evaluate_gates(BUILT_IN, client, context))
    router.close()
    outcome = client.scrape(at=20.0)
    assert "cannot reach router" in outcome[client.urls[0]] and client.errors
    results = evaluate_gates(BUILT_IN, client, context)
    assert [r.verdict for r in results] == [Verdict.ERROR] * len(BUILT_IN)
    assert all("cannot reach router" in r.message for r in results)
    client.close()


def test_an_unreachable_router_is_error_never_a_verdict():
    with RouterScrapeClient(f"127.0.0.1:{free_port()}", timeout=2.0) as client:  # auto-scrape on the first query
        results = evaluate_gates([*BUILT_IN, PROMQL], client, GateContext(EXPERIMENT, HALF, "5m"))
    assert [r.verdict for r in results] == [Verdict.ERROR] * (len(BUILT_IN) + 1)
    assert all("cannot reach router" in r.message for r in results[:-1])
    assert overall(results) is Verdict.ERROR


def test_no_data_is_inconclusive(router):
    context = GateContext(EXPERIMENT, HALF, "5m")
    with RouterScrapeClient(router.target, auto_scrape=False) as client:
        # Nothing scraped yet: no series at all.
        assert {r.verdict for r in evaluate_gates(BUILT_IN, client, context)} == {Verdict.INCONCLUSIVE}
        # One scrape is one sample per series: increase() needs two, as in Prometheus.
        _serve(router)
        client.scrape(at=0.0)
        assert {r.verdict for r in evaluate_gates(BUILT_IN, client, context)} == {Verdict.INCONCLUSIVE}
        # Another experiment's traffic is not this one's.
        client.scrape(at=10.0)
        other = GateContext("someone-else", HALF, "5m")
        assert {r.verdict for r in evaluate_gates(BUILT_IN, client, other)} == {Verdict.INCONCLUSIVE}


# --------------------------------------------------------------------------- registries behind a mock transport


class FakeRouters:
    """Routers by host, each a prometheus_client registry with the impressions counter; one can be made to fail."""

    def __init__(self, *hosts: str) -> None:
        self.registries: dict[str, CollectorRegistry] = {}
        self.counters: dict[str, Counter] = {}
        self.down: set[str] = set()
        self.requests = 0
        for host in hosts:
            self.restart(host)

    def restart(self, host: str) -> None:
        """A fresh process: every counter back at 0."""
        registry = CollectorRegistry()
        self.registries[host] = registry
        self.counters[host] = Counter(contract.IMPRESSIONS, "impressions", ("experiment", "arm"), registry=registry)
        for arm in ARMS:
            self.counters[host].labels("e", arm)

    def inc(self, host: str, arm: str, amount: float) -> None:
        self.counters[host].labels("e", arm).inc(amount)

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        host = request.url.host
        if host in self.down:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, content=generate_latest(self.registries[host]))


def _client(routers: FakeRouters, **kwargs) -> RouterScrapeClient:
    targets = [f"http://{host}:8000/metrics" for host in routers.registries]
    return RouterScrapeClient(targets, transport=httpx.MockTransport(routers.handler), **kwargs)


def _impressions(client: RouterScrapeClient, window: float = 3600, time: float | None = None) -> dict[str, float]:
    return {s.labels.get("arm", ""): s.value for s in client.query(queries.impressions_by_arm("e", window), time=time)}


def test_counter_resets_are_followed_as_prometheus_does():
    routers = FakeRouters("a")
    client = _client(routers, auto_scrape=False)
    client.scrape(at=0.0)
    routers.inc("a", "treatment", 500)
    client.scrape(at=10.0)
    routers.restart("a")  # the router restarts: its counter starts again from 0...
    routers.inc("a", "treatment", 100)
    client.scrape(at=20.0)
    routers.inc("a", "treatment", 200)
    client.scrape(at=30.0)
    # ...and the increase is 500 before the restart plus 300 after it.
    assert _impressions(client) == {"treatment": 800.0, "control": 0.0}
    assert counter_increase([(0, 0), (10, 500), (20, 100), (30, 300)]) == 800
    assert counter_increase([(0, 7)]) is None and counter_increase([]) is None


def test_windows_select_the_samples_and_routers_are_summed():
    routers = FakeRouters("a", "b")
    client = _client(routers, auto_scrape=False)
    for at, amount in ((0.0, 0), (100.0, 10), (200.0, 20)):
        routers.inc("a", "treatment", amount)
        routers.inc("b", "treatment", 2 * amount)
        client.scrape(at=at)
    assert _impressions(client) == {"treatment": 90.0, "control": 0.0}  # 30 from a, 60 from b
    assert _impressions(client, window=150) == {"treatment": 60.0, "control": 0.0}  # samples at 100 and 200
    assert _impressions(client, time=100.0) == {"treatment": 30.0, "control": 0.0}  # as of t=100
    assert _impressions(client, window=50) == {}  # one sample per series in the window: no increase


def test_one_router_down_is_error_and_reading_it_again_recovers():
    routers = FakeRouters("a", "b")
    client = _client(routers, auto_scrape=False)
    client.scrape(at=0.0)
    routers.down.add("b")
    outcome = client.scrape(at=10.0)
    assert outcome["http://a:8000/metrics"] is None and "connection refused" in outcome["http://b:8000/metrics"]
    with pytest.raises(PrometheusError, match="cannot reach router http://b:8000/metrics"):
        _impressions(client)
    routers.down.clear()
    client.scrape(at=20.0)
    assert _impressions(client) == {"treatment": 0.0, "control": 0.0}


def test_bad_answers_are_errors():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "broken":
            return httpx.Response(200, text="recops_impressions_total{arm=\"x\" 1\n")
        return httpx.Response(503, text="overloaded")

    client = RouterScrapeClient(["broken:1", "busy:1"], transport=httpx.MockTransport(handler), auto_scrape=False)
    errors = client.scrape(at=0.0)
    assert "do not parse" in errors["http://broken:1/metrics"]
    assert "HTTP 503" in errors["http://busy:1/metrics"]


def test_queries_scrape_on_demand_once_per_refresh():
    routers = FakeRouters("a")
    now = [0.0]
    client = _client(routers, clock=lambda: now[0], refresh_seconds=5.0)
    assert _impressions(client) == {}  # first query scrapes once: a single sample, no increase yet
    assert routers.requests == 1
    routers.inc("a", "control", 3)
    now[0] = 2.0
    assert _impressions(client) == {} and routers.requests == 1  # within the refresh: the same scrape
    now[0] = 5.0
    assert _impressions(client) == {"treatment": 0.0, "control": 3.0} and routers.requests == 2


def test_free_form_promql_needs_a_prometheus_server():
    client = _client(FakeRouters("a"), auto_scrape=False)
    with pytest.raises(PrometheusError, match="needs a Prometheus server") as raised:
        client.query('sum(increase(recops_impressions_total{experiment="e"}[1h]))')
    assert type(raised.value.query) is str
    # The text of a built-in query, edited, is no longer the built-in query.
    with pytest.raises(PrometheusError, match="needs a Prometheus server"):
        client.query(queries.impressions_by_arm("e", 60) + " > 0")


def test_scrapes_must_be_in_time_order_and_old_samples_can_be_dropped():
    routers = FakeRouters("a")
    client = _client(routers, auto_scrape=False, retention_seconds=100)
    client.scrape(at=0.0)
    client.scrape(at=50.0)
    with pytest.raises(ValueError, match="before the previous"):
        client.scrape(at=40.0)
    routers.inc("a", "treatment", 4)
    client.scrape(at=150.0)  # the sample at 0 is dropped, the one at 50 kept
    assert _impressions(client, window=10_000) == {"treatment": 4.0, "control": 0.0}
    client.scrape(at=400.0)  # only this scrape is left: one sample, no increase
    assert _impressions(client, window=10_000) == {}


# --------------------------------------------------------------------------- the structured queries


def test_structured_queries_render_the_text_prometheus_gets():
    promql = queries.requests_by_status('e"1', "control", 60)
    assert promql.structured == queries.CounterQuery(
        contract.REQUESTS, (("experiment", 'e"1'), ("arm", "control")), 60, ("status",)
    )
    assert promql == promql.structured.render()
    assert queries.structured(queries.latency_count("e", "a", 60)).by == ()
    assert queries.latency_quantile("e", "a", 60).structured.histogram == contract.LATENCY
    assert queries.structured("sum(up)") is None
    with pytest.raises(ValueError, match="window"):
        queries.CounterQuery(contract.USERS, (), 0)


@pytest.mark.parametrize(
    ("quantile", "buckets", "expected"),
    [
        (0.5, [(0.1, 10), (0.5, 90), (math.inf, 100)], 0.3),  # interpolated within (0.1, 0.5]
        (0.05, [(0.1, 10), (0.5, 90), (math.inf, 100)], 0.05),  # first bucket starts at 0
        (0.99, [(0.1, 10), (0.5, 90), (math.inf, 100)], 0.5),  # in +Inf: the highest finite bound
        (0.5, [(0.5, 90), (0.1, 10), (math.inf, 100)], 0.3),  # order does not matter
        (0.5, [(0.1, 10), (0.5, 90)], math.nan),  # no +Inf bucket
        (0.5, [(0.1, 0), (math.inf, 0)], math.nan),  # no observations
        (0.5, [(math.inf, 5)], math.nan),  # a single bucket
        (0.5, [(0.1, 60), (0.5, 40), (math.inf, 100)], 0.1 * 50 / 60),  # non-monotone counts are raised first
    ],
)
def test_bucket_quantile_follows_prometheus(quantile, buckets, expected):
    value = bucket_quantile(quantile, buckets)
    assert (math.isnan(value) and math.isnan(expected)) or value == pytest.approx(expected)
