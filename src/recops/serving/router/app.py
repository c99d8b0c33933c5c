"""The router's HTTP API: a plain Starlette app (pydantic validates, orjson encodes).

Status codes: 200/202 served; 400 body not JSON; 413 body over ``limits.maxBodyBytes``; 422 a field
missing, of the wrong type or over a limit, an unknown arm, or an item the model refuses (the
message names the field); 502 upstream failure; 503 overloaded (``Retry-After``); 504 upstream
timeout. Every refusal is ``{"error": message, "fields": [paths]}``.

The hot path does no logging and allocates little beyond the response: metric children are
resolved per arm once per config version, the request id is a prefix plus a counter.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from recops.serving.router.config import Limits, field_path, load_config
from recops.serving.router.runtime import RouterRuntime, Snapshot
from recops.serving.router.schemas import FeedbackBatch, FeedbackBody, RecommendRequest
from recops.serving.router.upstream import UpstreamBadRequest, UpstreamError, UpstreamTimeout

log = logging.getLogger("recops.router")

CONFIG_ENV = "RECOPS_ROUTER_CONFIG"
"""Config path for :func:`app_from_env` (uvicorn's factory with ``--workers N > 1``)."""
FEEDBACK_PATH_ENV = "RECOPS_ROUTER_FEEDBACK_PATH"
"""The ``--feedback-path`` override for :func:`app_from_env`."""

JSON = "application/json"
RETRY_AFTER = {"Retry-After": "1"}
_MAX_REPORTED_ERRORS = 10
_UPSTREAM_FIELD = re.compile(r"^(history|candidates|k)\b")  # the ranker's messages start with the field
_READY_TIMEOUT_S = 2.0


class Refused(Exception):
    """A request answered with a 4xx/5xx ``{"error", "fields"}`` body."""

    def __init__(self, status: int, message: str, fields: list[str] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.fields = fields or []
        self.headers = headers

    def response(self) -> Response:
        return Response(orjson.dumps({"error": str(self), "fields": self.fields}), self.status, self.headers, JSON)


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status, media_type=JSON)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise Refused(413, f"body: {length} bytes; at most {limit} (limits.maxBodyBytes)", ["body"])
    chunks = []
    size = 0
    async for chunk in request.stream():  # also bounds chunked bodies, which announce no length
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"body: more than {limit} bytes (limits.maxBodyBytes)", ["body"])
        chunks.append(chunk)
    return b"".join(chunks)


def invalid(error: ValidationError, tagged: bool = False) -> Refused:
    """A pydantic error as 400 (not JSON) or 422 naming each field (``tagged``: drop the union tag)."""
    messages, fields = [], []
    for problem in error.errors(include_url=False, include_input=False, include_context=False):
        if problem["type"] == "json_invalid":
            return Refused(400, f"body: not valid JSON: {problem['msg'].removeprefix('Invalid JSON: ')}", ["body"])
        loc = problem["loc"][1:] if tagged and problem["loc"] else problem["loc"]
        path = field_path(loc) or "body"
        if path not in fields:
            fields.append(path)
        messages.append(f"{path}: {problem['msg'].removeprefix('Value error, ')}")
        if len(messages) == _MAX_REPORTED_ERRORS:
            break
    return Refused(422, "; ".join(messages), fields)


def over_limit(request: RecommendRequest, limits: Limits) -> Refused | None:
    """The config limits a valid-looking recommend request breaks (the model enforces the static ones)."""
    if request.k > limits.max_k:
        return Refused(422, f"k: must be at most {limits.max_k} (limits.maxK), got {request.k}", ["k"])
    if len(request.history) > limits.max_history:
        return Refused(422, f"history: at most {limits.max_history} items (limits.maxHistory), "
                            f"got {len(request.history)}", ["history"])
    if request.candidates is not None and len(request.candidates) > limits.max_candidates:
        return Refused(422, f"candidates: at most {limits.max_candidates} items (limits.maxCandidates), "
                            f"got {len(request.candidates)}", ["candidates"])
    return None


def _unknown_arm(field: str, arm: str, snapshot: Snapshot) -> Refused:
    known = ", ".join(snapshot.arms)
    return Refused(422, f"{field}: unknown arm {arm!r}; configured arms: {known}", [field])


