"""The router's config file (YAML; a ConfigMap in the cluster): models, loading and the reload watcher.

Example (every field but ``experiment``, ``salt`` and ``arms`` has a default)::

    experiment: ranker-v2
    salt: ranker-v2-2024-06          # change it to reshuffle users (a new experiment)
    arms:                            # in order; the LAST arm is control
      - name: treatment
        weightBp: 1000               # basis points: 1000 = 10% of users
        triton: {url: "127.0.0.1:8002", model: recops_ensemble, timeoutSeconds: 0.5}
      - name: control
        weightBp: 9000
        model: /models/v1            # an exported model directory, served in-process (development)
    limits: {maxK: 100, maxHistory: 200, maxBodyBytes: 65536, upstreamTimeoutSeconds: 1.0}
    feedback: {path: /var/log/recops/feedback.jsonl, fsync: interval, rotateBytes: 268435456}
    # or, to a Kafka topic (key user_id; read back with `recops feedback pull`):
    # feedback: {transport: kafka, kafka: {bootstrapServers: "kafka-0:9092", topic: recops-feedback}}

Weights are integer basis points (0.01%, one of :mod:`recops.serving.assignment`'s 10,000 buckets):
exact, no rounding, and the same unit as :class:`~recops.serving.assignment.ArmWeights`, which
validates the layout (sum 10,000; each treatment within its slot so ramps stay monotone).

Relative paths (``model``, ``feedback.path``) are relative to the router's working directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from recops.api.common import SpecModel
from recops.serving.assignment import BUCKETS, ArmWeights, Salt
from recops.serving.contract import ENSEMBLE

log = logging.getLogger("recops.router")

Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^\S(.*\S)?$")]


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and each wrong field by its path."""


def field_path(loc: Sequence[str | int]) -> str:
    """``("arms", 1, "weightBp")`` → ``arms[1].weightBp``: how users write a path into YAML or JSON."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def format_errors(error: ValidationError) -> str:
    """One ``field.path: message`` line per problem."""
    problems = error.errors(include_url=False, include_input=False)
    lines = []
    for problem in problems:
        loc = problem["loc"]
        # pydantic adds "should have at least 1 item" to a sequence whose items all failed: noise.
        if problem["type"] == "too_short" and any(p["loc"][: len(loc)] == loc and p["loc"] != loc for p in problems):
            continue
        lines.append(f"{field_path(loc) or '(top level)'}: {problem['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


class TritonUpstream(SpecModel):
    """An arm served by Triton's ensemble over gRPC."""

    url: str = Field(pattern=r"^[^\s:/]+:\d{1,5}$", description="gRPC endpoint host:port, e.g. 127.0.0.1:8001.")
    model: str = Field(ENSEMBLE, min_length=1, description="Triton model name.")
    timeout_seconds: float | None = Field(
        None, gt=0, le=60, description="Per-request timeout; default limits.upstreamTimeoutSeconds."
    )
    batch_rows: int = Field(
        32,
        ge=1,
        le=4096,
        description="Micro-batching: requests arriving together travel as up to this many rows of one Triton "
        "request (capped at the model's max_batch_size); 1 sends each request alone.",
    )


class ArmConfig(SpecModel):
    """One arm: name, share of users and exactly one upstream (``model`` or ``triton``)."""

    name: Name
    weight_bp: int = Field(ge=0, le=BUCKETS, strict=True, description="Share of users in basis points (0.01%).")
    model: Path | None = Field(None, description="Exported model directory served in-process (development).")
    triton: TritonUpstream | None = None

    @field_validator("model")
    @classmethod
    def _model_is_a_directory(cls, model: Path | None) -> Path | None:
        if model is not None and not model.is_dir():
            raise ValueError(f"not a directory: {model} (an exported model directory)")
        return model

    @model_validator(mode="after")
    def _one_upstream(self) -> ArmConfig:
        if (self.model is None) == (self.triton is None):
            raise ValueError("give exactly one upstream: 'model' (an exported model directory) or 'triton'")
        return self


