"""The Grafana dashboard and the alerting rules (recops.monitoring), checked against real Prometheus data.

* The committed files in helm/recops/files are exactly a fresh render.
* The dashboard round-trips through grafana-foundation-sdk's own models, and keeps its structural
  invariants (ids, data sources, targets, grid, variables).
* The rules pass ``promtool check rules``.
* End to end: a real router (``recops serve router``) in front of a real Triton, and the operator's
  metrics from :class:`~recops.operator.metrics.OperatorMetrics`, scraped by a real Prometheus that
  also evaluates the rules. Users get recommendations, click, like and buy; then every panel's PromQL,
  with the dashboard variables substituted as Grafana would, returns data, and the alerts the
  operator's state calls for are pending or firing.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from grafana_foundation_sdk.cog import plugins as cogplugins
from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as sdk_dashboard
from grafana_foundation_sdk.models import prometheus as sdk_prometheus
from prometheus_client import CollectorRegistry, start_http_server

from recops.api.recexperiment import RecExperimentSpec
from recops.experiments.prometheus_server import poll
from recops.experiments.routing import CONTROL, TREATMENT, router_config
from recops.monitoring import alerts, render
from recops.monitoring.dashboard import dashboard, panel_queries, substitute, variables_used
from recops.operator.metrics import OperatorMetrics
from recops.serving import contract
from recops.serving.processes import free_port
from recops.serving.router.process import RouterProcess

REPO = Path(__file__).resolve().parents[1]
FILES = REPO / "helm" / "recops" / "files"

NAMESPACE, EXPERIMENT = "demo", "ranker-v2-vs-v1"
RECMODELS = ("ranker-v1", "ranker-v2")
# What Grafana sends Prometheus: a multi-value variable set to All becomes a regex of every value.
VALUES = {
    "namespace": NAMESPACE,
    "experiment": EXPERIMENT,
    "recmodel": f"({'|'.join(RECMODELS)})",
    "window": "1m",
    "__rate_interval": "1m",
}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__range_s", "__interval_ms"}
USERS = 240


# --------------------------------------------------------------------------- committed files


def test_committed_files_are_a_fresh_render():
    for name, content in render.rendered().items():
        path = FILES / name
        assert path.is_file(), f"{path} missing: run python -m recops.monitoring.render --out helm/recops/files"
        assert path.read_text(encoding="utf-8") == content, (
            f"{path} is stale: run python -m recops.monitoring.render --out helm/recops/files")


def test_render_writes_both_files(tmp_path):
    assert render.main(["--out", str(tmp_path / "files")]) == 0
    written = {path.name: path.read_text(encoding="utf-8") for path in (tmp_path / "files").iterdir()}
    assert written == render.rendered()
    assert json.loads(written[render.DASHBOARD_FILE]) == dashboard()
    assert yaml.safe_load(written[render.RULES_FILE]) == alerts.prometheus_rules()


# --------------------------------------------------------------------------- the dashboard's structure


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for panel in board["panels"] for p in (panel, *panel.get("panels", []))]


def test_dashboard_round_trips_through_the_sdk_models():
    """Decoding with the SDK's models and encoding again loses nothing: every field is one the schema knows.

    With the SDK's panel and query plugins registered, panel options, custom field config and targets
    decode into their typed models (timeseries, state-timeline, stat, table; Prometheus queries), which
    keep only the fields the schema defines.
    """
    cogplugins.register_default_plugins()
    board = dashboard()
    decoded = sdk_dashboard.Dashboard.from_json(board)
    assert json.loads(json.dumps(decoded, cls=JSONEncoder)) == board
    for panel in decoded.panels:
        if isinstance(panel, sdk_dashboard.RowPanel):
            continue
        assert cogruntime.panelcfg_config(panel.type_val) is not None, f"unknown panel type {panel.type_val}"
        assert panel.targets and all(isinstance(t, sdk_prometheus.Dataquery) for t in panel.targets), panel.title


def test_dashboard_structure():
    board = dashboard()
    panels = _panels(board)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["y"] >= 0 and grid["w"] > 0 and grid["h"] > 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']} overflows the 24 columns"
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert all(value is not None for value in panel.values()), f"{panel['title']} has a null field"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel.get("targets"), f"{panel['title']} has no target"
        assert all(target.get("expr", "").strip() for target in panel["targets"]), panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]

    defined = {variable["name"] for variable in board["templating"]["list"]}
    assert {"datasource", "namespace", "experiment", "recmodel", "window"} <= defined
    used: set[str] = set()
    texts = [expr for _, expr in panel_queries(board)]
    texts += [variable.get("query", "") for variable in board["templating"]["list"] if variable["type"] == "query"]
    texts += [json.dumps(panel.get("datasource", {})) for panel in panels]
    for text in texts:
        used |= variables_used(text)
    assert used - GRAFANA_BUILTINS <= defined, f"undefined variables: {used - GRAFANA_BUILTINS - defined}"
    assert defined <= used, f"variables no panel uses: {defined - used}"
    assert board["uid"] == "recops-experiments"


def test_panel_list():
    titles = [title for title, _ in panel_queries(dashboard())]
    for wanted in ("CTR per arm", "Like rate per arm", "Page views per user", "GMV per user", "p99 latency per arm",
                   "Error rate per arm", "Traffic weight", "Gate verdicts", "Experiment phase", "RecModel phase",
                   "Training metrics per revision", "Triton requests per second"):
        assert wanted in titles
    # Each interval panel draws the estimate and both bounds.
    for title in ("CTR per arm", "Like rate per arm", "GMV per user"):
        assert titles.count(title) == 3


def test_substitute_refuses_unknown_variables():
    assert substitute("rate(x[$__rate_interval]) * ${window}", {"__rate_interval": "5m", "window": "1h"}) == (
        "rate(x[5m]) * 1h")
    with pytest.raises(KeyError):
        substitute("x{a=\"$nope\"}", VALUES)


# --------------------------------------------------------------------------- the rules


def test_rules_shape():
    groups = alerts.prometheus_rules()["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["alert"] for rule in rules} == {
        "RecExperimentRolledBack", "RecExperimentGateError", "TritonUnavailable", "RecModelTrainingFailed",
        "RecopsOperatorReconcileErrors"}
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    manifest = alerts.prometheus_rule("recops", "monitoring", {"release": "kube-prometheus-stack"})
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1" and manifest["kind"] == "PrometheusRule"
    assert manifest["spec"] == alerts.prometheus_rules()


def test_rules_pass_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("RECOPS_REQUIRE_PROMETHEUS") == "1":
            pytest.fail("RECOPS_REQUIRE_PROMETHEUS=1 but no promtool on PATH (Debian's prometheus package ships it)")
        pytest.skip("no promtool (Debian's prometheus package ships it)")
    path = tmp_path / "rules.yaml"
    path.write_text(render.render_rules_yaml())
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- end to end


def _operator_metrics() -> tuple[OperatorMetrics, Any]:
    """The operator's gauges for a running experiment, a rolled-back one, a Ready and a Failed RecModel."""
    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    metrics.experiment(NAMESPACE, EXPERIMENT, {
        "phase": "Progressing", "weight": 30, "currentStep": 1,
        "gates": {
            "sampleRatio": {"verdict": "Successful", "value": 0.41},
            "ctrLift": {"verdict": "Inconclusive", "value": 0.03},
            "latencyP99": {"verdict": "Error"},
        },
    })
    metrics.experiment(NAMESPACE, "ranker-v1-vs-v0", {"phase": "RolledBack", "weight": 0, "currentStep": 0})
    metrics.model(NAMESPACE, "ranker-v2", {"phase": "Ready", "revision": "3f9a0c1d2e",
                                           "metrics": {"recall@20": 0.31, "ndcg@10": 0.17}})
    metrics.model(NAMESPACE, "ranker-v1", {"phase": "Failed", "revision": "0b1c2d3e4f",
                                           "metrics": {"recall@20": 0.22, "ndcg@10": 0.12}})
    for kind in ("RecModel", "RecExperiment"):
        metrics.reconcile_errors.labels(kind)  # at 0 from the first scrape, so that rate() sees the errors
        metrics.reconcile_seconds.labels(kind).observe(0.02)
    return metrics, registry


