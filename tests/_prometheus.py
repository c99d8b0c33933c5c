"""A real Prometheus for tests, scraping a simulated router's metrics.

* :class:`PrometheusProcess` runs ``prometheus`` on a free loopback port with a temporary
  config and TSDB, in its own process group so that stopping it cannot leave anything behind.
* :class:`SimulatedRouter` publishes the router's metrics (names from
  :mod:`recops.serving.contract`) from a private ``CollectorRegistry`` over
  ``prometheus_client``'s HTTP server, and drives them from simulated users.

Waiting is by polling a query until Prometheus has scraped the expected values, never a blind sleep.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from recops.experiments.prometheus_server import PrometheusProcess, poll, prometheus_binary
from recops.serving import contract
from recops.serving.processes import free_port

__all__ = ["PrometheusProcess", "SimulatedRouter", "free_port", "poll", "prometheus_binary"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


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
