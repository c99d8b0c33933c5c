"""A small client of the Prometheus HTTP API (``/api/v1/query`` and ``/api/v1/query_range``).

Every way a query can go wrong — no connection, a timeout, an HTTP error, a
``status: error`` answer, a payload of the wrong shape — raises
:class:`PrometheusError` naming the query and the cause. Nothing is swallowed and
nothing becomes a zero: a gate that cannot read its metric must say so (verdict
Error), not decide on a made-up number.

Values arrive as strings; ``"NaN"``, ``"+Inf"`` and ``"-Inf"`` become ``math.nan``,
``math.inf`` and ``-math.inf`` (a p99 of an arm without traffic is NaN, and that
means "no data", which the caller must tell apart from 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx

_SPECIAL_VALUES = {"NaN": math.nan, "+Inf": math.inf, "-Inf": -math.inf, "Inf": math.inf}


class PrometheusError(RuntimeError):
    """A query that returned no usable answer; ``query`` and ``cause`` say which and why."""

    def __init__(self, query: str, cause: str) -> None:
        query = str(query)  # plain text, also for a queries.PromQL (which YAML's safe dumper would refuse)
        super().__init__(f"Prometheus query {query!r} failed: {cause}")
        self.query = query
        self.cause = cause


@dataclass(frozen=True)
class Sample:
    """One element of an instant vector (or a scalar, with no labels)."""

    labels: Mapping[str, str]
    value: float  # may be NaN or ±Inf: check math.isfinite before comparing
    timestamp: float  # unix seconds of the evaluation


@dataclass(frozen=True)
class Series:
    """One series of a range query: its labels and ``(timestamp, value)`` points, oldest first."""

    labels: Mapping[str, str]
    points: tuple[tuple[float, float], ...] = field(default_factory=tuple)


def parse_value(raw: Any) -> float:
    """A Prometheus sample value (always a JSON string) as a float; NaN and ±Inf explicitly.

    Raises:
        ValueError: when ``raw`` is not a string holding a number.
    """
    if not isinstance(raw, str):
        raise ValueError(f"sample value must be a string, got {raw!r}")
    if raw in _SPECIAL_VALUES:
        return _SPECIAL_VALUES[raw]
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"sample value is not a number: {raw!r}") from None
    # float() also accepts spellings such as "nan" or "infinity"; Prometheus never sends them, keep them out.
    if not math.isfinite(value):
        raise ValueError(f"sample value is not a number Prometheus would send: {raw!r}")
    return value


def _timestamp(value: datetime | float | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("datetime must be timezone-aware")
        return f"{value.timestamp():.3f}"
    return f"{float(value):.3f}"


def _point(raw: Any) -> tuple[float, float]:
    if not (isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], int | float)):
        raise ValueError(f'a sample must be [timestamp, "value"], got {raw!r}')
    return float(raw[0]), parse_value(raw[1])


def _labels(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise ValueError(f"'metric' must map label names to strings, got {raw!r}")
    return dict(raw)


class PrometheusClient:
    """Synchronous Prometheus query client.

    Args:
        url: base URL of Prometheus (``http://prometheus:9090``; a path prefix is kept).
        timeout: seconds allowed for each request (connect, read and write each).
        transport: an ``httpx`` transport, for tests.
        headers: extra headers (e.g. ``Authorization``).
        trust_env: read proxy settings from the environment. Off by default: Prometheus is
            usually in-cluster, and a stray ``HTTP_PROXY`` would send the gates' queries elsewhere.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
        trust_env: bool = False,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"Prometheus URL must be http(s)://host[:port][/prefix], got {url!r}")
        if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self._http = httpx.Client(
            base_url=self.url + "/",
            timeout=self.timeout,
            transport=transport,
            headers=dict(headers or {}),
            trust_env=trust_env,
        )

    @classmethod
    def from_spec(cls, spec: Any, **kwargs: Any) -> PrometheusClient:
        """A client for a RecExperiment's ``spec.prometheus`` (``url``, ``timeout_seconds``)."""
        return cls(spec.url, timeout=spec.timeout_seconds, **kwargs)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> PrometheusClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ queries

    def query(self, promql: str, *, time: datetime | float | None = None) -> list[Sample]:
        """Evaluate an instant query; a vector gives one :class:`Sample` per series, a scalar one unlabelled sample.

        An empty list means the query matched no series (e.g. no traffic yet): that is data, not an error.

        Raises:
            PrometheusError: on any failure, or when the result is a matrix or a string.
        """
        params = {"query": promql}
        stamp = _timestamp(time)
        if stamp is not None:
            params["time"] = stamp
        data = self._call("api/v1/query", params, promql)
        try:
            result_type, result = data["resultType"], data["result"]
            if result_type == "vector":
                if not isinstance(result, list):
                    raise ValueError("vector result is not a list")
                samples = []
                for item in result:
                    if not isinstance(item, dict):
                        raise ValueError(f"vector element is not an object: {item!r}")
                    timestamp, value = _point(item.get("value"))
                    samples.append(Sample(labels=_labels(item.get("metric", {})), value=value, timestamp=timestamp))
                return samples
            if result_type == "scalar":
                timestamp, value = _point(result)
                return [Sample(labels={}, value=value, timestamp=timestamp)]
            if result_type in ("matrix", "string"):
                raise PrometheusError(promql, f"expected an instant vector or a scalar, got a {result_type}")
            raise ValueError(f"unknown resultType {result_type!r}")
        except (KeyError, TypeError, ValueError) as error:
            raise PrometheusError(promql, f"malformed response: {error}") from None

    def query_range(self, promql: str, *, start: datetime | float, end: datetime | float, step: float) -> list[Series]:
        """Evaluate a range query from ``start`` to ``end`` every ``step`` seconds.

        Raises:
            PrometheusError: on any failure, or when the result is not a matrix.
        """
        if not (isinstance(step, int | float) and math.isfinite(step) and step > 0):
            raise ValueError(f"step must be a positive number of seconds, got {step!r}")
        params = {"query": promql, "start": _timestamp(start), "end": _timestamp(end), "step": f"{float(step):g}"}
        data = self._call("api/v1/query_range", params, promql)
        try:
            if data["resultType"] != "matrix":
                raise PrometheusError(promql, f"expected a matrix, got a {data['resultType']}")
            series = []
            for item in data["result"]:
                points = tuple(_point(p) for p in item.get("values", []))
                series.append(Series(labels=_labels(item.get("metric", {})), points=points))
            return series
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise PrometheusError(promql, f"malformed response: {error}") from None

    # ------------------------------------------------------------------ transport

    def _call(self, path: str, params: Mapping[str, Any], promql: str) -> dict[str, Any]:
        # POST with a form body: the documented alternative to GET that has no URL-length limit.
        try:
            response = self._http.post(path, data=dict(params))
        except httpx.TimeoutException as error:
            raise PrometheusError(promql, f"timed out after {self.timeout:g}s ({type(error).__name__})") from None
        except httpx.HTTPError as error:
            raise PrometheusError(promql, f"cannot reach {self.url}: {type(error).__name__}: {error}") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and body.get("status") == "error":
            # Prometheus answers bad queries with 400 (bad_data) and failed evaluations with 422/503,
            # always with this JSON envelope: its message is the useful part.
            raise PrometheusError(
                promql, f"HTTP {response.status_code}, {body.get('errorType', 'error')}: {body.get('error', '?')}"
            )
        if response.status_code != 200:
            raise PrometheusError(promql, f"HTTP {response.status_code}: {response.text[:200]!r}")
        if not isinstance(body, dict):
            raise PrometheusError(promql, f"malformed response: not a JSON object: {response.text[:200]!r}")
        if body.get("status") != "success":
            raise PrometheusError(promql, f"malformed response: status is {body.get('status')!r}")
        data = body.get("data")
        if not isinstance(data, dict):
            raise PrometheusError(promql, "malformed response: no 'data' object")
        return data
