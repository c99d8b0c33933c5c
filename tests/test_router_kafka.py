"""The Kafka feedback transport against a real Apache Kafka broker (KRaft, one node, started by this module).

Two router instances write to one topic; ``recops feedback pull`` must then return exactly what they
accepted — through a broker restart in the middle — and commit so that the next pull returns nothing new.
The broker's jars come from ``make kafka``; without them these tests skip, or fail with
RECOPS_REQUIRE_KAFKA=1 (CI).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from typer.testing import CliRunner

from _kafka import KafkaBroker, kafka_libs, kafka_version
from _router import metric, router_config, serving, write_config
from recops.cli import app as cli
from recops.serving.router.config import ConfigError, parse_config
from recops.serving.router.metrics import LOG_LOST, LOG_WRITE_ERRORS
from recops.serving.triton_server import free_port

pytestmark = [pytest.mark.slow, pytest.mark.anyio]
runner = CliRunner()


@pytest.fixture(scope="module")
def kafka(tmp_path_factory):
    """One real broker for the module (about 3 s to start on 2 cores)."""
    libs = kafka_libs()
    if libs is None:
        reason = f"no Kafka {kafka_version()} broker jars (run `make kafka`) or no java on PATH"
        if os.environ.get("RECOPS_REQUIRE_KAFKA") == "1":
            pytest.fail(f"RECOPS_REQUIRE_KAFKA=1 but {reason}")
        pytest.skip(reason)
    broker = KafkaBroker(libs, tmp_path_factory.mktemp("kafka"))
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()
        print(f"kafka broker start-up times (s): {[round(s, 2) for s in broker.startup_seconds]}")




def kafka_router(model_dir: Path, folder: Path, name: str, broker: KafkaBroker, topic: str, **kafka: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = router_config(model_dir, folder / name, feedback={
        "transport": "kafka",
        "kafka": {"bootstrapServers": broker.bootstrap, "topic": topic, "acks": "all", "lingerMs": 2, **kafka},
    })
    return write_config(folder / f"{name}.yaml", config)


async def pull(broker: KafkaBroker, topic: str, group: str, out: Path) -> int:
    """``recops feedback pull``; the count it prints. On a thread: the CLI runs its own event loop."""
    args = ["feedback", "pull", "--kafka", broker.bootstrap, "--topic", topic, "--group", group, "--out", str(out)]
    result = await asyncio.to_thread(runner.invoke, cli, args)
    assert result.exit_code == 0, result.output
    return int(result.stdout.split()[0])


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def feedback_key(line: dict) -> tuple:
    """retrain's merge key: an event is the same event when these are equal."""
    return (line["user_id"], line["item_id"], line["event"], line["timestamp"], line["request_id"])


async def test_two_routers_one_topic_pull_gets_each_accepted_event_once(kafka, model_dir, items, tmp_path):
    topic = "feedback-two-routers"
    paths = [kafka_router(model_dir, tmp_path, name, kafka, topic) for name in ("a", "b")]
    posted: Counter = Counter()
    shown: Counter = Counter()
    async with serving(paths[0]) as (_, first), serving(paths[1]) as (_, second):
        clients = (first, second)
        for n in range(60):
            client = clients[n % 2]
            event = {"user_id": f"u{n % 9}", "item_id": items[n % len(items)],
                     "event": ("click", "like", "cart")[n % 3], "timestamp": 1_700_000_000 + n, "request_id": f"r{n}"}
            if n % 10 == 9:  # some as batches of two
                twin = {**event, "request_id": f"r{n}b"}
                response = await client.post("/v1/feedback", json={"events": [event, twin]})
                assert response.status_code == 202 and response.json() == {"accepted": 2}
                posted.update([feedback_key(event), feedback_key(twin)])
            else:
                response = await client.post("/v1/feedback", json=event)
                assert response.status_code == 202, response.text
                posted[feedback_key(event)] += 1
            if n % 6 == 0:  # impressions: one line per item shown
                answer = (await client.post("/v1/recommend", json={"user_id": f"u{n % 9}", "k": 3})).json()
                shown.update((answer["request_id"], item["item_id"]) for item in answer["items"])
    # Both routers closed: everything they accepted was acknowledged by the broker.
    out = tmp_path / "pulled" / "feedback.jsonl"
    assert await pull(kafka, topic, "retrain", out) == sum(posted.values()) + sum(shown.values())
    pulled = lines_of(out)
    assert Counter(feedback_key(line) for line in pulled if line["event"] != "impression") == posted
    assert Counter((line["request_id"], line["item_id"]) for line in pulled if line["event"] == "impression") == shown
    assert {line["experiment"] for line in pulled} == {"exp"}
    assert await pull(kafka, topic, "retrain", out) == 0  # committed: nothing new
    assert len(lines_of(out)) == len(pulled)  # and the file is appended to, never rewritten
    assert await pull(kafka, topic, "another-group", tmp_path / "other.jsonl") == len(pulled)  # groups are independent


