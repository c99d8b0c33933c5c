"""PromQL the gates send, built from the router's metric names in :mod:`recops.serving.contract`.

Pure string builders of ``(experiment, arm, window)``; nothing here talks to Prometheus.

Counts use ``sum by (arm) (increase(<counter>{experiment="..."}[<window>]))``:
``increase`` follows counter resets (a router restart starts its counters at 0 again)
and ``sum`` adds up the router replicas. Two properties of ``increase`` matter:

* It needs a sample *before* the first event to count that event. The router therefore
  creates every ``(experiment, arm[, status|event])`` series at 0 when it loads an
  experiment; a series born non-zero loses what happened before its first scrape.
* It extrapolates to the window's end (up to ~1.1 scrape intervals), so counts are not
  integers and run high by at most ``scrape_interval / series age``: under 1% an hour
  into an experiment with a 15 s scrape. Numerators and denominators of one target are
  scraped together and scale alike, so rates are unaffected; the gates round counts.
"""

from __future__ import annotations

import json
import math
import re

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
    matchers = [f"{EXPERIMENT_LABEL}={label_value(experiment)}"]
    if arm is not None:
        matchers.append(f"{ARM_LABEL}={label_value(arm)}")
    matchers.extend(f"{name}={label_value(value)}" for name, value in labels.items())
    return f"{metric}{{{','.join(matchers)}}}"


def counts_by_arm(metric: str, experiment: str, window_seconds: float, **labels: str) -> str:
    """Increase of a counter over the window, one sample per arm."""
    return f"sum by ({ARM_LABEL}) (increase({selector(metric, experiment, **labels)}[{duration(window_seconds)}]))"


def impressions_by_arm(experiment: str, window_seconds: float) -> str:
    """Items shown, per arm."""
    return counts_by_arm(contract.IMPRESSIONS, experiment, window_seconds)


def feedback_by_arm(experiment: str, event: str, window_seconds: float) -> str:
    """Feedback events of one kind (click, like, cart, purchase), per arm."""
    if event not in contract.FEEDBACK_EVENTS:
        raise ValueError(f"event must be one of {contract.FEEDBACK_EVENTS}, got {event!r}")
    return counts_by_arm(contract.FEEDBACK, experiment, window_seconds, event=event)


def users_by_arm(experiment: str, window_seconds: float) -> str:
    """Distinct users assigned, per arm (the randomisation unit: what SRM and GMV/user count)."""
    return counts_by_arm(contract.USERS, experiment, window_seconds)


def purchase_value_by_arm(experiment: str, window_seconds: float) -> str:
    """Σ purchase value (GMV), per arm."""
    return counts_by_arm(contract.PURCHASE_VALUE, experiment, window_seconds)


def purchase_value_squared_by_arm(experiment: str, window_seconds: float) -> str:
    """Σ purchase value², per arm."""
    return counts_by_arm(contract.PURCHASE_VALUE_SQUARED, experiment, window_seconds)


def requests_by_status(experiment: str, arm: str, window_seconds: float) -> str:
    """Requests of one arm per status; one query so that "no errors" is an absent status, not a missing answer."""
    return f"sum by (status) (increase({selector(contract.REQUESTS, experiment, arm)}[{duration(window_seconds)}]))"


def latency_quantile(experiment: str, arm: str, window_seconds: float, quantile: float = 0.99) -> str:
    """Quantile of the arm's request duration (seconds) over the window, from the histogram buckets.

    ``sum by (le)`` merges the replicas' histograms before interpolating; an arm
    without requests in the window gives NaN.
    """
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
    buckets = selector(f"{contract.LATENCY}_bucket", experiment, arm)
    return f"histogram_quantile({quantile:g}, sum by (le) (rate({buckets}[{duration(window_seconds)}])))"


def latency_count(experiment: str, arm: str, window_seconds: float) -> str:
    """Requests the latency histogram saw for the arm in the window."""
    return f"sum(increase({selector(f'{contract.LATENCY}_count', experiment, arm)}[{duration(window_seconds)}]))"


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
