"""The router's Prometheus metrics: the names in :mod:`recops.serving.contract`, labelled experiment and arm.

Each arm's label children are resolved once (:class:`ArmMetrics`) and reused by every request: a
``labels()`` lookup per request would cost more than the increment itself.

With ``--workers N > 1`` the CLI sets ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` sums all workers
(prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from recops.serving import contract

# ms-level latency: Triton answers in a few ms, a slow upstream in hundreds; above 2.5 s is +Inf.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

CONFIG_RELOAD_ERRORS = "recops_router_config_reload_errors_total"
CONFIG_RELOADS = "recops_router_config_reloads_total"
CONFIG_INFO = "recops_router_config_info"
LOG_WRITTEN = "recops_router_feedback_log_written_total"
LOG_REFUSED = "recops_router_feedback_log_refused_total"
LOG_WRITE_ERRORS = "recops_router_feedback_log_write_errors_total"
LOG_LOST = "recops_router_feedback_log_lost_total"
LOG_QUEUE = "recops_router_feedback_log_queue_events"
USER_SET_RESETS = "recops_router_distinct_users_resets_total"

NO_ARM = "none"
"""``arm`` label of requests refused before they had an arm (unparseable body, no user_id)."""

LABELS = ("experiment", "arm")


@dataclass(slots=True)
class ArmMetrics:
    """One arm's label children, resolved once."""

    requests: dict[str, Any]  # status → counter child
    latency: Any
    assignments: Any
    users: Any
    impressions: Any
    feedback: dict[str, Any]  # event → counter child
    purchase_value: Any
    purchase_value_squared: Any
    upstream_errors: dict[str, Any]  # kind → counter child


class RouterMetrics:
    """Every metric of one router, in its own registry (so several routers can live in one test process)."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(contract.REQUESTS, "Recommend requests by outcome.", [*LABELS, "status"], registry=r)
        self.latency = Histogram(
            contract.LATENCY, "Recommend request duration.", LABELS, buckets=LATENCY_BUCKETS, registry=r
        )
        self.assignments = Counter(contract.ASSIGNMENTS, "Recommend requests assigned to the arm.", LABELS, registry=r)
        self.users = Counter(contract.USERS, "Distinct users, counted when this router first sees one.", LABELS,
                             registry=r)
        self.impressions = Counter(contract.IMPRESSIONS, "Items shown.", LABELS, registry=r)
        self.feedback = Counter(contract.FEEDBACK, "Feedback events accepted.", [*LABELS, "event"], registry=r)
        self.purchase_value = Counter(contract.PURCHASE_VALUE, "Sum of purchase values.", LABELS, registry=r)
        self.purchase_value_squared = Counter(
            contract.PURCHASE_VALUE_SQUARED, "Sum of squared purchase values.", LABELS, registry=r
        )
        self.upstream_errors = Counter(contract.UPSTREAM_ERRORS, "Upstream failures.", [*LABELS, "kind"], registry=r)
        self.config_reload_errors = Counter(CONFIG_RELOAD_ERRORS, "Config versions refused.", registry=r)
        self.config_reloads = Counter(CONFIG_RELOADS, "Config versions applied after start-up.", registry=r)
        self.config_info = Gauge(
            CONFIG_INFO, "1 for the config in use.", ["experiment", "hash"], registry=r, multiprocess_mode="max"
        )
        self.log_written = Counter(LOG_WRITTEN, "Events written to the feedback log.", registry=r)
        self.log_refused = Counter(LOG_REFUSED, "Events refused because the log queue was full.", ["kind"],
                                   registry=r)
        self.log_write_errors = Counter(LOG_WRITE_ERRORS, "Failed feedback log writes (retried).", registry=r)
        self.log_lost = Counter(LOG_LOST, "Accepted events that could not be written at shutdown.", registry=r)
        self.log_queue = Gauge(LOG_QUEUE, "Events accepted, not yet written.", registry=r, multiprocess_mode="livesum")
        self.user_set_resets = Counter(USER_SET_RESETS, "Distinct-user set cleared at its size limit.", registry=r)
        self._arms: dict[tuple[str, str], ArmMetrics] = {}
        self._unassigned: dict[str, Any] = {}
        self._config_labels: tuple[str, str] | None = None

    def arm(self, experiment: str, arm: str) -> ArmMetrics:
        """The arm's children (created on first use, then cached)."""
        key = (experiment, arm)
        cached = self._arms.get(key)
        if cached is None:
            cached = self._arms[key] = ArmMetrics(
                requests={s: self.requests.labels(experiment, arm, s) for s in contract.REQUEST_STATUSES},
                latency=self.latency.labels(experiment, arm),
                assignments=self.assignments.labels(experiment, arm),
                users=self.users.labels(experiment, arm),
                impressions=self.impressions.labels(experiment, arm),
                feedback={e: self.feedback.labels(experiment, arm, e) for e in contract.FEEDBACK_EVENTS},
                purchase_value=self.purchase_value.labels(experiment, arm),
                purchase_value_squared=self.purchase_value_squared.labels(experiment, arm),
                upstream_errors={k: self.upstream_errors.labels(experiment, arm, k) for k in ("error", "timeout")},
            )
        return cached

    def refused_before_arm(self, experiment: str) -> Any:
        """``requests_total{arm="none", status="bad_request"}``: requests refused before they had an arm.

        Only this one series exists for ``arm="none"``: per-arm sums (users, impressions) stay over real arms.
        """
        child = self._unassigned.get(experiment)
        if child is None:
            child = self._unassigned[experiment] = self.requests.labels(experiment, NO_ARM, "bad_request")
        return child

    def config_in_use(self, experiment: str, digest: str) -> None:
        """Point ``recops_router_config_info`` at this config (the previous one drops to 0 / disappears)."""
        if self._config_labels is not None and self._config_labels != (experiment, digest):
            self.config_info.labels(*self._config_labels).set(0)
            if not self.multiprocess:  # multiprocess files keep removed series; 0 says "not in use" there
                self.config_info.remove(*self._config_labels)
        self._config_labels = (experiment, digest)
        self.config_info.labels(experiment, digest).set(1)

    def render(self) -> bytes:
        """The Prometheus text exposition of this router (all workers in multiprocess mode)."""
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class DistinctUsers:
    """Answers "first time this router sees this user in this experiment?" with a set of 64-bit hashes.

    A user is counted once, under the arm they had when first seen. A ramp that later moves them to
    another arm does not count them again: within any window, only users new to the experiment are
    counted, and those split exactly by the current weights (what the sample-ratio gate tests).

    Memory: a Python int (36 B) plus its set slot (~27 B at the set's load factor) ≈ 64 bytes per
    user, so the default limit of 1,000,000 users is ~64 MB. At the limit the set is cleared, exactly
    as a restart would (counted in ``recops_router_distinct_users_resets_total``): returning users are
    counted again, but memory stays bounded.
    """

    def __init__(self, limit: int, on_reset: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self._seen: set[int] = set()
        self._on_reset = on_reset

    def first_time(self, experiment: str, user_id: str) -> bool:
        """True exactly once per (experiment, user) between resets."""
        # hash() is salted per process, which is fine: the set lives and dies with the process.
        key = hash((experiment, user_id))
        if key in self._seen:
            return False
        if len(self._seen) >= self.limit:
            self._seen.clear()
            if self._on_reset is not None:
                self._on_reset()
        self._seen.add(key)
        return True

    def __len__(self) -> int:
        return len(self._seen)
