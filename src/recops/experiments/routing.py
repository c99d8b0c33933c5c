"""The router config of a RecExperiment at a given treatment weight: one builder for the operator's
ConfigMap and for ``recops demo``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from recops.api.recexperiment import RecExperimentSpec
from recops.serving.assignment import BUCKETS

TREATMENT, CONTROL = "treatment", "control"
"""Arm names in the router and its metrics; the gates query them by these names."""


def router_config(
    experiment: str,
    spec: RecExperimentSpec,
    treatment_bp: int,
    endpoints: Mapping[str, str],
    feedback_path: str,
    limits: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The router config (a dict, as written to YAML) sending ``treatment_bp`` basis points of users
    to the treatment's Triton and the rest to the control's.

    ``endpoints`` maps ``treatment`` and ``control`` to Triton gRPC addresses (``host:port``).
    The treatment is listed first and the control last, so that raising the treatment's weight
    only moves control users to it (assignment is monotone in the listed order).

    Raises:
        ValueError: when the weight is outside 0..10,000 or an arm has no endpoint.
    """
    if not 0 <= treatment_bp <= BUCKETS:
        raise ValueError(f"treatment weight must be within 0..{BUCKETS} basis points, got {treatment_bp}")
    missing = [arm for arm in (TREATMENT, CONTROL) if not endpoints.get(arm)]
    if missing:
        raise ValueError(f"no Triton endpoint for {', '.join(missing)}")
    config: dict[str, Any] = {
        "experiment": experiment,
        "salt": spec.assignment.salt,
        "arms": [
            {"name": TREATMENT, "weightBp": treatment_bp, "triton": {"url": endpoints[TREATMENT]}},
            {"name": CONTROL, "weightBp": BUCKETS - treatment_bp, "triton": {"url": endpoints[CONTROL]}},
        ],
        "feedback": {"path": feedback_path},
    }
    if limits:
        config["limits"] = dict(limits)
    return config
