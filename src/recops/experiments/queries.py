"""PromQL the gates send, built from the router's metric names in :mod:`recops.serving.contract`.

Pure builders of ``(experiment, arm, window)``; nothing here talks to Prometheus. Each returns
:class:`PromQL`: the query's text, carrying the structured description it was rendered from
(:class:`CounterQuery`, :class:`QuantileQuery`) so that :mod:`recops.experiments.scrape` can
evaluate the very same query without a Prometheus server and without parsing PromQL.

Counts are exact differences of scraped values, summed by arm over the router replicas:
``max_over_time(c[w]) - min_over_time(c[w])`` per series (a counter's last minus its first sample
in the window), and ``increase(c[w])`` only for a series that reset in the window (a router
restarted and counted from 0 again: ``increase`` corrects for that). Not ``increase`` everywhere,
because it extrapolates the sampled interval to the window's edges: over a step window of ``w``
seconds with scrape interval ``s`` it multiplies every count by up to ``w / (w - s)``, twice the
users at a first look two seconds into a step. Rates keep their value under that scaling, but the
sample-ratio check's evidence grows with it: at 2x its p-values are those of twice the users,
and a healthy 50/50 split failed ``alpha = 0.001`` about as often as ``alpha = 0.02`` would.
Exact counts are what :mod:`recops.experiments.scrape` computes too, so both evaluators agree.

A counter needs a sample *before* the first event to count that event: the router therefore
creates every ``(experiment, arm[, status|event])`` series at 0 when it loads an experiment; a
series born non-zero loses what happened before its first scrape.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from recops.serving import contract

EXPERIMENT_LABEL = "experiment"
ARM_LABEL = "arm"

# Failures of the arm itself: Triton answered with an error or not in time.
ERROR_STATUSES = ("upstream_error", "timeout")
# Requests the arm was asked to answer. bad_request is the client's fault (a malformed body is
# refused before any model runs) and overloaded is the router shedding load before calling Triton:
# neither says anything about the model, so they count neither as errors nor as attempts.
ATTEMPT_STATUSES = ("ok", *ERROR_STATUSES)

_PLACEHOLDER = re.compile(r"\$(experiment|arm|window)\b")


def label_value(value: str) -> str:
    """``value`` as a double-quoted PromQL string literal, escaped.

    PromQL string literals follow Go's escaping; JSON's escapes (``\\"``, ``\\\\``,
    ``\\n``, ``\\uXXXX`` for other control characters) are a subset of those, so
    ``json.dumps`` is exact. Non-ASCII stays as UTF-8.
    """
    if not isinstance(value, str):
        raise TypeError(f"label value must be a string, got {type(value).__name__}")
    return json.dumps(value, ensure_ascii=False)


def duration(seconds: float) -> str:
    """A PromQL range duration: whole seconds as ``300s``, anything finer in milliseconds (``1500ms``)."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
        raise ValueError(f"window must be a finite number of seconds, got {seconds!r}")
    millis = round(seconds * 1000)
    if millis < 1:
        raise ValueError(f"window must be at least 1ms, got {seconds!r}s")
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def selector(metric: str, experiment: str, arm: str | None = None, **labels: str) -> str:
    """``metric{experiment="...",arm="...",k="v"}`` with every value escaped."""
    return _render_selector(metric, _matchers(experiment, arm, **labels))


# --------------------------------------------------------------------------- structured queries
#
# Each builder below describes its query as data (metric, label matchers, window, aggregation) and
# renders the PromQL text from that description. Prometheus receives the text; the router scrape
# client (:mod:`recops.experiments.scrape`) evaluates the description over its own samples. One
# description, two evaluators: the fallback cannot drift from what Prometheus is asked.

Matchers = tuple[tuple[str, str], ...]


def _matchers(experiment: str, arm: str | None = None, **labels: str) -> Matchers:
    matchers = [(EXPERIMENT_LABEL, experiment)]
    if arm is not None:
        matchers.append((ARM_LABEL, arm))
    matchers.extend(labels.items())
    for _, value in matchers:
        label_value(value)  # type check, same error as the text form
    return tuple(matchers)


def _render_selector(metric: str, matchers: Matchers) -> str:
    return f"{metric}{{{','.join(f'{name}={label_value(value)}' for name, value in matchers)}}}"


@dataclass(frozen=True)
class CounterQuery:
    """A counter's increase over the window (exact: last minus first sample), summed over series.

    ``matchers`` are label equality matchers (a missing label equals ``""``, as in PromQL); ``by``
    the labels kept by the sum (empty: one total).
    """

    metric: str
    matchers: Matchers
    window_seconds: float
    by: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        duration(self.window_seconds)  # refuse bad windows when built, not when sent

    def render(self) -> str:
        """The PromQL text: exact per-series differences, ``increase`` where a series reset (module docstring)."""
        aggregation = f"sum by ({', '.join(self.by)})" if self.by else "sum"
        ranged = f"{_render_selector(self.metric, self.matchers)}[{duration(self.window_seconds)}]"
        exact = f"(max_over_time({ranged}) - min_over_time({ranged})) unless resets({ranged}) > 0"
        return f"{aggregation} (({exact}) or increase({ranged}))"


