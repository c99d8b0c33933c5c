"""The gates without Prometheus: scrape the routers' ``/metrics`` and evaluate the gates' queries here.

:class:`RouterScrapeClient` is a :class:`~recops.experiments.gates.QueryClient`, so
:func:`~recops.experiments.gates.evaluate_gates` runs unchanged against it. It is what
``recops demo`` uses when there is no ``prometheus`` binary; the operator uses Prometheus.

How it answers without parsing PromQL: every query the gates send comes from a builder of
:mod:`recops.experiments.queries`, which returns a :class:`~recops.experiments.queries.PromQL`
carrying the structured query it was rendered from (counter increase summed by labels, or a
histogram quantile). This client evaluates that structure over its own scrapes, so the text
Prometheus would run and what is evaluated here come from one description. Anything else — a
``promql`` gate's free-form query — raises :class:`~recops.experiments.prometheus.PrometheusError`
"needs a Prometheus server", which the gate reports as verdict Error (and the step machine,
after ``analysis.maxConsecutiveErrors`` looks, pauses): do not declare ``promql`` gates for a run
without Prometheus.

Semantics, Prometheus' where it matters for the counts:

* Each :meth:`RouterScrapeClient.scrape` reads every router once and stamps all their samples with
  one time (the injected clock's, or ``at``); series are kept per router, as Prometheus keeps
  them per ``instance``, and summed across routers by the queries.
* ``increase`` over ``[T - window, T]`` is the last minus the first sample in the window, plus the
  value before each drop (a counter reset: the router restarted and counted from 0 again) — as
  Prometheus computes it, but **without extrapolating** to the window's edges: counts are exact
  differences of scraped values. Like Prometheus, a series needs two samples in the window, so
  events before a series' first scrape are not counted (the router creates its series at 0;
  scrape once before traffic starts).
* ``histogram_quantile`` interpolates within buckets exactly as Prometheus does; ``rate`` and
  ``increase`` differ by the constant window length, which a quantile does not see.
* ``T`` is the query's ``time``, else the newest scrape: with no ``time`` all the queries of one
  look read the same scrape.
* A router whose latest scrape failed makes every query raise ``PrometheusError`` (so every gate
  is Error) until a scrape of it succeeds: the sums over routers would otherwise be silently short,
  and a short arm looks like a sample-ratio mismatch. No scrape at all yet is no data (Inconclusive).

With ``auto_scrape`` (the default) a query first scrapes when the newest scrape attempt is older
than ``refresh_seconds``; without it only explicit :meth:`~RouterScrapeClient.scrape` calls read
the routers (a simulation on its own clock).
"""

from __future__ import annotations

import bisect
import math
import threading
import time as _time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

from recops.experiments.prometheus import PrometheusError, Sample
from recops.experiments.queries import CounterQuery, QuantileQuery, StructuredQuery, structured

# Families whose samples the gates' queries can read (``_created`` gauges and the rest are not kept).
_KEPT_TYPES = frozenset({"counter", "histogram", "unknown", "untyped"})
# The text exposition format, not OpenMetrics: what a plain Prometheus scrape of the router reads.
_ACCEPT = "text/plain;version=0.0.4;q=1,*/*;q=0.1"

Labels = tuple[tuple[str, str], ...]
Point = tuple[float, float]  # (scrape time, value)


def counter_increase(points: Sequence[Point]) -> float | None:
    """Increase of a counter over its ``(time, value)`` points, oldest first; ``None`` with fewer than two.

    Last minus first, plus the value before every drop: a drop is a reset to 0, after which the
    counter climbed to the new value (Prometheus' correction). No extrapolation.
    """
    if len(points) < 2:
        return None
    total = points[-1][1] - points[0][1]
    previous = points[0][1]
    for _, value in points[1:]:
        if value < previous:
            total += previous
        previous = value
    return total


def bucket_quantile(quantile: float, buckets: Iterable[tuple[float, float]]) -> float:
    """Prometheus' ``histogram_quantile`` for one histogram: ``buckets`` are ``(upper bound, cumulative count)``.

    NaN without a ``+Inf`` bucket, with fewer than two buckets or with no observations; a rank in
    the ``+Inf`` bucket gives the highest finite bound; otherwise linear interpolation within the
    bucket (from 0 for the first bucket when its bound is positive). Counts that decrease with the
    bound (possible when buckets are scraped at slightly different moments) are raised to the
    running maximum first, as Prometheus does.
    """
    if math.isnan(quantile):
        return math.nan
    if quantile < 0:
        return -math.inf
    if quantile > 1:
        return math.inf
    merged: dict[float, float] = {}
    for bound, count in buckets:
        merged[bound] = merged.get(bound, 0.0) + count
    ordered = sorted(merged.items())
    if not ordered or not math.isinf(ordered[-1][0]) or len(ordered) < 2:
        return math.nan
    bounds = [bound for bound, _ in ordered]
    counts: list[float] = []
    for _, count in ordered:
        counts.append(max(count, counts[-1]) if counts else count)
    observations = counts[-1]
    if observations == 0 or math.isnan(observations):
        return math.nan
    rank = quantile * observations
    # First bucket whose cumulative count reaches the rank, searching all but +Inf (Go's sort.Search).
    index = next((i for i in range(len(counts) - 1) if counts[i] >= rank), len(counts) - 1)
    if index == len(counts) - 1:
        return bounds[-2]
    if index == 0 and bounds[0] <= 0:
        return bounds[0]
    start, end, count = 0.0, bounds[index], counts[index]
    if index > 0:
        start = bounds[index - 1]
        count -= counts[index - 1]
        rank -= counts[index - 1]
    return start + (end - start) * (rank / count)


