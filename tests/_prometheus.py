"""A real Prometheus for tests, scraping a simulated router's metrics.

* :class:`PrometheusProcess` runs ``prometheus`` on a free loopback port with a temporary
  config and TSDB, in its own process group so that stopping it cannot leave anything behind.
* :class:`SimulatedRouter` publishes the router's metrics (names from
  :mod:`recops.serving.contract`) from a private ``CollectorRegistry`` over
  ``prometheus_client``'s HTTP server, and drives them from simulated users.

Waiting is by polling a query until Prometheus has scraped the expected values, never a blind sleep.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from recops.serving import contract
from recops.serving.processes import die_with_parent, free_port

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def prometheus_binary() -> str | None:
    """``$RECOPS_PROMETHEUS_BIN``, else ``prometheus`` on PATH (Debian: /usr/bin/prometheus)."""
    return os.environ.get("RECOPS_PROMETHEUS_BIN") or shutil.which("prometheus")


def poll(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Call ``check`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, ValueError, KeyError) as error:
            last_error = error
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what} (last error: {last_error})")
        time.sleep(interval)


class PrometheusProcess:
    """One ``prometheus`` server scraping ``targets`` every ``scrape_interval``."""

    def __init__(self, binary: str, workdir: Path, targets: Sequence[str], scrape_interval: str = "1s") -> None:
        self.binary = binary
        self.workdir = Path(workdir)
        self.targets = list(targets)
        self.scrape_interval = scrape_interval
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0, attempts: int = 3) -> PrometheusProcess:
        """Start and wait until ``/-/ready``; a port taken between choosing and binding is retried."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        targets = ", ".join(f'"{t}"' for t in self.targets)
        config.write_text(
            "global:\n"
            f"  scrape_interval: {self.scrape_interval}\n"
            f"  scrape_timeout: {self.scrape_interval}\n"
            f"  evaluation_interval: {self.scrape_interval}\n"
            "scrape_configs:\n"
            "  - job_name: router\n"
            f"    static_configs: [{{targets: [{targets}]}}]\n"
        )
        for attempt in range(attempts):
            self.port = free_port()
            log = (self.workdir / "prometheus.log").open("ab")
            try:
                self.process = subprocess.Popen(
                    [
                        self.binary,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                        "--log.level=warn",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # own process group: stop() signals the group, nothing leaks
                    preexec_fn=die_with_parent,
                    cwd=self.workdir,
                )
            finally:
                log.close()
            try:
                poll(self._ready, timeout, f"prometheus on port {self.port} to be ready")
                return self
            except Exception:
                exited = self.process.poll() is not None
                self.stop()
                if not exited or attempt == attempts - 1:
                    tail = (self.workdir / "prometheus.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"prometheus did not start; log tail:\n{tail}") from None
        raise AssertionError("unreachable")

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            # Not one of the errors poll() retries on: an exited server (e.g. port taken) fails at once.
            raise RuntimeError(f"prometheus exited with {self.process.returncode}")
        return httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(self.process.pid, sig)  # pgid == pid thanks to start_new_session

    def kill(self) -> None:
        """SIGKILL, as a crash would: the server stops answering at once."""
        if self.process is not None and self.process.poll() is None:
            self._signal_group(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; safe to call twice."""
        if self.process is None or self.process.poll() is not None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    # ------------------------------------------------------------------ direct reads (for waiting)

    def query(self, promql: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5.0)
        response.raise_for_status()
        body = response.json()
        if body["status"] != "success":
            raise ValueError(body)
        return body["data"]["result"]

    def values_by(self, promql: str, label: str) -> dict[str, float]:
        return {item["metric"].get(label, ""): float(item["value"][1]) for item in self.query(promql)}

    def wait_for_values(self, promql: str, label: str, expected: Mapping[str, float], timeout: float = 20.0) -> None:
        """Poll until ``promql`` (grouped by ``label``) returns exactly ``expected``."""
        wanted = {k: float(v) for k, v in expected.items()}
        poll(lambda: self.values_by(promql, label) == wanted, timeout, f"{promql} == {wanted}")


# --------------------------------------------------------------------------- the simulated router


@dataclass(frozen=True)
class ArmBehaviour:
    """How users of one arm behave: per-impression click and like rates, latency, errors, purchases."""

    ctr: float
    like_rate: float = 0.02
    latency_seconds: float = 0.03
    slow_fraction: float = 0.0  # share of requests taking slow_seconds instead
    slow_seconds: float = 0.4
    error_fraction: float = 0.0  # share of requests failing upstream
    bad_request_fraction: float = 0.0  # client errors: never counted against the arm
    purchases_per_user: float = 0.3  # Poisson mean
    mean_purchase_value: float = 50.0


@dataclass(frozen=True)
class Totals:
    """What the simulation added, per arm: what Prometheus must eventually show."""

    users: dict[str, int]
    impressions: dict[str, int]
    clicks: dict[str, int]
    likes: dict[str, int]
    requests: dict[str, int]


class SimulatedRouter:
    """The router's Prometheus metrics, exposed on a free loopback port from a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        arm = ("experiment", "arm")
        self.requests = Counter(contract.REQUESTS, "requests", (*arm, "status"), registry=self.registry)
        self.latency = Histogram(contract.LATENCY, "latency", arm, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.assignments = Counter(contract.ASSIGNMENTS, "assignments", arm, registry=self.registry)
        self.users = Counter(contract.USERS, "users", arm, registry=self.registry)
        self.impressions = Counter(contract.IMPRESSIONS, "impressions", arm, registry=self.registry)
        self.feedback = Counter(contract.FEEDBACK, "feedback", (*arm, "event"), registry=self.registry)
        self.value = Counter(contract.PURCHASE_VALUE, "gmv", arm, registry=self.registry)
        self.value_squared = Counter(contract.PURCHASE_VALUE_SQUARED, "gmv squared", arm, registry=self.registry)
        self.port = free_port()
        self._server, self._thread = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def open_experiment(self, experiment: str, arms: Sequence[str]) -> None:
        """Create every series at 0, as the router does when it loads an experiment (so increase() sees the start)."""
        for arm in arms:
            for status in contract.REQUEST_STATUSES:
                self.requests.labels(experiment, arm, status)
            for event in contract.FEEDBACK_EVENTS:
                self.feedback.labels(experiment, arm, event)
            for metric in (
                self.latency,
                self.assignments,
                self.users,
                self.impressions,
                self.value,
                self.value_squared,
            ):
                metric.labels(experiment, arm)

    def serve(
        self,
        experiment: str,
        arm_of_user: Sequence[str],
        behaviour: Mapping[str, ArmBehaviour],
        rng: np.random.Generator,
        impressions_per_user: int = 5,
    ) -> Totals:
        """Each user makes one request, sees ``impressions_per_user`` items, clicks/likes/buys at its arm's rates."""
        arms = sorted(set(arm_of_user))
        totals = Totals({}, {}, {}, {}, {})
        for arm in arms:
            b = behaviour[arm]
            n = sum(1 for a in arm_of_user if a == arm)
            impressions = n * impressions_per_user
            clicks = int(rng.binomial(impressions, b.ctr))
            likes = int(rng.binomial(impressions, b.like_rate))
            outcomes = rng.random(n)
            errors = int(np.sum(outcomes < b.error_fraction))
            bad = int(np.sum((outcomes >= b.error_fraction) & (outcomes < b.error_fraction + b.bad_request_fraction)))
            ok = n - errors - bad
            purchases = rng.poisson(b.purchases_per_user, n)
            # Lognormal values with the requested mean (sigma 0.5).
            values = rng.lognormal(math.log(b.mean_purchase_value) - 0.125, 0.5, int(purchases.sum()))

            self.users.labels(experiment, arm).inc(n)
            self.assignments.labels(experiment, arm).inc(n)
            self.impressions.labels(experiment, arm).inc(impressions)
            self.feedback.labels(experiment, arm, "click").inc(clicks)
            self.feedback.labels(experiment, arm, "like").inc(likes)
            self.feedback.labels(experiment, arm, "purchase").inc(int(purchases.sum()))
            self.value.labels(experiment, arm).inc(float(values.sum()))
            self.value_squared.labels(experiment, arm).inc(float(np.square(values).sum()))
            self.requests.labels(experiment, arm, "ok").inc(ok)
            self.requests.labels(experiment, arm, "upstream_error").inc(errors)
            self.requests.labels(experiment, arm, "bad_request").inc(bad)
            histogram = self.latency.labels(experiment, arm)
            slow = rng.random(n) < b.slow_fraction
            for is_slow in slow:
                histogram.observe(b.slow_seconds if is_slow else b.latency_seconds)

            totals.users[arm] = n
            totals.impressions[arm] = impressions
            totals.clicks[arm] = clicks
            totals.likes[arm] = likes
            totals.requests[arm] = n
        return totals
