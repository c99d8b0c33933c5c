"""End to end: the gates' verdicts from a real Prometheus scraping real routers serving a real Triton.

Simulated users with known click-through rates ask a running router (``recops serve router``, a
subprocess with ``triton:`` upstreams pointing at the session's tiny Triton) for recommendations,
then click each shown item with their arm's CTR and report the clicks to ``/v1/feedback``. One
Prometheus scrapes every router's ``/metrics`` each second; once it has scraped the final counts,
the gates read them exactly as the operator would. What this proves:

1. a better treatment passes every gate (CTR lift, sample ratio, error rate, p99) and the gates see
   exactly the impressions, clicks, users and requests the simulation produced;
2. a worse treatment fails the CTR gate, and with it the whole look;
3. a split that does not match the weights the gate was told fails the sample-ratio gate;
4. a Prometheus that stops answering makes every gate Error, never Successful.

Each scenario has its own router and ``experiment`` label (started together, scraped by one
Prometheus). Which arm a user gets is the router's (read from each response); whether a user
clicks is decided by numbers drawn up front per (user, position), so the totals, and therefore the
verdicts, do not depend on the order in which concurrent responses arrive. Waiting is polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from _prometheus import PrometheusProcess, poll
from recops.api.recexperiment import RecExperimentSpec
from recops.experiments.gates import GateContext, Verdict, evaluate_gates, overall
from recops.experiments.prometheus import PrometheusClient
from recops.experiments.queries import label_value
from recops.serving import contract
from recops.serving.assignment import ArmWeights, assign
from recops.serving.processes import die_with_parent, free_port

pytestmark = pytest.mark.slow

# Arm names that are not the roles: the gates must map treatment/control to them through the weights.
TREATMENT, CONTROL = "ranker-v2", "ranker-v1"
HALF = ArmWeights(arms=[(TREATMENT, 5000), (CONTROL, 5000)])
SKEWED = ArmWeights(arms=[(TREATMENT, 6000), (CONTROL, 4000)])
SALT = "e2e-salt"
K = 10
CONCURRENCY = 32
FEEDBACK_BATCH = 100  # the router's default limits.maxFeedbackBatch
# Far enough back that every gate sees the counters' first (zero) sample: with it, and evaluated at
# the last scrape, increase() neither extrapolates nor misses anything, so counts are exact.
WINDOW = "10m"

# Gates as a manifest would declare them (validated through RecExperimentSpec below).
CTR = {"type": "ctrLift", "minSamples": 2000}
SRM = {"type": "sampleRatio"}
GATES = (
    CTR,
    SRM,
    {"type": "errorRate", "name": "errors-treatment", "maxRatio": 0.01},
    {"type": "errorRate", "name": "errors-control", "arm": "control", "maxRatio": 0.01},
    # Generous: this checks the histogram is wired through, not how fast 2 shared CPU cores are.
    {"type": "latencyP99", "name": "p99-treatment", "maxMilliseconds": 5000},
    {"type": "latencyP99", "name": "p99-control", "arm": "control", "maxMilliseconds": 5000},
)

# experiment label → the weights its router really runs with.
EXPERIMENTS = {"e2e-better": HALF, "e2e-worse": HALF, "e2e-skewed": SKEWED}


def _gates(*documents: dict) -> list:
    spec = RecExperimentSpec.model_validate({
        "control": {"model": "a"},
        "treatment": {"model": "b"},
        "assignment": {"salt": SALT},
        "steps": [{"weight": 50, "pause": "5m"}],
        "gates": list(documents),
        "prometheus": {"url": "http://127.0.0.1:9090"},
    })
    return list(spec.gates)


# --------------------------------------------------------------------------- a router subprocess


@dataclass
class RouterProcess:
    """``recops serve router`` on a loopback port, in its own process group."""

    config: Path
    log: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def spawn(self) -> None:
        command = [sys.executable, "-m", "recops", "serve", "router", "--config", str(self.config),
                   "--host", "127.0.0.1", "--port", str(self.port)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: stop() signals the group
                preexec_fn=die_with_parent,  # and it dies with pytest if the finalizers never run
            )

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(self.describe())
        return httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200

    def describe(self) -> str:
        """Whether it still runs, and the end of its log (for failure messages)."""
        assert self.process is not None
        state = "running" if self.process.poll() is None else f"exited with {self.process.returncode}"
        return f"router {state}; log tail:\n{self.log.read_text(errors='replace')[-3000:]}"

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL after 10 s; safe to call twice."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def _start_routers(routers: Sequence[RouterProcess], attempts: int = 3) -> bool:
    """Start them together (their start-ups overlap); False when one had to move to another port.

    A port is chosen free, but someone may bind it before the router does: the router then exits
    and is retried on a new port.
    """
    for router in routers:
        router.spawn()
    moved = False
    for router in routers:
        for attempt in range(attempts):
            try:
                poll(router.ready, 60.0, f"router {router.config.parent.name} on port {router.port} to be ready")
                break
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                router.port, moved = free_port(), True
                router.spawn()
    return not moved


def _router_config(experiment: str, weights: ArmWeights, triton_url: str, folder: Path) -> dict:
    return {
        "experiment": experiment,
        "salt": SALT,
        # Both arms call the same Triton: the CTR difference comes from the simulated users.
        "arms": [{"name": arm.name, "weightBp": arm.weight_bp, "triton": {"url": triton_url, "timeoutSeconds": 10}}
                 for arm in weights.arms],
        "feedback": {"path": str(folder / "feedback.jsonl")},
    }


@dataclass
class Stack:
    """Running routers (by experiment), the Prometheus scraping them all, and a second one to kill."""

    routers: dict[str, RouterProcess]
    prometheus: PrometheusProcess
    doomed: PrometheusProcess


@pytest.fixture(scope="module")
def stack(request, prometheus_factory, tmp_path_factory) -> Iterator[Stack]:
    """One router per experiment in :data:`EXPERIMENTS`, scraped each second, their zero series already scraped.

    The routers create every series of their experiment at 0 when they load it; Prometheus must have
    that 0 before the first request, or increase() would miss what happened before its first scrape.
    """
    folders = {experiment: tmp_path_factory.mktemp(experiment) for experiment in EXPERIMENTS}
    routers = {e: RouterProcess(f / "router.yaml", f / "router.log", free_port()) for e, f in folders.items()}
    # Prometheus first: it applies its targets about 5 s after it starts, which then overlaps Triton's start-up.
    targets = [router.target for router in routers.values()]
    prometheus, doomed = prometheus_factory(targets, "1s"), prometheus_factory(targets, "1s")
    triton = request.getfixturevalue("tiny_triton")
    try:
        for experiment, router in routers.items():
            config = _router_config(experiment, EXPERIMENTS[experiment], triton.grpc_url, folders[experiment])
            router.config.write_text(yaml.safe_dump(config))
        if not _start_routers(list(routers.values())):  # a router moved: scrape where they are now
            prometheus.stop(), doomed.stop()
            targets = [router.target for router in routers.values()]
            prometheus, doomed = prometheus_factory(targets, "1s"), prometheus_factory(targets, "1s")
        zeros = f"count by (experiment) ({contract.IMPRESSIONS} == 0)"
        prometheus.wait_for_values(zeros, "experiment", dict.fromkeys(EXPERIMENTS, 2), timeout=30.0)
        yield Stack(routers, prometheus, doomed)
    finally:
        for router in routers.values():
            router.stop()


# --------------------------------------------------------------------------- simulated users


@dataclass(frozen=True)
class Sent:
    """What the simulation produced, per arm: what Prometheus must eventually show."""

    users: dict[str, int]
    impressions: dict[str, int]
    clicks: dict[str, int]


async def _simulate(url: str, users: Sequence[str], ctr: Mapping[str, float], seed: int) -> tuple[Sent, list[dict]]:
    """Each user asks for ``K`` items once; each shown item is clicked with the CTR of the arm that served it.

    Returns the totals and the recommend answers, in the order of ``users``.
    """
    # Drawn up front per (user, position): the clicks do not depend on the order responses come back in.
    draws = np.random.default_rng(seed).random((len(users), K))
    limit = asyncio.Semaphore(CONCURRENCY)
    pool = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=30.0, limits=pool) as client:

        async def post(path: str, body: dict) -> dict:
            async with limit:
                response = await client.post(path, json=body)
            assert response.status_code in (200, 202), (path, response.status_code, response.text)
            return response.json()

        answers = await asyncio.gather(*(post("/v1/recommend", {"user_id": user, "k": K}) for user in users))
        clicks = [
            {"user_id": user, "item_id": item["item_id"], "event": "click",
             "request_id": answer["request_id"], "arm": answer["arm"]}
            for user, answer, row in zip(users, answers, draws, strict=True)
            for item, draw in zip(answer["items"], row, strict=False)
            if draw < ctr[answer["arm"]]
        ]
        batches = [clicks[i : i + FEEDBACK_BATCH] for i in range(0, len(clicks), FEEDBACK_BATCH)]
        accepted = await asyncio.gather(*(post("/v1/feedback", {"events": batch}) for batch in batches))
    assert sum(a["accepted"] for a in accepted) == len(clicks)
    arms = {answer["arm"] for answer in answers}
    return Sent(
        users=dict(Counter(answer["arm"] for answer in answers)),
        impressions={arm: sum(len(a["items"]) for a in answers if a["arm"] == arm) for arm in arms},
        clicks={arm: sum(1 for c in clicks if c["arm"] == arm) for arm in arms},
    ), answers


def _drive(stack: Stack, experiment: str, n_users: int, ctr: Mapping[str, float], seed: int) -> tuple[Sent, float]:
    """Run the users, wait until Prometheus has scraped the final counts; returns them and that scrape's time."""
    users = [f"{experiment}-user-{i}" for i in range(n_users)]
    router = stack.routers[experiment]
    try:
        sent, answers = asyncio.run(_simulate(router.url, users, ctr, seed))
    except httpx.TransportError as error:  # say what the router was doing, not only what the client saw
        raise AssertionError(f"{error!r} from {router.url}: {router.describe()}") from error
    weights = EXPERIMENTS[experiment]
    # The arm came from the router: sticky, i.e. the salted hash of the user id under the configured weights.
    assert [a["arm"] for a in answers] == [assign(SALT, user, weights) for user in users]
    assert all(len(a["items"]) == K and a["experiment"] == experiment for a in answers)

    # Raw counter values (no increase()): equality means the scrape after the last event has landed.
    prometheus = stack.prometheus
    selector = f"{{experiment={label_value(experiment)}}}"
    click = f'{{experiment={label_value(experiment)},event="click"}}'
    prometheus.wait_for_values(f"sum by (arm) ({contract.FEEDBACK}{click})", "arm", sent.clicks)
    prometheus.wait_for_values(f"sum by (arm) ({contract.IMPRESSIONS}{selector})", "arm", sent.impressions)
    prometheus.wait_for_values(f"sum by (arm) ({contract.USERS}{selector})", "arm", sent.users)
    prometheus.wait_for_values(f"sum by (arm) ({contract.LATENCY}_count{selector})", "arm", sent.users)
    last = prometheus.query(f"max(timestamp({contract.FEEDBACK}{click}))")
    return sent, float(last[0]["value"][1])


