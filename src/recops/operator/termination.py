"""What trainer pods report: the JSON termination message ``recops train`` and ``recops retrain`` write
(``{"metrics": {...}}``, ``{"skipped": "...", "events": {...}}``), read back from the pods' status."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any


def termination_message(pods: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The JSON object a container of these pods wrote before exiting 0; ``None`` when none did."""
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or ():
            terminated = (container.get("state") or {}).get("terminated") or {}
            text = terminated.get("message")
            if terminated.get("exitCode") != 0 or not text:
                continue
            try:
                message = json.loads(text)
            except ValueError:
                continue
            if isinstance(message, dict):
                return message
    return None


def awaiting_report(job: Mapping[str, Any], now: datetime, grace_seconds: float) -> bool:
    """Whether a succeeded Job's pod may still be about to show its report: it finished less than
    ``grace_seconds`` ago (a kubelet, or kwok in the tests, can post the pod's message after the Job
    controller counted it)."""
    text = (job.get("status") or {}).get("completionTime")
    finished = datetime.fromisoformat(text.replace("Z", "+00:00")) if text else now
    return (now - finished).total_seconds() < grace_seconds


def numeric(values: object, kind: type = float) -> dict[str, Any] | None:
    """The numeric entries of a reported mapping (a status holds numbers only; NaN and booleans dropped)."""
    if not isinstance(values, Mapping):
        return None
    return {str(k): kind(v) for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and v == v and (kind is float or v == int(v))}
