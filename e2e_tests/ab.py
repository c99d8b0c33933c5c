"""The A/B stack the experiment tests share: two local Tritons, simulated shoppers, and a local router
and Prometheus wired to the RecExperiment the operator runs in the cluster.

kwok runs no containers, so the router and the two Tritons run here on loopback: the router reads
the exact config the operator writes into its ConfigMap (synced to a file as the kubelet would),
with one substitution — each arm's cluster address becomes the address of the local Triton that
serves that arm's model. The experiment's ``prometheus.url`` points at the local Prometheus, which
scrapes the router; simulated shoppers (the demo's, whose clicks follow the generator's hidden
preferences) drive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from e2e_tests.recops_fixtures import MODEL, train_to_ready, wait_for

CONTROL_MODEL, TREATMENT_MODEL = "shop-control", "shop-llm"
TERMINAL = {"Promoted", "RolledBack", "Failed"}


@dataclass
class Stack:
    """Two Tritons (the demo's better and weaker model) and the simulated shoppers."""

    tritons: dict[str, str]  # "better" / "weaker" → gRPC address
    users: Any
    behaviour: Any
    work: Path


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from recops.demo.run import CONTROL, TREATMENT, DemoOptions, Visitors, train_models, visitors
    from recops.demo.simulation import SimulatedUsers, SyntheticBehaviour
    from recops.serving.repository import build_repository
    from recops.serving.triton_server import TritonServer

    work = tmp_path_factory.mktemp("ab")
    # The demo's two models on its quick shop: the LLM two-tower (better online) and the ID two-tower.
    dirs, _, data, shop = train_models(DemoOptions(out=work, quick=True), say=lambda line: None)
    with contextlib.ExitStack() as servers:
        tritons = {}
        for role, arm in (("better", TREATMENT), ("weaker", CONTROL)):
            repo = build_repository(dirs[arm], work / f"repo-{role}")
            tritons[role] = servers.enter_context(TritonServer(repo, log_path=work / f"triton-{role}.log")).grpc_url
        yield Stack(tritons, visitors(SimulatedUsers.from_interactions(data)), Visitors(SyntheticBehaviour(shop)), work)


def experiment_manifest(name: str, prometheus_url: str, **analysis: Any) -> dict:
    """The demo's RecExperiment (quick timings) between the two RecModels of this test."""
    from recops.demo.run import DEFAULT_EXPERIMENT, load_experiment

    spec = load_experiment(DEFAULT_EXPERIMENT, quick=True).model_dump(by_alias=True, mode="json", exclude_none=True)
    spec.update(
        control={"model": CONTROL_MODEL},
        treatment={"model": TREATMENT_MODEL},
        assignment={"salt": name},
        prometheus={"url": prometheus_url, "timeoutSeconds": 2},
    )
    spec["analysis"].update(analysis)
    return {"apiVersion": "recops.dev/v1alpha1", "kind": "RecExperiment", "metadata": {"name": name}, "spec": spec}


def models_ready(cluster, namespace: str) -> None:
    """Both RecModels trained (kwok) and Ready, one after the other."""
    for name in (CONTROL_MODEL, TREATMENT_MODEL):
        manifest = copy.deepcopy(MODEL)
        manifest["metadata"]["name"] = name
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))
        train_to_ready(cluster, namespace, name)


def experiment_status(cluster, namespace: str, name: str) -> dict:
    return cluster.kubectl.json("get", "rexp", name, "-n", namespace).get("status") or {}


class ConfigSync:
    """What the kubelet does for a mounted ConfigMap: copy its file to the router's disk when it changes
    (here every 0.3 s, and with the arms' cluster addresses replaced by local Tritons)."""

    def __init__(
        self,
        cluster,
        namespace: str,
        name: str,
        path: Path,
        endpoints: dict[str, str],
        tamper: Callable[[dict], dict] | None = None,
    ) -> None:
        self.cluster, self.namespace, self.name, self.path = cluster, namespace, f"{name}-router", path
        self.endpoints, self.tamper = endpoints, tamper or (lambda config: config)
        self.written: str | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def sync(self) -> bool:
        configmap = self.cluster.kubectl("get", "configmap", self.name, "-n", self.namespace, "-o", "json", check=False)
        if configmap.returncode != 0:
            return False
        text = yaml.safe_load(configmap.stdout)["data"]["router.yaml"]
        if text != self.written:
            config = yaml.safe_load(text)
            for arm in config["arms"]:
                arm["triton"]["url"] = self.endpoints[arm["name"]]
            config["feedback"]["path"] = str(self.path.parent / "feedback" / "feedback.jsonl")
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(yaml.safe_dump(self.tamper(config), sort_keys=False))
            tmp.replace(self.path)  # atomically, as the kubelet swaps the ..data symlink
            self.written = text
        return True

    def _run(self) -> None:
        while not self.stop.wait(0.3):
            self.sync()