class Limits(SpecModel):
    """Request limits; a request over one is refused with 4xx naming the field."""

    max_k: int = Field(100, ge=1, le=10_000, description="Largest k a request may ask for.")
    max_history: int = Field(200, ge=0, le=100_000, description="Most history items in a request.")
    max_candidates: int = Field(1000, ge=1, le=1_000_000, description="Most candidates in a request.")
    max_body_bytes: int = Field(65_536, ge=1024, le=64 * 2**20, description="Largest request body.")
    max_feedback_batch: int = Field(100, ge=1, le=100_000, description="Most events in one feedback batch.")
    max_in_flight: int = Field(4096, ge=1, description="Recommend requests in flight before 503 (load shedding).")
    max_tracked_users: int = Field(
        1_000_000, ge=1, description="Distinct-user set size before it is cleared (~64 bytes per user)."
    )
    upstream_timeout_seconds: float = Field(1.0, gt=0, le=60, description="Default per-request upstream timeout.")


_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^\s:/,\[\]]+):(\d{1,5})$")
_TOPIC = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")


class KafkaFeedbackConfig(SpecModel):
    """The Kafka feedback transport (:mod:`recops.serving.router.kafka_sink`): an idempotent producer, acks=all."""

    bootstrap_servers: str = Field(description="Comma-separated host:port list, e.g. kafka-0:9092,kafka-1:9092.")
    topic: str = Field("recops-feedback", description="Topic of the feedback events (key: user_id).")
    acks: Literal["all"] = Field(
        "all", description="Only 'all': the idempotent producer needs it, and an accepted event must survive a broker."
    )
    client_id: str = Field("recops-router", min_length=1, max_length=255)
    linger_ms: int = Field(5, ge=0, le=10_000, description="How long the producer waits to fill a batch.")
    delivery_timeout_seconds: float = Field(
        30.0, gt=0, le=600, description="One send attempt's limit before the writer retries it (back-off)."
    )

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_ports(cls, value: str) -> str:
        servers = [server.strip() for server in value.split(",")]
        if not value.strip() or not all(servers):
            raise ValueError("give one or more host:port, comma-separated (e.g. 127.0.0.1:9092)")
        for server in servers:
            match = _HOST_PORT.match(server)
            if match is None or not 0 < int(match.group(2)) < 65536:
                raise ValueError(f"{server!r} is not host:port (port 1-65535)")
        return ",".join(servers)

    @field_validator("topic")
    @classmethod
    def _topic_name(cls, value: str) -> str:
        if not _TOPIC.match(value) or value in (".", ".."):
            raise ValueError(f"{value!r} is not a Kafka topic name (1-249 of a-z A-Z 0-9 . _ -)")
        return value

    @field_validator("acks", mode="before")
    @classmethod
    def _acks_all(cls, value: object) -> object:
        if value in ("all", -1, "-1"):
            return "all"
        raise ValueError(f"{value!r} is not allowed: only 'all' (-1), so no accepted event rests on one broker "
                         "and the producer can be idempotent")


class FeedbackLogConfig(SpecModel):
    """The durable feedback log. Read at start-up only: a change here needs a restart."""

    enabled: bool = True
    path: Path = Field(Path("feedback/feedback.jsonl"), description="Current log file; rotated files beside it.")
    log_impressions: bool = Field(True, description="Also log each recommend response's items as impressions.")
    fsync: Literal["always", "interval", "never"] = Field(
        "interval", description="always: after every write; interval: at most fsyncIntervalSeconds later; never."
    )
    fsync_interval_seconds: float = Field(1.0, gt=0, le=3600)
    rotate_bytes: int = Field(256 * 2**20, ge=0, description="Rotate before the file passes this size; 0: never.")
    queue_size: int = Field(100_000, ge=1, description="Events accepted but not yet written before 503.")
    transport: Literal["file", "kafka"] = Field(
        "file", description="file: the JSONL file at path; kafka: messages on kafka.topic (path and fsync unused)."
    )
    kafka: KafkaFeedbackConfig | None = Field(None, description="The Kafka transport; required with transport: kafka.")

    @model_validator(mode="after")
    def _kafka_when_chosen(self) -> FeedbackLogConfig:
        if self.transport == "kafka" and self.kafka is None:
            raise ValueError("transport is kafka: give feedback.kafka (at least bootstrapServers)")
        return self