class Handlers:
    """The endpoints, over one :class:`RouterRuntime`."""

    def __init__(self, runtime: RouterRuntime) -> None:
        self.runtime = runtime

    def _snapshot(self) -> Snapshot:
        snapshot = self.runtime.snapshot
        if snapshot is None:  # only before start-up or after shutdown
            raise Refused(503, "router is not running", headers=RETRY_AFTER)
        return snapshot

    async def recommend(self, request: Request) -> Response:
        started = time.perf_counter()
        runtime = self.runtime
        try:
            snapshot = self._snapshot()
        except Refused as refused:
            return refused.response()
        try:
            body = await read_body(request, snapshot.limits.max_body_bytes)
            try:
                parsed = RecommendRequest.model_validate_json(body)
            except ValidationError as error:
                raise invalid(error) from None
            if parsed.arm is not None and parsed.arm not in snapshot.arms:
                raise _unknown_arm("arm", parsed.arm, snapshot)
        except Refused as refused:
            runtime.metrics.refused_before_arm(snapshot.config.experiment).inc()
            return refused.response()

        forced = parsed.arm is not None
        arm = snapshot.arms[parsed.arm] if parsed.arm is not None else snapshot.arm_for(parsed.user_id)
        metrics = arm.metrics
        refused = over_limit(parsed, snapshot.limits)
        if refused is not None:  # refused by the router itself: not in the latency of requests the arm served
            metrics.requests["bad_request"].inc()
            return refused.response()
        if not forced:  # forced arms are test traffic: counting them would skew the sample-ratio check
            metrics.assignments.inc()
            if runtime.users.first_time(arm.experiment, parsed.user_id):
                metrics.users.inc()
        if runtime.in_flight >= snapshot.limits.max_in_flight:
            metrics.requests["overloaded"].inc()
            return Refused(503, "overloaded: too many requests in flight", headers=RETRY_AFTER).response()

        runtime.in_flight += 1
        try:
            ranked = await arm.upstream.recommend(parsed.user_id, parsed.history, parsed.k, parsed.candidates)
        except UpstreamError as error:
            return self._upstream_failed(error, metrics, started)
        except Exception as error:  # a bug in an upstream must not become a 500 without a metric
            log.exception("upstream of arm %s raised an unexpected error", arm.name)
            return self._upstream_failed(UpstreamError(f"{type(error).__name__}: {error}"), metrics, started)
        finally:
            runtime.in_flight -= 1

        request_id = runtime.next_request_id()
        experiment = snapshot.config.experiment
        item_ids = ranked.item_ids
        payload = orjson.dumps({
            "request_id": request_id,
            "experiment": experiment,
            "arm": arm.name,
            "items": [
                {"item_id": item, "score": score, "click": click, "like": like}
                for item, score, click, like in zip(item_ids, ranked.scores, ranked.click, ranked.like, strict=True)
            ],
        })
        metrics.requests["ok"].inc()
        metrics.impressions.inc(len(item_ids))
        feedback_log = runtime.log
        if runtime.log_impressions and feedback_log is not None and item_ids:
            # Impressions are best effort under overload: the user still gets the items; a refusal is
            # counted (recops_router_feedback_log_refused_total{kind="impression"}), never silent.
            head = orjson.dumps({
                "user_id": parsed.user_id, "event": "impression", "timestamp": round(time.time(), 3),
                "request_id": request_id, "arm": arm.name, "experiment": experiment,
                **({"device": parsed.device} if parsed.device is not None else {}),
            })[:-1] + b',"item_id":'
            blob = b"".join([head + orjson.dumps(item) + b"}\n" for item in item_ids])
            if not feedback_log.offer(blob, len(item_ids), runtime.impression_headroom):
                runtime.metrics.log_refused.labels("impression").inc()
        metrics.latency.observe(time.perf_counter() - started)
        return Response(payload, media_type=JSON)

    @staticmethod
    def _upstream_failed(error: UpstreamError, metrics: Any, started: float) -> Response:
        if isinstance(error, UpstreamBadRequest):
            status, code = "bad_request", 422
        elif isinstance(error, UpstreamTimeout):
            status, code = "timeout", 504
            metrics.upstream_errors["timeout"].inc()
        else:
            status, code = "upstream_error", 502
            metrics.upstream_errors["error"].inc()
        metrics.requests[status].inc()
        metrics.latency.observe(time.perf_counter() - started)
        named = _UPSTREAM_FIELD.match(str(error))
        return Refused(code, str(error), [named.group(1)] if named else []).response()

    async def feedback(self, request: Request) -> Response:
        runtime = self.runtime
        try:
            snapshot = self._snapshot()
            body = await read_body(request, snapshot.limits.max_body_bytes)
            try:
                parsed = FeedbackBody.model_validate_json(body).root
            except ValidationError as error:
                raise invalid(error, tagged=True) from None
            batch = isinstance(parsed, FeedbackBatch)
            events = parsed.events if isinstance(parsed, FeedbackBatch) else [parsed]
            limit = snapshot.limits.max_feedback_batch
            if len(events) > limit:
                raise Refused(422, f"events: at most {limit} events per request (limits.maxFeedbackBatch), "
                                   f"got {len(events)}", ["events"])
            arms = []
            for index, event in enumerate(events):
                if event.arm is None:
                    arms.append(snapshot.arm_for(event.user_id))
                elif event.arm in snapshot.arms:
                    arms.append(snapshot.arms[event.arm])
                else:
                    raise _unknown_arm(f"events[{index}].arm" if batch else "arm", event.arm, snapshot)
        except Refused as refused:
            return refused.response()

        experiment = snapshot.config.experiment
        now = round(time.time(), 3)
        lines = []
        for event, arm in zip(events, arms, strict=True):
            line = {
                "user_id": event.user_id, "item_id": event.item_id, "event": event.event,
                "timestamp": event.timestamp if event.timestamp is not None else now,
                "request_id": event.request_id, "arm": arm.name, "experiment": experiment,
            }
            if event.value is not None:
                line["value"] = event.value
            if event.device is not None:
                line["device"] = event.device
            lines.append(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
        feedback_log = runtime.log
        if feedback_log is not None and not feedback_log.offer(b"".join(lines), len(lines)):
            runtime.metrics.log_refused.labels("feedback").inc()
            return Refused(503, "feedback log queue is full; nothing was accepted, retry later",
                           headers=RETRY_AFTER).response()
        for event, arm in zip(events, arms, strict=True):  # counted only once accepted: metrics == log
            arm.metrics.feedback[event.event].inc()
            if event.value is not None:
                arm.metrics.purchase_value.inc(event.value)
                arm.metrics.purchase_value_squared.inc(event.value * event.value)
        return _json({"accepted": len(events)}, 202)

    async def healthz(self, request: Request) -> Response:
        snapshot = self.runtime.snapshot
        if snapshot is None:
            return Refused(503, "router is not running").response()
        return _json({"status": "ok", "experiment": snapshot.config.experiment, "config_hash": snapshot.digest})

    async def readyz(self, request: Request) -> Response:
        snapshot = self.runtime.snapshot
        if snapshot is None:
            return Refused(503, "router is not running").response()
        answers = await asyncio.gather(*(_ready(arm.upstream) for arm in snapshot.arms.values()))
        arms = dict(zip(snapshot.arms, answers, strict=True))
        ready = all(arms.values())
        payload = {"ready": ready, "experiment": snapshot.config.experiment, "config_hash": snapshot.digest,
                   "arms": arms}
        return _json(payload, 200 if ready else 503)

    async def metrics(self, request: Request) -> Response:
        runtime = self.runtime
        runtime.metrics.log_queue.set(runtime.log.queued if runtime.log is not None else 0)
        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, request: Request) -> Response:
        try:
            return Response(self._snapshot().openapi, media_type=JSON)
        except Refused as refused:
            return refused.response()


