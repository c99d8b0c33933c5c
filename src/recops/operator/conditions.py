"""Kubernetes conditions and events as values: pure helpers shared by both reconcilers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from recops.api.status import Condition

ConditionStatus = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the custom resource."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def rfc3339(moment: datetime) -> str:
    """``2026-11-29T10:00:00Z`` (whole seconds, UTC), as Kubernetes writes times."""
    return moment.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None = None,
) -> list[Condition]:
    """``conditions`` with ``type_`` set; its ``lastTransitionTime`` moves only when ``status`` changes."""
    previous = next((c for c in conditions if c.type == type_), None)
    moved = previous is None or previous.status != status
    updated = Condition(
        type=type_, status=status, reason=reason, message=message[:32768],
        last_transition_time=rfc3339(now) if moved or previous is None else previous.last_transition_time,
        observed_generation=generation,
    )
    return [updated if c.type == type_ else c for c in conditions] if previous else [*conditions, updated]


def condition_status(conditions: Sequence[Condition], type_: str) -> ConditionStatus | None:
    """The status of condition ``type_``, or ``None`` when it is absent."""
    return next((c.status for c in conditions if c.type == type_), None)
