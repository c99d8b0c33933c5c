"""PromQL builders (escaping, windows) and the Prometheus client's error handling, over a mock transport."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from recops.experiments import queries
from recops.experiments.prometheus import PrometheusClient, PrometheusError, parse_value
from recops.serving import contract

# --------------------------------------------------------------------------- queries


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        ("plain", '"plain"'),
        ('say "hi"', r'"say \"hi\""'),
        ("back\\slash", r'"back\\slash"'),
        ("two\nlines", r'"two\nlines"'),
        ("tab\tand\x01", r'"tab\tand\u0001"'),
        ("café", '"café"'),
        ('"} or up{x="', r'"\"} or up{x=\""'),  # an injection attempt stays inside the string
    ],
)
def test_label_values_are_escaped(value, literal):
    assert queries.label_value(value) == literal
    assert json.loads(queries.label_value(value)) == value  # and decode back exactly


def _exact_count(selector: str, window: str, by: str) -> str:
    ranged = f"{selector}[{window}]"
    return (f"sum by ({by}) (((max_over_time({ranged}) - min_over_time({ranged})) unless resets({ranged}) > 0)"
            f" or increase({ranged}))")


def test_count_queries_are_exact_differences_summed_by_arm_with_increase_only_across_resets():
    assert queries.impressions_by_arm('e"1', 3600) == _exact_count(
        f'{contract.IMPRESSIONS}{{experiment="e\\"1"}}', "3600s", "arm"
    )
    assert queries.feedback_by_arm("e", "click", 90) == _exact_count(
        f'{contract.FEEDBACK}{{experiment="e",event="click"}}', "90s", "arm"
    )
    with pytest.raises(ValueError, match="event must be one of"):
        queries.feedback_by_arm("e", "view", 90)


def test_latency_and_error_queries():
    assert queries.latency_quantile("e", "treatment", 300) == (
        "histogram_quantile(0.99, sum by (le) "
        f'(rate({contract.LATENCY}_bucket{{experiment="e",arm="treatment"}}[300s])))'
    )
    assert queries.requests_by_status("e", "control", 60) == _exact_count(
        f'{contract.REQUESTS}{{experiment="e",arm="control"}}', "60s", "status"
    )
    assert "bad_request" not in queries.ATTEMPT_STATUSES and "overloaded" not in queries.ATTEMPT_STATUSES


@pytest.mark.parametrize(("seconds", "text"), [(300, "300s"), (1.5, "1500ms"), (0.001, "1ms"), (7200.0, "7200s")])
def test_durations(seconds, text):
    assert queries.duration(seconds) == text


@pytest.mark.parametrize("seconds", [0, -5, math.nan, math.inf, 0.0001, True])
def test_bad_durations(seconds):
    with pytest.raises(ValueError):
        queries.duration(seconds)


def test_template_placeholders_are_filled_and_escaped():
    template = 'sum(rate(x{experiment="$experiment",arm="$arm"}[$window])) / $windowish'
    rendered = queries.render_template(template, 'a"b', "tr\\t", 120)
    # $windowish is not a placeholder (the spec refuses it; here it is left alone).
    assert rendered == 'sum(rate(x{experiment="a\\"b",arm="tr\\\\t"}[120s])) / $windowish'


# --------------------------------------------------------------------------- client


def _client(handler, **kwargs) -> PrometheusClient:
    return PrometheusClient("http://prom.test:9090/prefix", transport=httpx.MockTransport(handler), **kwargs)


def _ok(result_type, result):
    return httpx.Response(200, json={"status": "success", "data": {"resultType": result_type, "result": result}})


def test_vector_values_including_nan_and_infinities():
    seen = {}

    def handler(request):
        seen["url"] = str(request.url)
        seen["body"] = request.content.decode()
        return _ok(
            "vector",
            [
                {"metric": {"arm": "a"}, "value": [1700000000.5, "12.5"]},
                {"metric": {"arm": "b"}, "value": [1700000000.5, "NaN"]},
                {"metric": {"arm": "c"}, "value": [1700000000.5, "+Inf"]},
                {"metric": {"arm": "d"}, "value": [1700000000.5, "-Inf"]},
            ],
        )

    samples = _client(handler).query("up", time=1700000000.5)
    assert seen["url"] == "http://prom.test:9090/prefix/api/v1/query"
    assert "query=up" in seen["body"] and "time=1700000000.500" in seen["body"]
    assert [s.labels["arm"] for s in samples] == ["a", "b", "c", "d"]
    assert samples[0].value == 12.5 and samples[0].timestamp == 1700000000.5
    assert math.isnan(samples[1].value)
    assert samples[2].value == math.inf and samples[3].value == -math.inf


def test_scalar_and_empty_vector():
    assert _client(lambda r: _ok("scalar", [1.0, "3"])).query("scalar(1)")[0].value == 3.0
    assert _client(lambda r: _ok("vector", [])).query("absent_metric") == []


@pytest.mark.parametrize(
    ("response", "cause"),
    [
        (
            httpx.Response(400, json={"status": "error", "errorType": "bad_data", "error": "parse error at char 5"}),
            "HTTP 400, bad_data: parse error at char 5",
        ),
        (
            httpx.Response(503, json={"status": "error", "errorType": "timeout", "error": "query timed out"}),
            "timeout: query timed out",
        ),
        (httpx.Response(502, text="<html>bad gateway</html>"), "HTTP 502"),
        (httpx.Response(200, text="not json"), "not a JSON object"),
        (httpx.Response(200, json={"status": "success"}), "no 'data' object"),
        (httpx.Response(200, json={"status": "weird", "data": {}}), "status is 'weird'"),
        (_ok("matrix", []), "expected an instant vector or a scalar, got a matrix"),
        (_ok("vector", [{"metric": {}, "value": [1, "twelve"]}]), "malformed response"),
        (_ok("vector", [{"metric": {}, "value": [1, 12]}]), "malformed response"),  # values are strings
        (_ok("vector", [{"metric": {"a": 1}, "value": [1, "1"]}]), "malformed response"),
        (_ok("vector", [{"metric": {}}]), "malformed response"),
        (_ok("vector", {"not": "a list"}), "malformed response"),
        (_ok("histogram", []), "unknown resultType"),
    ],
)
def test_every_failure_raises_prometheus_error_naming_query_and_cause(response, cause):
    with pytest.raises(PrometheusError) as error:
        _client(lambda r: response).query("my_query")
    assert error.value.query == "my_query"
    assert "my_query" in str(error.value) and cause in str(error.value)


def test_timeouts_and_unreachable_servers():
    def slow(request):
        raise httpx.ReadTimeout("read timed out", request=request)

    with pytest.raises(PrometheusError, match=r"timed out after 2s"):
        _client(slow, timeout=2).query("q")

    def refused(request):
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(PrometheusError, match=r"cannot reach http://prom\.test:9090/prefix"):
        _client(refused).query("q")


def test_query_range():
    def handler(request):
        assert request.url.path.endswith("/api/v1/query_range")
        return _ok("matrix", [{"metric": {"arm": "a"}, "values": [[1, "1"], [2, "NaN"]]}])

    series = _client(handler).query_range("x", start=0, end=10, step=1)
    assert series[0].labels == {"arm": "a"} and series[0].points[0] == (1.0, 1.0)
    assert math.isnan(series[0].points[1][1])
    with pytest.raises(PrometheusError, match="expected a matrix"):
        _client(lambda r: _ok("vector", [])).query_range("x", start=0, end=10, step=1)


def test_values_and_constructor_checks():
    assert parse_value("1e3") == 1000.0
    for bad in ("nan", "inf", "", None, 5):
        with pytest.raises(ValueError):
            parse_value(bad)
    with pytest.raises(ValueError, match="URL"):
        PrometheusClient("prometheus:9090")
    with pytest.raises(ValueError, match="timeout"):
        PrometheusClient("http://p:9090", timeout=0)