async def _ready(upstream: Any) -> bool:
    try:
        async with asyncio.timeout(_READY_TIMEOUT_S):
            return bool(await upstream.ready())
    except Exception:  # an upstream that cannot say in time is not ready
        return False


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    return Refused(error.status_code, str(error.detail), headers=error.headers).response()


def create_app(config_path: Path, *, reload_interval_s: float = 1.0, feedback_path: Path | None = None) -> Starlette:
    """The router app for a config file; validates the file now (raises ConfigError) and serves it on start-up.

    ``feedback_path`` overrides the config's ``feedback.path``.

    Upstreams, the feedback log and the reload watcher start in the ASGI lifespan and stop with it
    (flushing and fsyncing the log), so run it with a lifespan-aware server (uvicorn does).
    """
    load_config(config_path)  # fail here, with the field paths, rather than inside the server
    runtime = RouterRuntime(config_path, reload_interval_s=reload_interval_s, feedback_path=feedback_path)
    handlers = Handlers(runtime)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    routes = [
        Route("/v1/recommend", handlers.recommend, methods=["POST"]),
        Route("/v1/feedback", handlers.feedback, methods=["POST"]),
        Route("/healthz", handlers.healthz, methods=["GET"]),
        Route("/readyz", handlers.readyz, methods=["GET"]),
        Route("/metrics", handlers.metrics, methods=["GET"]),
        Route("/openapi.json", handlers.openapi, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    app.state.runtime = runtime
    return app


def app_from_env() -> Starlette:
    """``create_app`` for the config named by ``$RECOPS_ROUTER_CONFIG`` (uvicorn factory for several workers)."""
    feedback_path = os.environ.get(FEEDBACK_PATH_ENV)
    return create_app(Path(os.environ[CONFIG_ENV]), feedback_path=Path(feedback_path) if feedback_path else None)
