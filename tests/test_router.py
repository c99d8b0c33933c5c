"""The router's HTTP API over the real tiny model: recommendations, sticky arms, metrics, refusals."""

from __future__ import annotations

import polars as pl
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from _router import metric, router_config, serving, write_config
from recops.cli import app as cli_app
from recops.serving.assignment import ArmWeights, assign
from recops.serving.ranker import Ranker
from recops.serving.router.schemas import RecommendResponse

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


@pytest.fixture(scope="module")
def model(tiny_model):
    data, _, model_dir = tiny_model
    return data, model_dir, Ranker.load(model_dir)


def _histories(data, n):
    histories = []
    for user in range(data.n_users):
        rows = data.train.filter(pl.col("user_idx") == user).sort("timestamp", "item_idx")
        if rows.height:
            histories.append([data.items["item_id"][i] for i in rows["item_idx"].to_list()][-10:])
        if len(histories) == n:
            return histories
    return histories


@pytest.fixture
def config_path(model, tmp_path):
    _, model_dir, _ = model
    return write_config(tmp_path / "router.yaml", router_config(model_dir, tmp_path))


async def test_recommendations_are_the_rankers(model, config_path):
    data, _, ranker = model
    item_ids = data.items["item_id"].to_list()
    async with serving(config_path) as (_, client):
        request_ids = set()
        for user, history in enumerate(_histories(data, 8)):
            response = await client.post("/v1/recommend", json={"user_id": f"u{user}", "history": history, "k": 7})
            assert response.status_code == 200, response.text
            body = RecommendResponse.model_validate_json(response.content)
            (expected,) = ranker.recommend([history], k=7)
            assert [item.item_id for item in body.items] == expected.item_ids
            assert [item.score for item in body.items] == pytest.approx(expected.scores.tolist(), abs=1e-5)
            assert [item.click for item in body.items] == pytest.approx(expected.click.tolist(), abs=1e-5)
            assert body.experiment == "exp" and body.arm in ("treatment", "control")
            request_ids.add(body.request_id)
        assert len(request_ids) == 8

        pool = item_ids[:6]
        response = await client.post("/v1/recommend", json={"user_id": "x", "candidates": pool, "k": 3})
        assert response.status_code == 200
        (expected,) = ranker.recommend([[]], k=3, candidates=pool)
        assert [item["item_id"] for item in response.json()["items"]] == expected.item_ids

        default_k = await client.post("/v1/recommend", json={"user_id": "new-user"})
        assert len(default_k.json()["items"]) == 10


async def test_assignment_is_sticky_and_follows_the_weights(config_path):
    weights = ArmWeights(arms=[("treatment", 3000), ("control", 7000)])
    users = [f"user-{n}" for n in range(500)]
    async with serving(config_path) as (_, client):
        arms = {}
        for user in users:
            response = await client.post("/v1/recommend", json={"user_id": user, "k": 1})
            arms[user] = response.json()["arm"]
        assert arms == {user: assign("salt", user, weights) for user in users}
        share = sum(arm == "treatment" for arm in arms.values()) / len(users)
        assert abs(share - 0.3) < 0.07  # 3.4 standard errors at n=500
        for user in users[:20]:  # sticky
            again = await client.post("/v1/recommend", json={"user_id": user, "k": 1})
            assert again.json()["arm"] == arms[user]

        forced = await client.post("/v1/recommend", json={"user_id": users[0], "k": 1, "arm": "treatment"})
        assert forced.status_code == 200 and forced.json()["arm"] == "treatment"
        unknown = await client.post("/v1/recommend", json={"user_id": users[0], "arm": "nope"})
        assert unknown.status_code == 422
        assert unknown.json()["fields"] == ["arm"] and "nope" in unknown.json()["error"]


