"""The recops alerting rules: the ``spec`` of a prometheus-operator PrometheusRule (``monitoring.coreos.com/v1``).

:func:`prometheus_rules` returns ``{"groups": [...]}``, which is both a PrometheusRule's ``spec`` and a plain
Prometheus rule file (``promtool check rules`` reads it as is). Every alert carries a ``severity`` label and
``summary``/``description`` annotations.

* **RecExperimentRolledBack** (warning): an experiment's phase *became* ``RolledBack``: the gauge is 1 now
  and was not 1 :data:`ROLLED_BACK_RECENT` ago. It fires for that long after the rollback and then
  resolves by itself (a rolled-back experiment keeps its phase until it is deleted: an alert on the phase
  alone would never end).
* **RecExperimentGateError** (warning): a gate's verdict has been ``Error`` (Prometheus unreachable, a query
  failing, data that cannot be judged) for :data:`GATE_ERROR_FOR`. The operator pauses the ramp on errors
  and fails the experiment after ``analysis.maxConsecutiveErrors``; this says so before that.
* **TritonUnavailable** (critical), two rules with one name, told apart by their ``detected_by`` label:

  - ``detected_by: scrape``: a Triton scrape target has been down (``up == 0``) for :data:`TRITON_FOR`.
    Triton targets are those whose ``job`` matches :data:`TRITON_JOB` (the prometheus-operator names the
    job after the Service, ``<recmodel>-triton``: :func:`recops.operator.manifests.recmodel.triton_name`).
    A Deployment scaled to zero has no target at all, so this rule cannot see it: hence the second rule;
  - ``detected_by: router``: a router arm has failed upstream (errors or timeouts) and answered nothing
    for :data:`TRITON_FOR`: the arm's Triton is unreachable or broken from where it matters, whatever its
    scrape says. A router without traffic is silent (no requests, no errors).
* **RecModelTrainingFailed** (warning): ``recops_recmodel_phase{phase="Failed"} == 1`` (training or
  deployment gave up); immediate, as the phase does not flap.
* **RecopsOperatorReconcileErrors** (warning): reconciles of a kind have kept raising for
  :data:`RECONCILE_FOR` (kopf retries them; a few transient conflicts never last that long).
"""

from __future__ import annotations

from typing import Any

from recops.experiments import queries
from recops.operator import metrics as operator_metrics
from recops.serving import contract

GROUP = "recops"
ROLLED_BACK_RECENT = "30m"
GATE_ERROR_FOR = "10m"
TRITON_FOR = "5m"
TRITON_JOB = ".+-triton"
RECONCILE_FOR = "15m"
RECONCILE_WINDOW = "10m"

_EXPERIMENT = "{{ $labels.namespace }}/{{ $labels.experiment }}"
_RECMODEL = "{{ $labels.namespace }}/{{ $labels.recmodel }}"


def _alert(name: str, expr: str, severity: str, summary: str, description: str, for_: str | None = None,
           **labels: str) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if for_ is not None:
        rule["for"] = for_
    rule["labels"] = {"severity": severity, **labels}
    rule["annotations"] = {"summary": summary, "description": description}
    return rule


def rolled_back() -> dict[str, Any]:
    phase = f'{operator_metrics.EXPERIMENT_PHASE}{{phase="RolledBack"}}'
    expr = (f"({phase} == 1) unless on (namespace, experiment) "
            f"({phase} offset {ROLLED_BACK_RECENT} == 1)")
    return _alert(
        "RecExperimentRolledBack", expr, "warning",
        f"Experiment {_EXPERIMENT} was rolled back",
        f"RecExperiment {_EXPERIMENT} rolled back to its control within the last {ROLLED_BACK_RECENT}: a gate "
        "failed or the experiment was aborted. Its status (kubectl describe recexperiment) names the gate and "
        "the values that decided; the experiment dashboard shows the arms side by side.",
    )