@dataclass(frozen=True)
class QuantileQuery:
    """``histogram_quantile(q, sum by (le) (rate(<histogram>_bucket{<matchers>}[<window>])))``.

    ``histogram`` is the histogram's base name (without ``_bucket``).
    """

    quantile: float
    histogram: str
    matchers: Matchers
    window_seconds: float

    def __post_init__(self) -> None:
        if not 0 < self.quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {self.quantile!r}")
        duration(self.window_seconds)

    def render(self) -> str:
        """The PromQL text."""
        buckets = _render_selector(f"{self.histogram}_bucket", self.matchers)
        return f"histogram_quantile({self.quantile:g}, sum by (le) (rate({buckets}[{duration(self.window_seconds)}])))"


StructuredQuery = CounterQuery | QuantileQuery


class PromQL(str):
    """PromQL text that remembers the :data:`StructuredQuery` it was rendered from (``.structured``).

    A ``str`` subclass, so every client that takes PromQL text (``QueryClient.query``, a dict of
    canned answers in tests) takes it unchanged; a client that cannot run PromQL reads
    ``.structured`` instead. Any string operation on it gives a plain ``str``: an edited query is
    no longer the one described.
    """

    structured: StructuredQuery

    def __new__(cls, structured: StructuredQuery) -> PromQL:
        text = super().__new__(cls, structured.render())
        text.structured = structured
        return text

    def __reduce__(self) -> tuple[type[PromQL], tuple[StructuredQuery]]:
        return PromQL, (self.structured,)


def structured(promql: str) -> StructuredQuery | None:
    """The description behind ``promql`` when one of this module's builders made it, else ``None``."""
    return getattr(promql, "structured", None)


# --------------------------------------------------------------------------- the gates' queries


def counts_by_arm(metric: str, experiment: str, window_seconds: float, **labels: str) -> PromQL:
    """Increase of a counter over the window, one sample per arm."""
    return PromQL(CounterQuery(metric, _matchers(experiment, **labels), window_seconds, (ARM_LABEL,)))


def impressions_by_arm(experiment: str, window_seconds: float) -> PromQL:
    """Items shown, per arm."""
    return counts_by_arm(contract.IMPRESSIONS, experiment, window_seconds)


def feedback_by_arm(experiment: str, event: str, window_seconds: float) -> PromQL:
    """Feedback events of one kind (click, like, cart, purchase), per arm."""
    if event not in contract.FEEDBACK_EVENTS:
        raise ValueError(f"event must be one of {contract.FEEDBACK_EVENTS}, got {event!r}")
    return counts_by_arm(contract.FEEDBACK, experiment, window_seconds, event=event)


def users_by_arm(experiment: str, window_seconds: float) -> PromQL:
    """Distinct users assigned, per arm (the randomisation unit: what SRM and GMV/user count)."""
    return counts_by_arm(contract.USERS, experiment, window_seconds)


def purchase_value_by_arm(experiment: str, window_seconds: float) -> PromQL:
    """Σ purchase value (GMV), per arm."""
    return counts_by_arm(contract.PURCHASE_VALUE, experiment, window_seconds)


def purchase_value_squared_by_arm(experiment: str, window_seconds: float) -> PromQL:
    """Σ purchase value², per arm."""
    return counts_by_arm(contract.PURCHASE_VALUE_SQUARED, experiment, window_seconds)


def requests_by_status(experiment: str, arm: str, window_seconds: float) -> PromQL:
    """Requests of one arm per status; one query so that "no errors" is an absent status, not a missing answer."""
    return PromQL(CounterQuery(contract.REQUESTS, _matchers(experiment, arm), window_seconds, ("status",)))


def latency_quantile(experiment: str, arm: str, window_seconds: float, quantile: float = 0.99) -> PromQL:
    """Quantile of the arm's request duration (seconds) over the window, from the histogram buckets.

    ``sum by (le)`` merges the replicas' histograms before interpolating; an arm
    without requests in the window gives NaN.
    """
    return PromQL(QuantileQuery(quantile, contract.LATENCY, _matchers(experiment, arm), window_seconds))


def latency_count(experiment: str, arm: str, window_seconds: float) -> PromQL:
    """Requests the latency histogram saw for the arm in the window."""
    return PromQL(CounterQuery(f"{contract.LATENCY}_count", _matchers(experiment, arm), window_seconds))


def render_template(template: str, experiment: str, arm: str, window_seconds: float) -> str:
    """Fill a ``promql`` gate's query: ``$experiment``, ``$arm`` (escaped) and ``$window`` (a duration).

    Values are escaped for use *inside* the quotes the template writes
    (``{experiment="$experiment"}``), so a name with a quote cannot break out of them.
    """
    values = {
        "experiment": label_value(experiment)[1:-1],
        "arm": label_value(arm)[1:-1],
        "window": duration(window_seconds),
    }
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)