async def test_metrics_count_requests_impressions_users_and_feedback(config_path):
    weights = ArmWeights(arms=[("treatment", 3000), ("control", 7000)])
    users = [f"m{n}" for n in range(30)]
    async with serving(config_path) as (_, client):
        for user in users + users[:10]:  # ten users come back: 40 requests, 30 distinct users
            assert (await client.post("/v1/recommend", json={"user_id": user, "k": 4})).status_code == 200
        await client.post("/v1/recommend", json={"user_id": users[0], "k": 2, "arm": "treatment"})  # forced
        await client.post("/v1/recommend", content=b"not json")  # refused before any arm
        await client.post("/v1/recommend", json={"user_id": users[0], "k": 999})  # refused after assignment
        feedback = [
            {"user_id": users[0], "item_id": "i1", "event": "click"},
            {"user_id": users[0], "item_id": "i1", "event": "like"},
            {"user_id": users[0], "item_id": "i1", "event": "purchase", "value": 3.0},
            {"user_id": users[1], "item_id": "i2", "event": "purchase", "value": 4.0, "arm": "treatment"},
            {"user_id": users[1], "item_id": "i2", "event": "cart", "arm": "control"},
        ]
        assert (await client.post("/v1/feedback", json={"events": feedback})).status_code == 202
        text = (await client.get("/metrics")).text

    arm_of = {user: assign("salt", user, weights) for user in users}
    visits = [arm_of[u] for u in users + users[:10]]
    a0, a1 = arm_of[users[0]], arm_of[users[1]]
    for arm in ("treatment", "control"):
        labels = {"experiment": "exp", "arm": arm}
        forced = int(arm == "treatment")
        ok = visits.count(arm) + forced
        assert metric(text, "recops_router_requests_total", status="ok", **labels) == ok
        assert metric(text, "recops_assignments_total", **labels) == visits.count(arm)
        assert metric(text, "recops_assigned_users_total", **labels) == sum(a == arm for a in arm_of.values())
        assert metric(text, "recops_impressions_total", **labels) == 4 * visits.count(arm) + 2 * forced
        assert metric(text, "recops_router_request_duration_seconds_count", **labels) == ok
        assert metric(text, "recops_router_requests_total", status="bad_request", **labels) == int(arm == a0)
        expected_clicks = int(arm == a0)
        assert metric(text, "recops_feedback_events_total", event="click", **labels) == expected_clicks
        assert metric(text, "recops_feedback_events_total", event="cart", **labels) == int(arm == "control")
        value = 3.0 * (arm == a0) + 4.0 * (arm == "treatment")
        assert metric(text, "recops_purchase_value_total", **labels) == value
        assert metric(text, "recops_purchase_value_squared_total", **labels) == 9.0 * (arm == a0) + 16.0 * (
            arm == "treatment")
    assert a1 in ("treatment", "control")
    assert metric(text, "recops_router_requests_total", experiment="exp", arm="none", status="bad_request") == 1
    unassigned = [(sample.name, sample.labels.get("status")) for family in text_string_to_metric_families(text)
                  for sample in family.samples if sample.labels.get("arm") == "none"]
    # Only this series has arm="none": per-arm sums the gates take (users, impressions) stay over real arms.
    assert [name for name in unassigned if not name[0].endswith("_created")] == [
        ("recops_router_requests_total", "bad_request")]
    assert metric(text, "recops_router_config_info", experiment="exp") == 1
    assert 'le="0.001"' in text and 'le="2.5"' in text


BAD_INPUTS = [
    # (body, status, field named in the answer)
    (b"not json", 400, "body"),
    (b"", 400, "body"),
    (b"[1, 2]", 422, "body"),
    (b"{}", 422, "user_id"),
    (b'{"user_id": 42}', 422, "user_id"),
    (b'{"user_id": ""}', 422, "user_id"),
    (b'{"user_id": "u", "k": "10"}', 422, "k"),
    (b'{"user_id": "u", "k": 2.5}', 422, "k"),
    (b'{"user_id": "u", "k": 0}', 422, "k"),
    (b'{"user_id": "u", "k": 21}', 422, "k"),  # maxK is 20
    (b'{"user_id": "u", "history": "i1"}', 422, "history"),
    (b'{"user_id": "u", "history": [1]}', 422, "history[0]"),
    (b'{"user_id": "u", "history": [' + b", ".join([b'"x"'] * 31) + b"]}", 422, "history"),  # maxHistory 30
    (b'{"user_id": "u", "history": ["no-such-item"]}', 422, "history"),  # the model refuses it
    (b'{"user_id": "u", "candidates": ["nope"]}', 422, "candidates"),
    (b'{"user_id": "u", "candidates": []}', 422, "candidates"),
    (b'{"user_id": "u", "arm": "nope"}', 422, "arm"),
    (b'{"user_id": "u", "colour": "red"}', 422, "colour"),
    (b'{"user_id": "u", "device": ""}', 422, "device"),
    (b'{"user_id": "u", "device": 7}', 422, "device"),
    (b'{"user_id": "' + b"u" * 5000 + b'"}', 413, "body"),  # maxBodyBytes is 4096
]

