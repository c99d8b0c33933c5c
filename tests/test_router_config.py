"""The router's config file: validation naming the field, and live reloads that never drop a request."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

import pytest
import yaml

from _router import metric, router_config, serving
from recops.serving.router.config import ConfigError, parse_config

pytestmark = [pytest.mark.slow, pytest.mark.anyio]



class ConfigMap:
    """A folder laid out like a mounted ConfigMap: ``router.yaml -> ..data/router.yaml``, ``..data -> ..<n>``.

    An update writes a new ``..<n>`` folder and swaps the ``..data`` symlink: the mounted file's path and
    mtime stay the same, only its content changes.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.version = 0
        folder.mkdir()
        (folder / "router.yaml").symlink_to("..data/router.yaml")

    @property
    def path(self) -> Path:
        return self.folder / "router.yaml"

    def update(self, content: dict | str) -> None:
        self.version += 1
        data = self.folder / f"..{self.version}"
        data.mkdir()
        text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
        (data / "router.yaml").write_text(text)
        link = self.folder / "..data_tmp"
        link.symlink_to(data.name)
        os.replace(link, self.folder / "..data")


async def _wait_for(predicate, timeout=15.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_reload_applies_new_weights_without_dropping_requests_and_refuses_bad_versions(
    model_dir, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="recops.router")
    config_map = ConfigMap(tmp_path / "config")
    config = router_config(model_dir, tmp_path, arms=[("treatment", 0), ("control", 10_000)],
                           limits={"upstreamTimeoutSeconds": 3})
    config_map.update(config)
    copy = shutil.copytree(model_dir, tmp_path / "model-copy")
    users = [f"user-{n}" for n in range(40)]

    async with serving(config_map.path, reload_interval_s=0.05) as (_, client):
        statuses: list[int] = []
        stop = asyncio.Event()

        async def traffic(worker: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                response = await client.post("/v1/recommend", json={"user_id": f"t{worker}-{n}", "k": 5})
                statuses.append(response.status_code)
                await asyncio.sleep(0)

        async def arms() -> set[str]:
            return {(await client.post("/v1/recommend", json={"user_id": u, "k": 1})).json()["arm"] for u in users}

        async def config_hash() -> str:
            return (await client.get("/healthz")).json()["config_hash"]

        async def reload_errors() -> float:
            return metric((await client.get("/metrics")).text, "recops_router_config_reload_errors_total")

        senders = [asyncio.create_task(traffic(w)) for w in range(4)]
        assert await arms() == {"control"}
        first = await config_hash()

        # Ramp: every user moves to treatment; requests keep flowing meanwhile.
        config_map.update(router_config(model_dir, tmp_path, arms=[("treatment", 10_000), ("control", 0)],
                                        limits={"upstreamTimeoutSeconds": 3}))

        async def changed() -> bool:
            return await config_hash() != first

        await _wait_for(changed)
        assert await arms() == {"treatment"}
        ramped = await config_hash()

        # Invalid YAML, then a config that does not validate: both refused, the ramped config stays.
        config_map.update("arms: [unclosed")

        async def one_error() -> bool:
            return await reload_errors() == 1

        await _wait_for(one_error)
        config_map.update(router_config(model_dir, tmp_path, arms=[("treatment", 5000), ("control", 4000)]))

        async def two_errors() -> bool:
            return await reload_errors() == 2

        await _wait_for(two_errors)
        await asyncio.sleep(0.3)  # the same bad version is reported once, not on every poll
        assert await reload_errors() == 2
        assert await config_hash() == ramped and await arms() == {"treatment"}
        refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert "not valid YAML" in refusals[0]
        assert "arms:" in refusals[1] and "10000" in refusals[1]

        # A new upstream for one arm (another model folder): loaded beside the old, which retires later.
        config_map.update(router_config(model_dir, tmp_path, arms=[("treatment", 10_000), ("control", 0)],
                                        models={"treatment": copy}, limits={"upstreamTimeoutSeconds": 3}))

        async def moved() -> bool:
            return await config_hash() != ramped

        await _wait_for(moved)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*senders)
        text = (await client.get("/metrics")).text
        assert metric(text, "recops_router_config_reloads_total") == 2
        assert metric(text, "recops_router_config_info", hash=await config_hash()) == 1
        assert metric(text, "recops_router_config_info", hash=first) == 0

    assert len(statuses) > 50 and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}