def gate_error() -> dict[str, Any]:
    expr = f'{operator_metrics.GATE_VERDICT}{{verdict="Error"}} == 1'
    return _alert(
        "RecExperimentGateError", expr, "warning",
        f"Gate {{{{ $labels.gate }}}} of {_EXPERIMENT} cannot be evaluated",
        f"Gate {{{{ $labels.gate }}}} of RecExperiment {_EXPERIMENT} has returned Error for {GATE_ERROR_FOR}: "
        "the ramp is paused and the experiment fails after analysis.maxConsecutiveErrors. Check that the "
        "experiment's Prometheus is reachable and scrapes the router.",
        GATE_ERROR_FOR,
    )


def triton_down() -> dict[str, Any]:
    expr = f'up{{job=~"{TRITON_JOB}"}} == 0'
    return _alert(
        "TritonUnavailable", expr, "critical",
        "Triton {{ $labels.namespace }}/{{ $labels.job }} is down",
        f"Prometheus has failed to scrape Triton target {{{{ $labels.instance }}}} of "
        f"{{{{ $labels.namespace }}}}/{{{{ $labels.job }}}} for {TRITON_FOR}: the pod is not serving "
        "(crash loop, out of memory, model repository failed to load).",
        TRITON_FOR, detected_by="scrape",
    )


def triton_unreachable() -> dict[str, Any]:
    by = f"namespace, {queries.EXPERIMENT_LABEL}, {queries.ARM_LABEL}"
    failed = (f"sum by ({by}) (rate({contract.REQUESTS}{{status=~\"{'|'.join(queries.ERROR_STATUSES)}\"}}"
              f"[{TRITON_FOR}])) > 0")
    answered = f'sum by ({by}) (rate({contract.REQUESTS}{{status="ok"}}[{TRITON_FOR}])) > 0'
    return _alert(
        "TritonUnavailable", f"({failed}) unless on ({by}) ({answered})", "critical",
        f"Arm {{{{ $labels.arm }}}} of {_EXPERIMENT} gets no answer from Triton",
        f"Every request the router sent to arm {{{{ $labels.arm }}}} of RecExperiment {_EXPERIMENT} in the "
        f"last {TRITON_FOR} failed upstream (error or timeout) and none succeeded: its Triton is unreachable "
        "or failing. Users of that arm get errors.",
        TRITON_FOR, detected_by="router",
    )


def training_failed() -> dict[str, Any]:
    expr = f'{operator_metrics.MODEL_PHASE}{{phase="Failed"}} == 1'
    return _alert(
        "RecModelTrainingFailed", expr, "warning",
        f"RecModel {_RECMODEL} failed",
        f"RecModel {_RECMODEL} is in phase Failed: its training Job or its Triton Deployment gave up. The "
        "RecModel's conditions and events say which; the Job's termination message carries the trainer's error.",
    )


def reconcile_errors() -> dict[str, Any]:
    expr = f"sum by (kind) (rate({operator_metrics.RECONCILE_ERRORS}[{RECONCILE_WINDOW}])) > 0"
    return _alert(
        "RecopsOperatorReconcileErrors", expr, "warning",
        "The recops operator keeps failing to reconcile {{ $labels.kind }}s",
        f"Reconciles of {{{{ $labels.kind }}}} resources have raised continuously for {RECONCILE_FOR} "
        "({{ $value | humanize }} per second): kopf retries them, but changes are not being applied. The "
        "operator's log names the resource and the error.",
        RECONCILE_FOR,
    )


def prometheus_rules() -> dict[str, Any]:
    """The PrometheusRule ``spec``: one group of every recops alert."""
    rules = [rolled_back(), gate_error(), triton_down(), triton_unreachable(), training_failed(), reconcile_errors()]
    return {"groups": [{"name": GROUP, "rules": rules}]}


def prometheus_rule(name: str, namespace: str | None = None, labels: dict[str, str] | None = None,
                    ) -> dict[str, Any]:
    """A whole ``monitoring.coreos.com/v1`` PrometheusRule around :func:`prometheus_rules`."""
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    if labels:
        metadata["labels"] = dict(labels)
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": metadata,
            "spec": prometheus_rules()}