def _evaluate(prometheus: PrometheusProcess, experiment: str, weights: ArmWeights, at: float | None) -> dict:
    with PrometheusClient(prometheus.url, timeout=5.0) as client:
        results = evaluate_gates(_gates(*GATES), client, GateContext(experiment, weights, window=WINDOW, time=at))
    return {result.gate: result for result in results}


# --------------------------------------------------------------------------- the scenarios


def test_a_better_treatment_passes_every_gate_on_exactly_what_users_did(stack):
    experiment = "e2e-better"
    sent, at = _drive(stack, experiment, 1500, {CONTROL: 0.05, TREATMENT: 0.10}, seed=1)
    results = _evaluate(stack.prometheus, experiment, HALF, at)

    for name, result in results.items():
        assert result.verdict is Verdict.SUCCESSFUL, (name, result.message)
    assert overall(list(results.values())) is Verdict.SUCCESSFUL

    ctr = results["ctrLift"]
    for role, arm in (("treatment", TREATMENT), ("control", CONTROL)):
        assert ctr.details[role] == {"successes": sent.clicks[arm], "trials": sent.impressions[arm]}
    assert ctr.value == pytest.approx(
        (sent.clicks[TREATMENT] / sent.impressions[TREATMENT]) / (sent.clicks[CONTROL] / sent.impressions[CONTROL]) - 1
    )
    assert ctr.interval[0] > 0

    assert results["sampleRatio"].details["users"] == sent.users
    for role, arm in (("treatment", TREATMENT), ("control", CONTROL)):
        errors, p99 = results[f"errors-{role}"], results[f"p99-{role}"]
        assert errors.details["arm"] == arm and errors.value == 0
        assert errors.details["requests"] == sent.users[arm]  # one request per user, every one answered
        assert p99.details["arm"] == arm and p99.details["requests"] == sent.users[arm]
        assert 0 < p99.value <= 2500, p99.message  # the histogram's last finite bucket is 2.5 s


