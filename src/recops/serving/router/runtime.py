"""The router's live state: an immutable snapshot of the config in use, swapped atomically on reload.

A request reads :attr:`RouterRuntime.snapshot` once and uses that snapshot (arms, upstreams, limits)
to the end, so a reload never changes a request half-way. Upstreams whose settings did not change
are reused by the new snapshot (a weight change reloads nothing); the others are closed after a
grace period longer than their timeout, when no request can still be using them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

from recops.serving.assignment import ArmWeights, assign
from recops.serving.router.config import (
    ArmConfig,
    ConfigError,
    ConfigWatcher,
    Limits,
    RouterConfig,
    load_config,
)
from recops.serving.router.feedback_log import FeedbackLog, Sink
from recops.serving.router.metrics import ArmMetrics, DistinctUsers, RouterMetrics
from recops.serving.router.openapi import openapi_document
from recops.serving.router.upstream import InProcessRecommender, Recommender

log = logging.getLogger("recops.router")

PER_WORKER_LOG_ENV = "RECOPS_ROUTER_PER_WORKER_LOG"
"""Set by ``--workers N > 1``: each worker writes its own ``<stem>-<pid><suffix>`` feedback log."""

IMPRESSION_HEADROOM = 0.1
"""Impressions may fill the log queue only to 90%: the rest stays free for feedback events."""


@dataclass(slots=True)
class ArmRuntime:
    """One arm of a snapshot: its upstream and metric children."""

    name: str
    upstream: Recommender
    metrics: ArmMetrics
    experiment: str  # the distinct-user set counts a user once per experiment


@dataclass(slots=True)
class Snapshot:
    """One config version, ready to serve."""

    config: RouterConfig
    digest: str
    weights: ArmWeights
    arms: dict[str, ArmRuntime]
    openapi: bytes

    @property
    def limits(self) -> Limits:
        return self.config.limits

    def arm_for(self, user_id: str) -> ArmRuntime:
        """The user's sticky arm."""
        return self.arms[assign(self.config.salt, user_id, self.weights)]


def upstream_key(arm: ArmConfig, limits: Limits) -> Hashable:
    """What identifies an upstream: arms (and config versions) with equal keys share one upstream."""
    if arm.triton is not None:
        timeout = arm.triton.timeout_seconds or limits.upstream_timeout_seconds
        return ("triton", arm.triton.url, arm.triton.model, arm.triton.batch_rows, timeout)
    assert arm.model is not None
    return ("model", str(arm.model.resolve()), limits.upstream_timeout_seconds)


def build_upstream(key: Hashable) -> Recommender:
    """Construct the upstream for a key (blocking: loading an in-process model takes seconds)."""
    assert isinstance(key, tuple)
    if key[0] == "triton":
        _, url, model, batch_rows, timeout = key
        # Imported here: the Triton client is only needed (and only importable) where an arm uses it.
        from recops.serving.triton_client import TritonRecommender

        return TritonRecommender(url, model, timeout, batch_rows=batch_rows)
    _, path, timeout = key
    return InProcessRecommender.load(Path(path), timeout)


def _timeout_of(key: Hashable) -> float:
    assert isinstance(key, tuple)
    return float(key[-1])