def _prometheus_config(interval: str, rules: Path, router: str, operator: str, triton: str, dead: str) -> str:
    """Target labels as the prometheus-operator's ServiceMonitors set them (job = Service name, namespace).

    The operator's own ``namespace`` label names the resource, so its job honours exposed labels
    (``honor_labels``), as its ServiceMonitor must (``honorLabels: true``).
    """
    def job(name: str, target: str, namespace: str, honor: bool = False) -> dict[str, Any]:
        return {"job_name": name, "honor_labels": honor,
                "static_configs": [{"targets": [target], "labels": {"namespace": namespace}}]}

    config = {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "rule_files": [str(rules)],
        "scrape_configs": [
            job(f"{EXPERIMENT}-router", router, NAMESPACE),
            job("recops-operator", operator, "recops-system", honor=True),
            job("ranker-v2-triton", triton, NAMESPACE),
            job("ranker-v1-triton", dead, NAMESPACE),  # nothing listens: a Triton that is down
        ],
    }
    return yaml.safe_dump(config, sort_keys=False)


def _drive(url: str, rng: random.Random) -> dict[str, int]:
    """USERS users: recommendations (some twice), clicks, likes and purchases. Returns requests per arm."""
    requests = {TREATMENT: 0, CONTROL: 0}
    with httpx.Client(base_url=url, timeout=30) as client:
        for n in range(USERS):
            user = f"user-{n}"
            events = []
            for _ in range(1 + (n % 3 == 0)):
                response = client.post("/v1/recommend", json={"user_id": user, "k": 5})
                assert response.status_code == 200, response.text
                answer = response.json()
                requests[answer["arm"]] += 1
                for item in answer["items"]:
                    base = {"user_id": user, "item_id": item["item_id"], "request_id": answer["request_id"]}
                    if rng.random() < 0.2:
                        events.append({**base, "event": "click"})
                    if rng.random() < 0.1:
                        events.append({**base, "event": "like"})
                    if rng.random() < 0.05:
                        events.append({**base, "event": "purchase", "value": round(rng.uniform(5, 120), 2)})
            if events:
                response = client.post("/v1/feedback", json={"events": events})
                assert response.status_code == 202, response.text
    return requests