BAD_FEEDBACK = [
    (b"nope", 400, "body"),
    (b"{}", 422, "user_id"),
    (b'{"user_id": "u", "item_id": "i"}', 422, "event"),
    (b'{"user_id": "u", "item_id": "i", "event": "impression"}', 422, "event"),
    (b'{"user_id": "u", "item_id": "i", "event": "purchase", "value": -1}', 422, "value"),
    (b'{"user_id": "u", "item_id": "i", "event": "purchase", "value": "3"}', 422, "value"),
    (b'{"user_id": "u", "item_id": "i", "event": "click", "value": 3}', 422, "value"),
    (b'{"user_id": "u", "item_id": "i", "event": "click", "timestamp": -5}', 422, "timestamp"),
    (b'{"user_id": "u", "item_id": "i", "event": "click", "arm": "nope"}', 422, "arm"),
    (b'{"user_id": "u", "item_id": "i", "event": "click", "device": "' + b"d" * 129 + b'"}', 422, "device"),
    (b'{"events": []}', 422, "events"),
    (b'{"events": [{"user_id": "u", "item_id": "i", "event": "click"}, {"user_id": "u"}]}', 422, "events[1].item_id"),
    (b'{"events": [{"user_id": "u", "item_id": "i", "event": "click", "arm": "x"}]}', 422, "events[0].arm"),
]


async def test_every_bad_input_is_4xx_naming_the_field(config_path):
    failures = []
    async with serving(config_path) as (_, client):
        for path, cases in (("/v1/recommend", BAD_INPUTS), ("/v1/feedback", BAD_FEEDBACK)):
            for body, status, field in cases:
                response = await client.post(path, content=body, headers={"content-type": "application/json"})
                answer = response.json()
                if response.status_code != status or field not in answer["fields"] or field not in answer["error"]:
                    failures.append((path, body[:80], response.status_code, answer))
        async def chunks():
            for chunk in (b'{"user_id": "', b"u" * 5000, b'"}'):
                yield chunk

        chunked = await client.post("/v1/recommend", content=chunks())
        assert chunked.status_code == 413  # no content-length: the streamed size is checked
        assert (await client.get("/v1/recommend")).status_code == 405
        assert (await client.get("/nowhere")).status_code == 404
        assert (await client.get("/healthz")).status_code == 200  # still serving
    assert not failures, "\n".join(map(str, failures))


async def test_health_readiness_and_openapi(config_path):
    async with serving(config_path) as (_, client):
        health = (await client.get("/healthz")).json()
        assert health["status"] == "ok" and health["experiment"] == "exp"
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["arms"] == {"treatment": True, "control": True}
        document = (await client.get("/openapi.json")).json()
        assert set(document["paths"]) == {"/v1/recommend", "/v1/feedback", "/healthz", "/readyz", "/metrics",
                                          "/openapi.json"}
        request = document["components"]["schemas"]["RecommendRequest"]["properties"]
        assert request["k"]["maximum"] == 20  # the config's limits are in the served document
        assert request["arm"]["anyOf"][0]["enum"] == ["treatment", "control"]


def test_cli_refuses_a_bad_config_with_exit_code_2(model, tmp_path):
    _, model_dir, _ = model
    config = router_config(model_dir, tmp_path, arms=[("treatment", 3000), ("control", 6000)])
    path = write_config(tmp_path / "router.yaml", config)
    result = CliRunner().invoke(cli_app, ["serve", "router", "--config", str(path)])
    assert result.exit_code == 2
    assert "arms" in result.output and "10000" in result.output
    missing = CliRunner().invoke(cli_app, ["serve", "router", "--config", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "cannot read" in missing.output
    assert CliRunner().invoke(cli_app, ["serve", "router", "--help"]).exit_code == 0


def test_cli_refuses_a_feedback_path_it_cannot_write_naming_the_flag(model, tmp_path):
    _, model_dir, _ = model
    path = write_config(tmp_path / "router.yaml", router_config(model_dir, tmp_path))
    (tmp_path / "taken").write_text("a file, not a folder")
    under_a_file = CliRunner().invoke(cli_app, ["serve", "router", "--config", str(path),
                                                "--feedback-path", str(tmp_path / "taken" / "feedback.jsonl")])
    assert under_a_file.exit_code == 2 and "--feedback-path: cannot create" in under_a_file.output
    folder = CliRunner().invoke(cli_app, ["serve", "router", "--config", str(path), "--feedback-path", str(tmp_path)])
    assert folder.exit_code == 2 and "--feedback-path:" in folder.output and "is a folder" in folder.output