class Traffic:
    """Simulated shoppers against the router, in a thread with its own event loop, until stopped."""

    def __init__(self, router_url: str, stack: Stack) -> None:
        self.router_url, self.stack = router_url, stack
        self.result: Any = None
        self.error: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from recops.demo.run import http_client
        from recops.demo.simulation import simulate

        async def main() -> Any:
            self._stop = asyncio.Event()
            async with http_client(self.router_url, 16) as client:
                return await simulate(
                    client,
                    self.stack.users,
                    self.stack.behaviour,
                    rng=np.random.default_rng(0),
                    concurrency=16,
                    stop=self._stop,
                )

        try:
            self.result = self._loop.run_until_complete(main())
        except BaseException as error:  # reported by stop()
            self.error = error

    def start(self) -> Traffic:
        self.thread.start()
        return self

    def stop(self) -> Any:
        wait_for(lambda: self._stop is not None, "the traffic to start", timeout=10)
        self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout=60)
        if self.error is not None:
            raise self.error
        return self.result


@contextlib.contextmanager
def ab_test(
    cluster,
    namespace: str,
    stack: Stack,
    name: str,
    *,
    treatment: str = "better",
    tamper: Callable[[dict], dict] | None = None,
    **analysis: Any,
) -> Iterator[dict[str, Any]]:
    """Models Ready, Prometheus and the router up, the experiment applied and traffic flowing."""
    from recops.experiments.prometheus_server import PrometheusProcess, prometheus_binary
    from recops.serving.processes import free_port

    binary = prometheus_binary()
    assert binary, "these tests need a real Prometheus (apt-get install prometheus)"
    models_ready(cluster, namespace)
    work = stack.work / name
    work.mkdir()
    port = free_port()
    with contextlib.ExitStack() as running:
        prometheus = PrometheusProcess(binary, work / "prometheus", [f"127.0.0.1:{port}"]).start()
        running.callback(prometheus.stop)
        cluster.kubectl(
            "apply",
            "-n",
            namespace,
            "-f",
            "-",
            input=yaml.safe_dump(experiment_manifest(name, prometheus.url, **analysis)),
        )
        endpoints = {
            "treatment": stack.tritons[treatment],
            "control": stack.tritons["weaker" if treatment == "better" else "better"],
        }
        with routed(cluster, namespace, stack, name, work, port, prometheus, endpoints, tamper) as traffic:
            yield {"prometheus": prometheus, "traffic": traffic}


@contextlib.contextmanager
def routed(cluster, namespace: str, stack: Stack, name: str, work: Path, port: int, prometheus: Any,
           endpoints: dict[str, str], tamper: Callable[[dict], dict] | None = None) -> Iterator[Traffic]:
    """The experiment ``name``'s router on ``port`` (its ConfigMap synced, arms pointed at ``endpoints``),
    scraped by ``prometheus``, with simulated shoppers on it until the block ends."""
    from recops.experiments.prometheus_server import poll
    from recops.serving.router.process import RouterProcess

    with contextlib.ExitStack() as running:
        sync = ConfigSync(cluster, namespace, name, work / "router.yaml", endpoints, tamper)
        wait_for(sync.sync, "the operator's router ConfigMap", timeout=60)
        sync.thread.start()
        running.callback(sync.stop.set)
        router = RouterProcess(work / "router.yaml", port, work / "router.log")
        running.callback(router.stop)
        router.wait_ready()
        poll(lambda: any(s["value"][1] == "1" for s in prometheus.query("up")), 30, "Prometheus to scrape the router")
        traffic = Traffic(router.url, stack).start()
        try:
            yield traffic
        finally:
            traffic.stop()


def finish(cluster, namespace: str, name: str, timeout: float = 240) -> dict:
    return wait_for(
        lambda: (s := experiment_status(cluster, namespace, name)).get("phase") in TERMINAL and s,
        f"experiment {name} to finish",
        timeout=timeout,
        interval=1,
    )