class RouterRuntime:
    """Snapshot, upstream pool, feedback log and metrics of one router process."""

    def __init__(self, config_path: Path, *, reload_interval_s: float = 1.0, feedback_path: Path | None = None) -> None:
        self.config_path = config_path
        self.feedback_path = feedback_path
        """Overrides the config's ``feedback.path`` (``--feedback-path``: a file per pod, named by the pod)."""
        self.reload_interval_s = reload_interval_s
        self.metrics = RouterMetrics()
        self.snapshot: Snapshot | None = None
        self.users = DistinctUsers(1, on_reset=self.metrics.user_set_resets.inc)
        self.log: FeedbackLog | None = None
        self.log_impressions = False
        self.impression_headroom = 0
        self.in_flight = 0
        self._upstreams: dict[Hashable, Recommender] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        self._id_prefix = ""

    def next_request_id(self) -> str:
        """Unique per router process and across replicas: a random prefix and a counter (cheaper than uuid4)."""
        return f"{self._id_prefix}{next(self._ids):010x}"

    async def start(self) -> None:
        """Load the config file, build the snapshot, open the feedback log, start watching the file."""
        config, digest = await asyncio.to_thread(load_config, self.config_path)
        self._id_prefix = os.urandom(8).hex()
        snapshot, pool = await self._build(config, digest)
        self.snapshot, self._upstreams = snapshot, pool
        self.users = DistinctUsers(config.limits.max_tracked_users, on_reset=self.metrics.user_set_resets.inc)
        self.metrics.config_in_use(config.experiment, digest)
        feedback = config.feedback
        if feedback.enabled:
            path = self.feedback_path or feedback.path
            if os.environ.get(PER_WORKER_LOG_ENV) == "1":
                path = path.with_name(f"{path.stem}-{os.getpid()}{path.suffix}")
            target: Path | Sink = path
            if feedback.transport == "kafka":
                assert feedback.kafka is not None  # the config requires it with transport: kafka
                from recops.serving.router.kafka_sink import KafkaSink  # aiokafka only where Kafka is used

                target = KafkaSink(feedback.kafka)  # every worker sends to the same topic: no per-worker name
            self.log = FeedbackLog(
                target,
                capacity=feedback.queue_size,
                fsync=feedback.fsync,
                fsync_interval_s=feedback.fsync_interval_seconds,
                rotate_bytes=feedback.rotate_bytes,
                on_written=self.metrics.log_written.inc,
                on_write_error=self.metrics.log_write_errors.inc,
                on_lost=self.metrics.log_lost.inc,
            )
            try:
                await self.log.start()
            except OSError as error:
                await self.stop()
                where = "--feedback-path" if self.feedback_path else f"{self.config_path}: feedback.path"
                raise ConfigError(f"{where}: cannot open {path}: {error.strerror or error}") from None
            self.log_impressions = feedback.log_impressions
            self.impression_headroom = int(feedback.queue_size * IMPRESSION_HEADROOM)
        watcher = ConfigWatcher(self.config_path, digest, self.apply, self._refused, self.reload_interval_s)
        self._watcher = asyncio.create_task(watcher.run(), name="recops-config-watcher")
        log.info("router: experiment %s, config %s, arms %s", config.experiment, digest,
                 ", ".join(f"{a.name}={a.weight_bp}bp" for a in config.arms))

    async def stop(self) -> None:
        """Stop watching, flush and fsync the feedback log, close every upstream."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        if self.log is not None:
            await self.log.close()
            self.log = None
        self.log_impressions = False
        for task in list(self._retiring):
            task.cancel()  # closes its upstreams now (see _retire)
        await asyncio.gather(*self._retiring, return_exceptions=True)
        await _close_all(list(self._upstreams.values()))
        self._upstreams = {}
        self.snapshot = None

    async def apply(self, config: RouterConfig, digest: str) -> None:
        """Serve a new config version (the watcher's callback); raises ConfigError if it cannot be served."""
        old = self.snapshot
        snapshot, pool = await self._build(config, digest)
        stale = [upstream for key, upstream in self._upstreams.items() if key not in pool]
        grace = max((_timeout_of(key) for key in self._upstreams if key not in pool), default=0.0) + 1.0
        self.snapshot, self._upstreams = snapshot, pool  # the atomic swap: new requests see the new config
        self.users.limit = config.limits.max_tracked_users
        if stale:
            task = asyncio.create_task(self._retire(stale, grace), name="recops-retire-upstreams")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        self.metrics.config_reloads.inc()
        self.metrics.config_in_use(config.experiment, digest)
        if old is not None and old.config.feedback != config.feedback:
            log.warning("config %s: the feedback section changed; it takes effect at the next restart", digest)
        log.info("config reloaded: %s, experiment %s, arms %s", digest, config.experiment,
                 ", ".join(f"{a.name}={a.weight_bp}bp" for a in config.arms))

    def _refused(self, message: str) -> None:
        self.metrics.config_reload_errors.inc()
        current = self.snapshot.digest if self.snapshot is not None else "none"
        log.error("config reload refused, still serving %s: %s", current, message)

    async def _build(self, config: RouterConfig, digest: str) -> tuple[Snapshot, dict[Hashable, Recommender]]:
        pool: dict[Hashable, Recommender] = {}
        built: list[Recommender] = []
        arms: dict[str, ArmRuntime] = {}
        for index, arm in enumerate(config.arms):
            key = upstream_key(arm, config.limits)
            upstream = pool.get(key) or self._upstreams.get(key)
            if upstream is None:
                try:
                    upstream = await asyncio.to_thread(build_upstream, key)
                except Exception as error:
                    await _close_all(built)
                    where = "triton" if arm.triton is not None else "model"
                    raise ConfigError(
                        f"{self.config_path}: arms[{index}].{where}: cannot start the upstream: "
                        f"{type(error).__name__}: {error}"
                    ) from None
                built.append(upstream)
            pool[key] = upstream
            arms[arm.name] = ArmRuntime(
                arm.name, upstream, self.metrics.arm(config.experiment, arm.name), config.experiment
            )
        snapshot = Snapshot(config, digest, config.weights, arms, openapi_document(config))
        return snapshot, pool

    async def _retire(self, upstreams: list[Recommender], grace_s: float) -> None:
        try:
            await asyncio.sleep(grace_s)  # requests that started on the old snapshot finish meanwhile
        finally:
            await _close_all(upstreams)


async def _close_all(upstreams: list[Recommender]) -> None:
    for upstream in upstreams:
        try:
            await upstream.close()
        except Exception:
            log.exception("closing an upstream failed")