def test_a_worse_treatment_fails_the_ctr_gate_and_the_look(stack):
    experiment = "e2e-worse"
    sent, at = _drive(stack, experiment, 1500, {CONTROL: 0.05, TREATMENT: 0.02}, seed=2)
    results = _evaluate(stack.prometheus, experiment, HALF, at)

    ctr = results["ctrLift"]
    assert ctr.verdict is Verdict.FAILED, ctr.message
    assert "significantly worse" in ctr.message and ctr.value < 0 and ctr.interval[1] < 0
    assert ctr.details["treatment"] == {"successes": sent.clicks[TREATMENT], "trials": sent.impressions[TREATMENT]}
    # Only the CTR is wrong: the other gates pass, and one Failed gate fails the look.
    for name, result in results.items():
        if name != "ctrLift":
            assert result.verdict is Verdict.SUCCESSFUL, (name, result.message)
    assert overall(list(results.values())) is Verdict.FAILED


def test_a_split_that_does_not_match_the_weights_fails_the_sample_ratio_gate(stack):
    # The router really assigns 60/40 while the experiment's step says 50/50: what a stale or edited
    # router ConfigMap (or an assignment bug) looks like to the gate. A forced "arm" in requests cannot
    # produce this: the router leaves forced (test) traffic out of the assignment and user counts.
    experiment = "e2e-skewed"
    equal = {CONTROL: 0.05, TREATMENT: 0.05}
    sent, at = _drive(stack, experiment, 1000, equal, seed=3)
    assert sent.users[TREATMENT] > sent.users[CONTROL]

    results = _evaluate(stack.prometheus, experiment, HALF, at)
    srm = results["sampleRatio"]
    assert srm.verdict is Verdict.FAILED, srm.message
    assert "sample ratio mismatch" in srm.message and srm.value < 0.001
    assert srm.details["users"] == sent.users and srm.details["weightsBp"] == {TREATMENT: 5000, CONTROL: 5000}
    assert overall(list(results.values())) is Verdict.FAILED

    # The same counts against the weights the router really used: no mismatch.
    honest = _evaluate(stack.prometheus, experiment, SKEWED, at)["sampleRatio"]
    assert honest.verdict is Verdict.SUCCESSFUL, honest.message


def test_a_stopped_prometheus_makes_every_gate_error(stack):
    experiment = "e2e-better"
    # A second Prometheus, scraping the same routers, so the module's one stays up for the other scenarios.
    before = _evaluate(stack.doomed, experiment, HALF, at=None)
    assert not [r for r in before.values() if r.verdict is Verdict.ERROR]  # it answered
    stack.doomed.kill()  # SIGKILL: as a crash would

    results = _evaluate(stack.doomed, experiment, HALF, at=None)
    assert set(results) == set(before)
    for name, result in results.items():
        assert result.verdict is Verdict.ERROR, (name, result.verdict, result.message)
        assert "cannot reach" in result.message, result.message
    assert overall(list(results.values())) is Verdict.ERROR