class RouterConfig(SpecModel):
    """The whole router config file."""

    experiment: Name
    salt: Salt = Field(description="Assignment salt; no NUL character.")
    arms: tuple[ArmConfig, ...] = Field(min_length=1, description="Arms in order; the last one is control.")
    limits: Limits = Limits()
    feedback: FeedbackLogConfig = FeedbackLogConfig()

    @field_validator("arms")
    @classmethod
    def _valid_weights(cls, arms: tuple[ArmConfig, ...]) -> tuple[ArmConfig, ...]:
        try:
            ArmWeights(arms=[(arm.name, arm.weight_bp) for arm in arms])
        except ValidationError as error:
            raise ValueError("; ".join(p["msg"].removeprefix("Value error, ") for p in error.errors())) from None
        return arms

    @model_validator(mode="after")
    def _batch_fits_queue(self) -> RouterConfig:
        if self.feedback.enabled and self.limits.max_feedback_batch > self.feedback.queue_size:
            raise ValueError(
                f"limits.maxFeedbackBatch ({self.limits.max_feedback_batch}) must not exceed "
                f"feedback.queueSize ({self.feedback.queue_size}): such a batch could never be accepted"
            )
        return self

    @property
    def weights(self) -> ArmWeights:
        """The arms as :class:`ArmWeights` (valid: checked when the config was loaded)."""
        return ArmWeights(arms=[(arm.name, arm.weight_bp) for arm in self.arms])


def digest_of(content: bytes) -> str:
    """Short content hash identifying a config version (logs and ``recops_router_config_info``)."""
    return hashlib.sha256(content).hexdigest()[:16]


def parse_config(content: bytes, source: str) -> RouterConfig:
    """Validate the bytes of a config file; :class:`ConfigError` names the file and the wrong fields."""
    try:
        document = yaml.safe_load(content)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: expected a mapping of router settings, got {type(document).__name__}")
    try:
        return RouterConfig.model_validate(document)
    except ValidationError as error:
        raise ConfigError(f"{source}: invalid router config\n{format_errors(error)}") from None


def load_config(path: Path) -> tuple[RouterConfig, str]:
    """Read and validate a config file; returns it with its content digest."""
    try:
        content = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from None
    return parse_config(content, str(path)), digest_of(content)


class ConfigWatcher:
    """Polls the config file and applies each new version; a bad version is refused and reported once.

    Compares content hashes, not mtimes: a Kubernetes ConfigMap update swaps a symlink
    (``..data``), which leaves the mounted file's own mtime alone.
    """

    def __init__(
        self,
        path: Path,
        digest: str,
        apply: Callable[[RouterConfig, str], Awaitable[None]],
        refused: Callable[[str], None],
        interval_s: float = 1.0,
    ) -> None:
        self.path = path
        self.digest = digest  # of the config in use
        self._apply = apply
        self._refused = refused
        self.interval_s = interval_s
        self._bad: str | None = None  # digest (or error) of the last refused version: report it only once

    async def check(self) -> None:
        """Read the file once; apply it when its content changed and is valid."""
        try:
            content = await asyncio.to_thread(self.path.read_bytes)
        except OSError as error:
            self._refuse(f"missing:{error.errno}", f"{self.path}: cannot read: {error.strerror or error}")
            return
        digest = digest_of(content)
        if digest in (self.digest, self._bad):
            return
        try:
            config = parse_config(content, str(self.path))
            await self._apply(config, digest)
        except ConfigError as error:
            self._refuse(digest, str(error))
            return
        self.digest, self._bad = digest, None

    def _refuse(self, key: str, message: str) -> None:
        if key != self._bad:
            self._bad = key
            self._refused(message)

    async def run(self) -> None:
        """Check forever (cancel the task to stop)."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:  # never let the watcher die: the router would silently stop reloading
                log.exception("config watcher: unexpected error while checking %s", self.path)