@pytest.fixture(scope="module")
def live(tiny_triton, prometheus_factory, tmp_path_factory):
    """A Prometheus that has scraped a router (with real traffic), Triton and the operator, and loaded the rules."""
    work = tmp_path_factory.mktemp("monitoring")
    spec = RecExperimentSpec.model_validate({
        "control": {"model": RECMODELS[0]}, "treatment": {"model": RECMODELS[1]},
        "assignment": {"salt": "monitoring"}, "steps": [{"weight": 30, "pause": "5m"}],
        "gates": [{"type": "sampleRatio"}], "prometheus": {"url": "http://127.0.0.1:9090"},
    })
    endpoints = {TREATMENT: tiny_triton.grpc_url, CONTROL: tiny_triton.grpc_url}
    config = router_config(EXPERIMENT, spec, 3000, endpoints, str(work / "feedback" / "feedback.jsonl"),
                           {"upstreamTimeoutSeconds": 10})
    (work / "router.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    router = RouterProcess(work / "router.yaml", free_port(), work / "router.log")
    operator, registry = _operator_metrics()
    operator_port = free_port()
    server, _ = start_http_server(operator_port, addr="127.0.0.1", registry=registry)
    try:
        router.wait_ready()
        prometheus = prometheus_factory([])  # scrapes nothing until the config below is loaded
        rules = prometheus.workdir / "rules.yaml"
        rules.write_text(render.render_rules_yaml())
        (prometheus.workdir / "prometheus.yml").write_text(_prometheus_config(
            prometheus.scrape_interval, rules, router.url.removeprefix("http://"), f"127.0.0.1:{operator_port}",
            tiny_triton.metrics_url.removeprefix("http://").removesuffix("/metrics"), f"127.0.0.1:{free_port()}"))
        os.kill(prometheus.process.pid, signal.SIGHUP)  # reload: the documented way to change a running config
        # The router's series were created at 0 when it loaded its config: scraped once before any traffic,
        # so that increase() counts every event.
        poll(lambda: prometheus.query(f'{contract.ASSIGNMENTS}{{namespace="{NAMESPACE}"}} == 0'), 20,
             "the router's zero series under the reloaded config")
        poll(lambda: prometheus.query('up{job="recops-operator"} == 1'), 20, "the operator's metrics")
        requests = _drive(router.url, random.Random(7))
        for kind in ("RecModel", "RecExperiment"):
            operator.reconcile_errors.labels(kind).inc(3)
            operator.reconcile_seconds.labels(kind).observe(0.2)
        total = f'sum({contract.ASSIGNMENTS}{{namespace="{NAMESPACE}"}})'
        poll(lambda: prometheus.values_by(total, "") == {"": float(sum(requests.values()))}, 20,
             f"{total} == {sum(requests.values())}")
        yield prometheus, requests
    finally:
        router.stop()
        server.shutdown()
        server.server_close()


QUERIES = panel_queries(dashboard())


def _query(prometheus: Any, promql: str) -> list[dict[str, Any]]:
    """The instant query's series; a query Prometheus refuses (parse error) fails at once, never retried."""
    response = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": promql}, timeout=10)
    if response.status_code == 400:
        raise AssertionError(f"Prometheus refused {promql}: {response.json().get('error')}")
    response.raise_for_status()
    return response.json()["data"]["result"]


def _finite(series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in series if math.isfinite(float(s["value"][1]))]


@pytest.mark.parametrize(("title", "expr"), QUERIES, ids=[f"{i:02d}-{t}" for i, (t, _) in enumerate(QUERIES)])
def test_every_panel_query_returns_data(live, title, expr):
    prometheus, _ = live
    query = substitute(expr, VALUES)
    # Scrapes of Triton and the operator run on their own schedule: give the last ones a moment.
    series = poll(lambda: _finite(_query(prometheus, query)), 15, f"data for {title}: {query}")
    assert series


def test_panels_show_what_happened(live):
    """Spot checks of the values: arms, the sample split, verdict codes, the training metrics matrix."""
    prometheus, _ = live
    by_title: dict[str, list[str]] = {}
    for title, expr in QUERIES:
        by_title.setdefault(title, []).append(substitute(expr, VALUES))

    ctr, low, high = (prometheus.values_by(q, "arm") for q in by_title["CTR per arm"])
    assert set(ctr) == {TREATMENT, CONTROL}
    for arm in ctr:
        assert 0 <= low[arm] < ctr[arm] < high[arm] <= 1, (arm, low[arm], ctr[arm], high[arm])
        assert 0.1 < ctr[arm] < 0.3  # clicked with probability 0.2 per item shown
    gmv, gmv_low, gmv_high = (prometheus.values_by(q, "arm") for q in by_title["GMV per user"])
    assert all(gmv_low[arm] < gmv[arm] < gmv_high[arm] for arm in gmv)
    views = prometheus.values_by(by_title["Page views per user"][0], "arm")
    assert all(1.1 < value < 1.6 for value in views.values()), views  # one user in three asks twice

    verdicts = prometheus.values_by(by_title["Gate verdicts"][0], "gate")
    assert verdicts == {"sampleRatio": 1.0, "ctrLift": 3.0, "latencyP99": 4.0}  # Successful, Inconclusive, Error
    phases = prometheus.values_by(by_title["RecModel phase"][0], "recmodel")
    assert phases == {"ranker-v1": 5.0, "ranker-v2": 4.0}  # Failed, Ready
    rows = prometheus.query(by_title["Training metrics per revision"][0])
    assert {(r["metric"]["model_revision"], r["metric"]["metric"]) for r in rows} == {
        (f"{model}@{revision}", metric)
        for model, revision in (("ranker-v2", "3f9a0c1d2e"), ("ranker-v1", "0b1c2d3e4f"))
        for metric in ("recall@20", "ndcg@10")}
    configured, observed = by_title["Traffic weight"]
    assert prometheus.values_by(configured, "experiment") == {EXPERIMENT: 30.0}
    share = prometheus.values_by(observed, "arm")
    assert 15 < share[TREATMENT] < 45 and math.isclose(share[TREATMENT] + share[CONTROL], 100)
    up = prometheus.values_by(by_title["Triton targets up"][0], "job")
    assert up == {"ranker-v2-triton": 1.0, "ranker-v1-triton": 0.0}
    triton_success = prometheus.values_by(by_title["Triton requests per second"][0], "job")
    assert triton_success["ranker-v2-triton"] > 0


def test_alerts_follow_the_operator_state(live):
    """The rules, loaded by the same Prometheus: what the state calls for is pending or firing, nothing else."""
    prometheus, _ = live
    wanted = {
        ("RecExperimentRolledBack", "firing"), ("RecModelTrainingFailed", "firing"),
        ("RecExperimentGateError", "pending"), ("TritonUnavailable", "pending"),
        ("RecopsOperatorReconcileErrors", "pending"),
    }

    def active() -> list[dict[str, Any]] | None:
        body = httpx.get(f"{prometheus.url}/api/v1/alerts", timeout=5).json()
        alerts_now = body["data"]["alerts"]
        seen = {(a["labels"]["alertname"], a["state"]) for a in alerts_now}
        return alerts_now if wanted <= seen else None

    found = poll(active, 20, f"alerts {sorted(wanted)}")
    by_name: dict[str, list[dict[str, Any]]] = {}
    for alert in found:
        by_name.setdefault(alert["labels"]["alertname"], []).append(alert)
    assert set(by_name) == {name for name, _ in wanted}
    assert [a["labels"]["experiment"] for a in by_name["RecExperimentRolledBack"]] == ["ranker-v1-vs-v0"]
    assert [a["labels"]["recmodel"] for a in by_name["RecModelTrainingFailed"]] == ["ranker-v1"]
    assert [(a["labels"]["gate"], a["labels"]["namespace"]) for a in by_name["RecExperimentGateError"]] == [
        ("latencyP99", NAMESPACE)]
    # Only the dead target: the router's arms are answered, so the router-side rule stays quiet.
    assert [(a["labels"]["job"], a["labels"]["detected_by"]) for a in by_name["TritonUnavailable"]] == [
        ("ranker-v1-triton", "scrape")]
    assert {a["labels"]["kind"] for a in by_name["RecopsOperatorReconcileErrors"]} == {"RecModel", "RecExperiment"}
    for alert in found:
        assert "{{" not in alert["annotations"]["summary"] + alert["annotations"]["description"]
        assert alert["labels"]["severity"] in {"warning", "critical"}