VALID = {
    "experiment": "e",
    "salt": "s",
    "arms": [{"name": "t", "weightBp": 1000, "triton": {"url": "127.0.0.1:8001"}},
             {"name": "c", "weightBp": 9000, "triton": {"url": "127.0.0.1:8002"}}],
}


def _with(path: str, value):
    config = yaml.safe_load(yaml.safe_dump(VALID))
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    node[int(last) if last.isdigit() else last] = value
    return yaml.safe_dump(config).encode()


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (_with("arms.1.weightBp", 8000), "arms: arm weights must sum to 10000"),
        (_with("arms", [{"name": n, "weightBp": w, "triton": {"url": "h:1"}} for n, w in
                        (("a", 6000), ("b", 1000), ("c", 3000))]), "may hold at most 5000"),
        (_with("arms.0.weightBp", 10.5), "arms[0].weightBp"),
        (_with("arms.0.model", "/no/such/model"), "arms[0].model: not a directory"),
        (_with("arms.0.triton", None), "arms[0]: give exactly one upstream"),
        (_with("arms.0.triton.url", "no-port"), "arms[0].triton.url"),
        (_with("arms.1.name", "t"), "duplicated"),
        (_with("colour", "red"), "colour: Extra inputs are not permitted"),
        (_with("limits.maxK", 0), "limits.maxK"),
        (_with("feedback.fsync", "sometimes"), "feedback.fsync"),
        (_with("salt", "a\x00b"), "salt"),
        (_with("feedback.queueSize", 50), "maxFeedbackBatch (100) must not exceed feedback.queueSize (50)"),
        (b"- just\n- a list\n", "expected a mapping"),
        (b"arms: [unclosed", "not valid YAML"),
    ],
)
def test_a_bad_config_is_refused_naming_the_field(content, named):
    with pytest.raises(ConfigError) as error:
        parse_config(content, "router.yaml")
    assert named in str(error.value) and str(error.value).startswith("router.yaml")


def test_the_example_config_is_valid():
    example = Path(__file__).resolve().parents[1] / "examples" / "router.yaml"
    config = parse_config(example.read_bytes(), str(example))
    assert [arm.name for arm in config.arms] == ["treatment", "control"]
    assert config.weights.control == "control"


async def test_a_triton_arm_that_is_down_is_not_ready_and_answers_5xx(model_dir, tmp_path):
    pytest.importorskip("recops.serving.triton_client", exc_type=ImportError)
    from recops.serving.triton_server import free_port

    config = router_config(model_dir, tmp_path, limits={"upstreamTimeoutSeconds": 2})
    config["arms"][0] = {"name": "treatment", "weightBp": 3000, "triton": {"url": f"127.0.0.1:{free_port()}"}}
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(config))
    async with serving(path) as (_, client):
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["arms"] == {"treatment": False, "control": True}
        response = await client.post("/v1/recommend", json={"user_id": "u", "arm": "treatment"})
        assert response.status_code in (502, 504)
        served = await client.post("/v1/recommend", json={"user_id": "u", "arm": "control"})
        assert served.status_code == 200
        text = (await client.get("/metrics")).text
    kinds = sum(metric(text, "recops_upstream_errors_total", arm="treatment", kind=k) for k in ("error", "timeout"))
    assert kinds == 1


async def test_a_ramp_does_not_count_returning_users_again(model_dir, tmp_path):
    # Distinct users are counted once per experiment, under their arm when first seen: within a step,
    # only new users are counted and they split by the step's weights (what the sample-ratio gate checks).
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(router_config(model_dir, tmp_path, arms=[("treatment", 0), ("control", 10_000)])))
    users = [f"r{n}" for n in range(10)]
    async with serving(path, reload_interval_s=0.05) as (_, client):
        for user in users:
            await client.post("/v1/recommend", json={"user_id": user, "k": 1})
        first = (await client.get("/healthz")).json()["config_hash"]
        ramped = router_config(model_dir, tmp_path, arms=[("treatment", 10_000), ("control", 0)])
        path.write_text(yaml.safe_dump(ramped))

        async def changed() -> bool:
            return (await client.get("/healthz")).json()["config_hash"] != first

        await _wait_for(changed)
        for user in [*users, "newcomer"]:
            assert (await client.post("/v1/recommend", json={"user_id": user, "k": 1})).json()["arm"] == "treatment"
        text = (await client.get("/metrics")).text
    assert metric(text, "recops_assigned_users_total", arm="control") == 10
    assert metric(text, "recops_assigned_users_total", arm="treatment") == 1
    assert metric(text, "recops_assignments_total", arm="treatment") == 11