async def test_events_posted_while_the_broker_restarts_are_delivered_after_it_returns(
    kafka, model_dir, items, tmp_path
):
    topic = "feedback-restart"
    # A short send timeout: while the broker is away, sends fail and the writer retries with back-off.
    path = kafka_router(model_dir, tmp_path, "r", kafka, topic, deliveryTimeoutSeconds=1.5)
    posted: Counter = Counter()
    out = tmp_path / "pulled.jsonl"

    async def post(client, n: int) -> None:
        event = {"user_id": f"u{n % 5}", "item_id": items[n % len(items)], "event": "click",
                 "timestamp": 1_700_000_000 + n, "request_id": f"restart-{n}"}
        response = await client.post("/v1/feedback", json=event)
        assert response.status_code == 202, response.text  # accepted (queued) whether or not the broker is up
        posted[feedback_key(event)] += 1

    async def write_errors(client) -> float:
        return metric((await client.get("/metrics")).text, LOG_WRITE_ERRORS)

    async with serving(path) as (app, client):
        runtime = app.state.runtime
        for n in range(20):
            await post(client, n)
        while runtime.log.queued:  # handed to the writer; its send returns once acknowledged
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert await pull(kafka, topic, "g", out) == 20  # delivered while the broker was up
        await asyncio.to_thread(kafka.stop)
        for n in range(20, 40):  # broker down: accepted all the same
            await post(client, n)
        deadline = time.monotonic() + 20
        while await write_errors(client) < 1:  # the outage is real: a send failed and is being retried
            assert time.monotonic() < deadline, "no send failed while the broker was down"
            await asyncio.sleep(0.1)
        await asyncio.to_thread(kafka.start)
        for n in range(40, 60):
            await post(client, n)
    # The router closed after the broker returned: everything accepted was delivered.
    assert await pull(kafka, topic, "g", out) >= 40
    keys = Counter(feedback_key(line) for line in lines_of(out))
    # At-least-once: a send retried after a timeout may have landed twice; retrain's merge key absorbs that.
    assert set(keys) == set(posted) and len(keys) == 60
    assert await pull(kafka, topic, "g", out) == 0


@pytest.mark.parametrize(("kafka_section", "field", "words"), [
    ({"bootstrapServers": ""}, "feedback.kafka.bootstrapServers", "host:port"),
    ({"bootstrapServers": "kafka-0:9092,kafka-1"}, "feedback.kafka.bootstrapServers", "'kafka-1' is not host:port"),
    ({"bootstrapServers": "127.0.0.1:9092", "acks": 1}, "feedback.kafka.acks", "only 'all'"),
    ({"bootstrapServers": "127.0.0.1:9092", "acks": "leader"}, "feedback.kafka.acks", "only 'all'"),
    ({"bootstrapServers": "127.0.0.1:9092", "topic": "a/b"}, "feedback.kafka.topic", "not a Kafka topic name"),
    (None, "feedback", "give feedback.kafka"),
])
def test_a_bad_kafka_section_is_refused_naming_the_field(tmp_path, kafka_section, field, words):
    document = {"experiment": "e", "salt": "s", "arms": [{"name": "c", "weightBp": 10000,
                                                          "triton": {"url": "127.0.0.1:8001"}}],
                "feedback": {"transport": "kafka"}}
    if kafka_section is not None:
        document["feedback"]["kafka"] = kafka_section
    with pytest.raises(ConfigError) as refused:
        parse_config(json.dumps(document).encode(), "router.yaml")
    line = next(line for line in str(refused.value).splitlines() if line.startswith(f"{field}:"))
    assert words in line


def test_acks_minus_one_is_all_and_servers_are_normalised():
    document = {"experiment": "e", "salt": "s", "arms": [{"name": "c", "weightBp": 10000,
                                                          "triton": {"url": "127.0.0.1:8001"}}],
                "feedback": {"transport": "kafka", "kafka": {"bootstrapServers": " a:1, b:2 ", "acks": -1}}}
    kafka = parse_config(json.dumps(document).encode(), "router.yaml").feedback.kafka
    assert kafka is not None and kafka.acks == "all" and kafka.bootstrap_servers == "a:1,b:2"


