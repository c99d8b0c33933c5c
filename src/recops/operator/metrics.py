"""The operator's Prometheus metrics: what the dashboard and the alerts read about RecModels and
RecExperiments (the routers and Triton export their own).

Gauges are set from each reconcile's status, so they always describe the last status written;
a deleted resource's series are removed by :func:`forget`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

EXPERIMENT_PHASES = ("Pending", "Progressing", "Paused", "Promoted", "RolledBack", "Failed")
MODEL_PHASES = ("Pending", "Training", "Deploying", "Ready", "Failed")
VERDICTS = ("Successful", "Failed", "Inconclusive", "Error")

EXPERIMENT_PHASE = "recops_experiment_phase"
EXPERIMENT_WEIGHT = "recops_experiment_treatment_weight_percent"
EXPERIMENT_STEP = "recops_experiment_step"
GATE_VERDICT = "recops_experiment_gate_verdict"
GATE_VALUE = "recops_experiment_gate_value"
MODEL_PHASE = "recops_recmodel_phase"
MODEL_METRIC = "recops_recmodel_metric"
RECONCILE_SECONDS = "recops_reconcile_duration_seconds"
RECONCILE_ERRORS = "recops_reconcile_errors_total"


class OperatorMetrics:
    """The gauges, one set per registry (tests use their own)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.experiment_phase = Gauge(EXPERIMENT_PHASE, "1 for the experiment's current phase.",
                                      ["namespace", "experiment", "phase"], registry=registry)
        self.experiment_weight = Gauge(EXPERIMENT_WEIGHT, "Percent of users on the treatment.",
                                       ["namespace", "experiment"], registry=registry)
        self.experiment_step = Gauge(EXPERIMENT_STEP, "Index of the current step.", ["namespace", "experiment"],
                                     registry=registry)
        self.gate_verdict = Gauge(GATE_VERDICT, "1 for each gate's verdict at the last look.",
                                  ["namespace", "experiment", "gate", "verdict"], registry=registry)
        self.gate_value = Gauge(GATE_VALUE, "Each gate's headline value at the last look.",
                                ["namespace", "experiment", "gate"], registry=registry)
        self.model_phase = Gauge(MODEL_PHASE, "1 for the RecModel's current phase.",
                                 ["namespace", "recmodel", "phase"], registry=registry)
        self.model_metric = Gauge(MODEL_METRIC, "Offline test metrics of the RecModel's trained revision.",
                                  ["namespace", "recmodel", "revision", "metric"], registry=registry)
        self.reconcile_seconds = Histogram(RECONCILE_SECONDS, "Time of one reconcile (observe, plan, act).",
                                           ["kind"], registry=registry)
        self.reconcile_errors = Counter(RECONCILE_ERRORS, "Reconciles that raised (kopf retries them).", ["kind"],
                                        registry=registry)

    def experiment(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Set the experiment's gauges from the status just written."""
        for phase in EXPERIMENT_PHASES:
            self.experiment_phase.labels(namespace, name, phase).set(1 if status.get("phase") == phase else 0)
        if status.get("weight") is not None:
            self.experiment_weight.labels(namespace, name).set(status["weight"])
        if status.get("currentStep") is not None:
            self.experiment_step.labels(namespace, name).set(status["currentStep"])
        for gate, result in (status.get("gates") or {}).items():
            for verdict in VERDICTS:
                current = 1 if result.get("verdict") == verdict else 0
                self.gate_verdict.labels(namespace, name, gate, verdict).set(current)
            if result.get("value") is not None:
                self.gate_value.labels(namespace, name, gate).set(result["value"])

    def model(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Set the RecModel's gauges from the status just written."""
        for phase in MODEL_PHASES:
            self.model_phase.labels(namespace, name, phase).set(1 if status.get("phase") == phase else 0)
        revision = status.get("revision")
        for metric, value in (status.get("metrics") or {}).items():
            if revision:
                self.model_metric.labels(namespace, name, revision, metric).set(value)

    def forget(self, kind: str, namespace: str, name: str) -> None:
        """Drop every series of a deleted resource."""
        gauges = ([self.experiment_phase, self.experiment_weight, self.experiment_step, self.gate_verdict,
                   self.gate_value] if kind == "RecExperiment" else [self.model_phase, self.model_metric])
        for gauge in gauges:
            for labels in list(gauge._metrics):  # prometheus_client has no public listing of a metric's series
                if labels[0] == namespace and labels[1] == name:
                    gauge.remove(*labels)