def _metrics_url(target: str) -> str:
    """``host:port`` (a Prometheus target) or an http(s) URL; no path means ``/metrics``."""
    url = target if "://" in target else f"http://{target}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"router metrics must be host:port or an http(s):// URL, got {target!r}")
    return url if parts.path not in ("", "/") else f"{url.rstrip('/')}/metrics"


def _eval_time(value: datetime | float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("datetime must be timezone-aware")
        return value.timestamp()
    return float(value)


class RouterScrapeClient:
    """A :class:`~recops.experiments.gates.QueryClient` over the routers' own ``/metrics`` (see the module docstring).

    Args:
        targets: the routers, as ``host:port`` or URLs of their metrics endpoints.
        timeout: seconds allowed for each scrape request.
        clock: the time that stamps scrapes (``time.time``; a simulation passes its own).
        auto_scrape: scrape from :meth:`query` when the newest attempt is ``refresh_seconds`` old.
        refresh_seconds: see ``auto_scrape``; one look's queries fall within it and share a scrape.
        retention_seconds: drop samples older than this at each scrape (``None`` keeps all); it must
            cover the longest window asked for (the lift gates read the whole experiment).
        transport: an ``httpx`` transport, for tests.
    """

    def __init__(
        self,
        targets: str | Sequence[str],
        *,
        timeout: float = 5.0,
        clock: Callable[[], float] = _time.time,
        auto_scrape: bool = True,
        refresh_seconds: float = 1.0,
        retention_seconds: float | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        targets = [targets] if isinstance(targets, str) else list(targets)
        if not targets:
            raise ValueError("at least one router to scrape is required")
        if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.urls = tuple(_metrics_url(target) for target in targets)
        if len(set(self.urls)) != len(self.urls):
            raise ValueError(f"routers listed twice would be counted twice: {list(self.urls)}")
        self.timeout = float(timeout)
        self.auto_scrape = auto_scrape
        self.refresh_seconds = float(refresh_seconds)
        self.retention_seconds = retention_seconds
        self._clock = clock
        # trust_env off: the routers are local or in-cluster, a stray HTTP_PROXY must not intercept scrapes.
        self._http = httpx.Client(timeout=self.timeout, transport=transport, trust_env=False)
        self._lock = threading.Lock()
        # metric (sample) name → (router index, sorted labels) → points, oldest first.
        self._series: dict[str, dict[tuple[int, Labels], list[Point]]] = {}
        self._errors: dict[str, str] = {}  # url → why its latest scrape failed
        self._last_attempt: float | None = None
        self._last_scrape: float | None = None  # newest scrape with at least one router read

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> RouterScrapeClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ scraping

    @property
    def last_scrape_at(self) -> float | None:
        """Time of the newest scrape that read at least one router (``None`` before any)."""
        return self._last_scrape

    @property
    def errors(self) -> Mapping[str, str]:
        """Routers whose latest scrape failed, and why."""
        return dict(self._errors)

    def scrape(self, at: float | None = None) -> dict[str, str | None]:
        """Read every router once, stamping the samples with ``at`` (default: the clock).

        Returns each URL's error message, or ``None`` where the scrape succeeded. Failures are not
        raised here: they make the queries raise until that router is read again.

        Raises:
            ValueError: when ``at`` is earlier than a previous scrape (history must be in time order).
        """
        stamp = float(self._clock() if at is None else at)
        if not math.isfinite(stamp):
            raise ValueError(f"scrape time must be finite, got {stamp!r}")
        # Fetch outside the lock: a slow router must not block queries over what is already stored.
        fetched: list[list[tuple[str, Labels, float]] | str] = [self._fetch(url) for url in self.urls]
        with self._lock:
            if self._last_attempt is not None and stamp < self._last_attempt:
                raise ValueError(f"scrape at {stamp} is before the previous one at {self._last_attempt}")
            self._last_attempt = stamp
            outcome: dict[str, str | None] = {}
            for index, (url, samples) in enumerate(zip(self.urls, fetched, strict=True)):
                if isinstance(samples, str):
                    self._errors[url] = samples
                    outcome[url] = samples
                    continue
                self._errors.pop(url, None)
                outcome[url] = None
                self._last_scrape = stamp
                for name, labels, value in samples:
                    points = self._series.setdefault(name, {}).setdefault((index, labels), [])
                    if points and points[-1][0] == stamp:
                        points[-1] = (stamp, value)  # two scrapes at one instant: the later wins
                    else:
                        points.append((stamp, value))
            if self.retention_seconds is not None:
                self._forget_before(stamp - self.retention_seconds)
            return outcome

    def _fetch(self, url: str) -> list[tuple[str, Labels, float]] | str:
        """The router's samples of counter and histogram families, or why they could not be read."""
        try:
            response = self._http.get(url, headers={"Accept": _ACCEPT})
        except httpx.TimeoutException as error:
            return f"cannot reach router {url}: timed out after {self.timeout:g}s ({type(error).__name__})"
        except httpx.HTTPError as error:
            return f"cannot reach router {url}: {type(error).__name__}: {error}"
        if response.status_code != 200:
            return f"router {url} answered HTTP {response.status_code}: {response.text[:200]!r}"
        try:
            return [
                (sample.name, tuple(sorted(sample.labels.items())), float(sample.value))
                for family in text_string_to_metric_families(response.text)
                if family.type in _KEPT_TYPES
                for sample in family.samples
            ]
        except (ValueError, TypeError, IndexError) as error:
            return f"router {url} sent metrics that do not parse: {error}"

    def _forget_before(self, cutoff: float) -> None:
        for series in self._series.values():
            for key, points in list(series.items()):
                first_kept = bisect.bisect_left(points, cutoff, key=lambda point: point[0])
                if first_kept == len(points):
                    del series[key]
                elif first_kept:
                    del points[:first_kept]

    # ------------------------------------------------------------------ queries

    def query(self, promql: str, *, time: datetime | float | None = None) -> list[Sample]:
        """Answer one of :mod:`~recops.experiments.queries`' queries from the scrapes (the ``QueryClient`` call).

        Raises:
            PrometheusError: for a query this client cannot evaluate (free-form PromQL: "needs a
                Prometheus server"), and while a router's latest scrape has failed.
        """
        description = structured(promql)
        if description is None:
            raise PrometheusError(
                promql,
                "needs a Prometheus server: without one the router scrape client answers only the built-in gates' "
                "queries (not free-form promql gates)",
            )
        at = _eval_time(time)
        if self.auto_scrape and (
            self._last_attempt is None or self._clock() - self._last_attempt >= self.refresh_seconds
        ):
            self.scrape()
        with self._lock:
            if self._errors:
                raise PrometheusError(promql, "; ".join(self._errors.values()))
            return self._evaluate(description, at)

    def evaluate(self, query: StructuredQuery, time: datetime | float | None = None) -> list[Sample]:
        """A structured query over what has been scraped so far (no scrape, failures not checked)."""
        with self._lock:
            return self._evaluate(query, _eval_time(time))

    def _evaluate(self, query: StructuredQuery, at: float | None) -> list[Sample]:
        if at is None:
            at = self._last_scrape if self._last_scrape is not None else float(self._clock())
        if isinstance(query, CounterQuery):
            sums = self._increases(query.metric, query.matchers, query.window_seconds, at, query.by)
            return [
                Sample({name: value for name, value in zip(query.by, group, strict=True) if value}, total, at)
                for group, total in sums.items()
            ]
        if isinstance(query, QuantileQuery):
            by_le = self._increases(f"{query.histogram}_bucket", query.matchers, query.window_seconds, at, ("le",))
            buckets = []
            for (le,), total in by_le.items():
                try:
                    buckets.append((float(le), total))
                except ValueError:
                    continue  # a bucket without a numeric bound is not part of any histogram (Prometheus skips it)
            if not buckets:
                return []
            return [Sample({}, bucket_quantile(query.quantile, buckets), at)]
        raise TypeError(f"unknown structured query {type(query).__name__}")

    def _increases(
        self, metric: str, matchers: Sequence[tuple[str, str]], window: float, at: float, by: Sequence[str]
    ) -> dict[tuple[str, ...], float]:
        """``sum by (<by>) (increase(metric{matchers}[window]))`` at ``at``: group → total."""
        start = at - window
        sums: dict[tuple[str, ...], float] = {}
        for (_, label_pairs), points in self._series.get(metric, {}).items():
            labels = dict(label_pairs)
            # Equality matchers; a missing label equals "" as in PromQL.
            if any(labels.get(name, "") != value for name, value in matchers):
                continue
            low = bisect.bisect_left(points, start, key=lambda point: point[0])
            high = bisect.bisect_right(points, at, key=lambda point: point[0])
            increase = counter_increase(points[low:high])
            if increase is None:
                continue
            group = tuple(labels.get(name, "") for name in by)
            sums[group] = sums.get(group, 0.0) + increase
        return sums