def test_a_pull_from_a_dead_address_exits_2_naming_it(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    out = tmp_path / "out.jsonl"
    result = runner.invoke(cli, ["feedback", "pull", "--kafka", address, "--topic", "t", "--group", "g",
                                 "--out", str(out), "--timeout", "5"])
    assert result.exit_code == 2
    assert address in result.output and "cannot reach" in result.output
    assert not out.exists()


def test_a_pull_of_a_missing_topic_exits_2_naming_it(kafka, tmp_path):
    result = runner.invoke(cli, ["feedback", "pull", "--kafka", kafka.bootstrap, "--topic", "no-such-topic",
                                 "--group", "g", "--out", str(tmp_path / "out.jsonl")])
    assert result.exit_code == 2 and "no-such-topic" in result.output


async def test_with_no_broker_the_router_serves_and_its_shutdown_counts_what_it_could_not_deliver(
    model_dir, items, tmp_path
):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there: the router starts anyway (Kafka is not needed
    config = router_config(model_dir, tmp_path, feedback={  # to recommend), queues, and retries
        "transport": "kafka", "kafka": {"bootstrapServers": address, "deliveryTimeoutSeconds": 0.3},
    })
    path = write_config(tmp_path / "router.yaml", config)
    started = time.monotonic()
    async with serving(path) as (app, client):
        runtime = app.state.runtime
        assert (await client.post("/v1/recommend", json={"user_id": "u1", "k": 2})).status_code == 200
        batch = [{"user_id": f"u{n}", "item_id": items[n], "event": "click"} for n in range(3)]
        assert (await client.post("/v1/feedback", json={"events": batch})).json() == {"accepted": 3}
    # Shutdown gives up after a few attempts instead of hanging, and says how many accepted events it lost.
    assert time.monotonic() - started < 30
    exposition = generate_latest(runtime.metrics.registry).decode()
    assert metric(exposition, LOG_LOST) == 5  # 2 impressions + 3 feedback events
    assert metric(exposition, LOG_WRITE_ERRORS) >= 3


VIEWS = 150


async def test_feedback_the_routers_send_becomes_the_next_revisions_training_data(kafka, tiny_model, tmp_path):
    """The loop on the local stack: two routers send the feedback and impressions of simulated page views
    (with the client's device, like the training log) to Kafka; `recops retrain --feedback kafka://...`
    pulls them into its store, checks them against the training events, and trains the next revision from
    the last one. The counts add up — no event lost, none used twice — and a retrain from that revision
    finds nothing new in the same topic."""
    from recops.api import load_recmodel_spec
    from recops.data.prepare import source_logs
    from recops.training.retrain import EVENT_KEY

    _, _, model_dir = tiny_model
    spec = model_dir / "spec.yaml"
    training = source_logs(load_recmodel_spec(spec).data)[0]  # what the model was trained on
    # Page views by the training log's own users on their own devices (rows drawn at random), so the
    # feature check sees the same population; its mix: ~86% impressions, about a click a page, fewer likes...
    visits = training.select("user_id", "device").sample(VIEWS, seed=0, with_replacement=True).rows()
    value = float(training.filter(training["event"] == "purchase")["value"].median())
    topic = "feedback-loop"
    paths = [kafka_router(model_dir, tmp_path, name, kafka, topic) for name in ("a", "b")]
    async with serving(paths[0]) as (_, first), serving(paths[1]) as (_, second):
        for view, (user, device) in enumerate(visits):
            client = (first, second)[view % 2]
            answer = (await client.post("/v1/recommend", json={"user_id": user, "k": 10, "device": device})).json()
            shown = [item["item_id"] for item in answer["items"]]
            events = [("click", shown[view % len(shown)])]
            events += [("like", shown[0])] if view % 3 == 0 else []
            events += [("cart", shown[1])] if view % 6 == 0 else []
            for name, item in events:
                body = {"user_id": user, "item_id": item, "event": name, "request_id": answer["request_id"],
                        "device": device}
                response = await client.post("/v1/feedback", json=body)
                assert response.status_code == 202, response.text
            if view % 15 == 0:
                body = {"user_id": user, "item_id": shown[2], "event": "purchase", "value": value,
                        "request_id": answer["request_id"], "device": device}
                assert (await client.post("/v1/feedback", json=body)).status_code == 202

    uri = f"kafka://{kafka.bootstrap}/{topic}?group=retrain-shop"
    store, out = tmp_path / "store", tmp_path / "v2"
    result = await asyncio.to_thread(runner.invoke, cli, [
        "retrain", "-f", str(spec), "--previous", str(model_dir), "--feedback", uri, "--feedback-store", str(store),
        "--out", str(out), "--min-new-events", "1"])
    assert result.exit_code == 0, result.output
    logged = lines_of(store / f"{topic}.jsonl")
    record = json.loads((out / "retrain.json").read_text())
    assert record["check"]["ok"], record["check"]

    def keys(rows) -> set:
        return {tuple(row[c] for c in EVENT_KEY) for row in rows}

    seen = keys(training.select(EVENT_KEY).iter_rows(named=True))
    fresh = {(u, i, e, int(t), r) for u, i, e, t, r in keys(logged)}  # the merge keeps whole seconds
    assert record["events"]["feedback"] == len(logged) == VIEWS * 11 + VIEWS // 3 + VIEWS // 6 + VIEWS // 15
    assert record["events"]["new"] == len(fresh - seen)
    assert record["events"]["merged"] == len(seen | fresh)
    assert (out / "towers.safetensors").is_file()

    # The next retrain, from the revision just made, on the same topic: nothing new, nothing trained twice.
    again = await asyncio.to_thread(runner.invoke, cli, [
        "retrain", "-f", str(spec), "--previous", str(out), "--feedback", uri, "--feedback-store", str(store),
        "--out", str(tmp_path / "v3"), "--min-new-events", "1"])
    assert again.exit_code == 0, again.output
    assert "pulled 0 new events" in again.output and "nothing to retrain: 0 new feedback events" in again.output
    assert len(lines_of(store / f"{topic}.jsonl")) == len(logged)  # the store keeps what was pulled
