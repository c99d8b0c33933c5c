"""The feedback log: what the router accepts is what training reads, through overload, rotation and SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from _router import log_lines, metric, router_config, serving, write_config
from recops.data.cleaning import clean_events
from recops.data.io import read_events
from recops.serving.assignment import ArmWeights, assign
from recops.serving.router.config import ConfigError
from recops.serving.triton_server import free_port

pytestmark = [pytest.mark.slow, pytest.mark.anyio]




@pytest.mark.parametrize("fsync", ["always", "interval", "never"])
async def test_feedback_and_impressions_reach_the_log_that_training_reads(model_dir, items, tmp_path, fsync):
    config = router_config(model_dir, tmp_path, feedback={"fsync": fsync, "fsyncIntervalSeconds": 0.05})
    path = write_config(tmp_path / "router.yaml", config)
    weights = ArmWeights(arms=[("treatment", 3000), ("control", 7000)])
    shown = {}
    async with serving(path) as (_, client):
        for n in range(5):
            answer = (await client.post("/v1/recommend", json={"user_id": f"u{n}", "k": 3})).json()
            shown[answer["request_id"]] = {**answer, "user_id": f"u{n}"}
        first = next(iter(shown.values()))
        single = {"user_id": "u0", "item_id": first["items"][0]["item_id"], "event": "click",
                  "request_id": first["request_id"], "arm": first["arm"]}
        assert (await client.post("/v1/feedback", json=single)).json() == {"accepted": 1}
        batch = [
            {"user_id": "u1", "item_id": items[1], "event": "like", "timestamp": 1_700_000_000},
            {"user_id": "u2", "item_id": items[2], "event": "cart"},
            {"user_id": "u2", "item_id": items[2], "event": "purchase", "value": 12.5, "timestamp": 1_700_000_100.5},
        ]
        response = await client.post("/v1/feedback", json={"events": batch})
        assert response.status_code == 202 and response.json() == {"accepted": 3}
        # All or nothing: one bad event refuses the whole batch.
        refused = await client.post("/v1/feedback", json={"events": [*batch, {"user_id": "u3", "event": "click"}]})
        assert refused.status_code == 422 and refused.json()["fields"] == ["events[3].item_id"]

    lines = log_lines(tmp_path / "log")  # read after shutdown: everything accepted was flushed
    impressions = [line for line in lines if line["event"] == "impression"]
    assert len(impressions) == 15
    for line in impressions:
        answer = shown[line["request_id"]]
        assert (line["arm"], line["experiment"], line["user_id"]) == (answer["arm"], "exp", answer["user_id"])
    assert [line["item_id"] for line in impressions] == [i["item_id"] for a in shown.values() for i in a["items"]]
    feedback = [line for line in lines if line["event"] != "impression"]
    assert [line["event"] for line in feedback] == ["click", "like", "cart", "purchase"]
    assert feedback[0]["request_id"] == first["request_id"] and feedback[0]["arm"] == first["arm"]
    assert feedback[2]["arm"] == assign("salt", "u2", weights)  # no arm given: the sticky one
    assert feedback[3]["value"] == 12.5 and "value" not in feedback[2]
    assert feedback[1]["timestamp"] == 1_700_000_000

    raw = read_events(tmp_path / "log" / "feedback.jsonl")
    assert raw.height == 19 and not raw["malformed"].any()
    cleaned = clean_events(raw)
    assert cleaned.rows_kept == 19, cleaned.drops
    assert cleaned.events.filter(cleaned.events["event"] == "purchase")["value"].to_list() == [12.5]


async def test_a_feedback_path_override_writes_the_log_there_creating_its_folders(model_dir, tmp_path):
    path = write_config(tmp_path / "router.yaml", router_config(model_dir, tmp_path))
    own = tmp_path / "feedback" / "shop" / "exp" / "router-7d9f-abcde" / "feedback.jsonl"  # what a pod is given
    async with serving(path, feedback_path=own) as (_, client):
        event = {"user_id": "u1", "item_id": "i1", "event": "click"}
        assert (await client.post("/v1/feedback", json=event)).json() == {"accepted": 1}
    assert [line["event"] for line in log_lines(own.parent)] == ["click"]
    assert not (tmp_path / "log").exists()  # the config's feedback.path is not used


async def test_an_unwritable_feedback_path_is_refused_naming_the_flag(model_dir, tmp_path):
    path = write_config(tmp_path / "router.yaml", router_config(model_dir, tmp_path))
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(ConfigError, match=r"^--feedback-path: cannot open .*taken/feedback.jsonl"):
        async with serving(path, feedback_path=tmp_path / "taken" / "feedback.jsonl"):
            pass


async def test_a_full_queue_answers_503_and_every_accepted_event_is_logged(model_dir, tmp_path):
    # The log is a FIFO nobody reads yet: the writer blocks like a stalled disk and the queue fills.
    log = tmp_path / "log" / "feedback.jsonl"
    log.parent.mkdir()
    os.mkfifo(log)
    reader = os.open(log, os.O_RDONLY | os.O_NONBLOCK)
    config = router_config(model_dir, tmp_path, limits={"maxFeedbackBatch": 5},
                           feedback={"queueSize": 20, "logImpressions": False})
    path = write_config(tmp_path / "router.yaml", config)
    received = bytearray()

    def drain() -> None:
        os.set_blocking(reader, True)
        while chunk := os.read(reader, 65536):
            received.extend(chunk)

    async with serving(path) as (_, client):
        accepted, full = 0, None
        for n in range(5000):
            response = await client.post("/v1/feedback", json={"user_id": f"u{n}", "item_id": "i", "event": "click"})
            if response.status_code == 503:
                full = response
                break
            assert response.status_code == 202
            accepted += 1
        assert full is not None, "the queue never filled"
        assert full.headers["retry-after"] == "1" and "full" in full.json()["error"]
        batch = [{"user_id": "b", "item_id": "i", "event": "like"}] * 5
        assert (await client.post("/v1/feedback", json={"events": batch})).status_code == 503
        text = (await client.get("/metrics")).text
        counted = sum(metric(text, "recops_feedback_events_total", experiment="exp", arm=arm, event="click")
                      for arm in ("treatment", "control"))
        assert counted == accepted
        assert metric(text, "recops_router_feedback_log_refused_total", kind="feedback") == 2
        thread = threading.Thread(target=drain)
        thread.start()  # the "disk" recovers; shutdown writes the rest
    thread.join(timeout=30)
    os.close(reader)
    lines = bytes(received).decode().splitlines()
    assert len(lines) == accepted and all('"click"' in line for line in lines)
    assert [line.split('"user_id":"')[1].split('"')[0] for line in lines] == [f"u{n}" for n in range(accepted)]


async def test_rotation_keeps_every_line_in_order(model_dir, tmp_path):
    config = router_config(model_dir, tmp_path, feedback={"rotateBytes": 1500, "logImpressions": False})
    path = write_config(tmp_path / "router.yaml", config)
    async with serving(path) as (_, client):
        for n in range(60):
            event = {"user_id": f"user-{n:03d}", "item_id": "i", "event": "click", "timestamp": 1_700_000_000 + n}
            assert (await client.post("/v1/feedback", json=event)).status_code == 202
            if n % 10 == 9:
                await asyncio.sleep(0.02)  # let the writer run between bursts
    folder = tmp_path / "log"
    rotated = sorted(folder.glob("feedback-*.jsonl"))
    assert len(rotated) >= 4
    assert all(file.stat().st_size <= 1500 for file in [*rotated, folder / "feedback.jsonl"])
    assert [line["user_id"] for line in log_lines(folder)] == [f"user-{n:03d}" for n in range(60)]
    assert read_events(rotated[0]).height == rotated[0].read_text().count("\n")


def _serve(config_path, port):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "recops", "serve", "router", "--config", str(config_path), "--port", str(port)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_ready(process, url, timeout=90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"router exited with {process.returncode}:\n{process.stdout.read()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"router not ready:\n{process.stdout.read()}")


async def test_sigterm_while_clients_send_loses_no_accepted_event(model_dir, tmp_path):
    config = router_config(model_dir, tmp_path, feedback={"fsync": "never"})
    path = write_config(tmp_path / "router.yaml", config)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = _serve(path, port)
    try:
        _wait_ready(process, url)
        accepted, shown = [0], [0]
        stop = asyncio.Event()

        async def sender(worker: int) -> None:
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                n = 0
                while not stop.is_set():
                    n += 1
                    try:
                        if n % 4 == 0:
                            r = await client.post("/v1/recommend", json={"user_id": f"w{worker}", "k": 2})
                            if r.status_code == 200:
                                shown[0] += len(r.json()["items"])
                            continue
                        events = [{"user_id": f"w{worker}", "item_id": f"{n}-{j}", "event": "click"}
                                  for j in range(1 + worker % 3)]
                        r = await client.post("/v1/feedback", json={"events": events})
                        if r.status_code == 202:
                            accepted[0] += r.json()["accepted"]
                    except httpx.HTTPError:
                        if process.poll() is not None:
                            return
                        await asyncio.sleep(0.01)

        senders = [asyncio.create_task(sender(w)) for w in range(6)]
        await asyncio.sleep(1.5)
        assert accepted[0] > 0
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(process.wait, 60)
        stop.set()
        await asyncio.gather(*senders)
        output = process.stdout.read()
        # uvicorn finishes the shutdown, then re-raises the signal so the exit status still says SIGTERM.
        assert returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in output, output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = log_lines(tmp_path / "log")
    assert sum(line["event"] == "click" for line in lines) == accepted[0]
    assert sum(line["event"] == "impression" for line in lines) == shown[0]
