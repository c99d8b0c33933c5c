"""The recops Grafana dashboard, built with grafana-foundation-sdk: one experiment at a time.

:func:`dashboard` returns the JSON model (a plain dict) that Grafana imports and that the Helm chart
ships in a ConfigMap for Grafana's dashboard sidecar; :func:`panel_queries` lists every panel's PromQL.

Variables: ``datasource`` (any Prometheus), ``namespace`` and ``experiment`` (from the operator's
``recops_experiment_phase``), ``recmodel`` (the namespace's RecModels, several or all) and ``window``
(the look-back of the per-arm rates and their intervals). Panels also use Grafana's own
``$__rate_interval``.

Where the series come from:

* the router (:mod:`recops.serving.contract`): labelled ``experiment`` and ``arm``; ``namespace`` is the
  target label the prometheus-operator (the router's ServiceMonitor) or the usual ``kubernetes_sd``
  relabelling adds;
* the operator (:mod:`recops.operator.metrics`): ``namespace`` and ``experiment``/``recmodel`` are its
  own labels (the resource's, not the operator pod's);
* Triton: ``model``/``version``; a RecModel's Triton Service (and so, under the prometheus-operator,
  the scrape ``job``) is named ``<recmodel>-triton`` (:func:`recops.operator.manifests.recmodel.triton_name`;
  names longer than 63 characters are shortened and then not matched).

Counts follow the gates' conventions (:mod:`recops.experiments.queries`): ``sum by (arm)
(increase(<counter>{experiment=...}[window]))``; error rate is ``upstream_error|timeout`` over
``ok|upstream_error|timeout`` (:data:`~recops.experiments.queries.ERROR_STATUSES`); GMV-per-user
variance is the gates' compound-Poisson one (:func:`recops.experiments.gates.gmv_per_user_variance`).
The intervals drawn per arm are plain 95% intervals of each arm's rate (Wilson for proportions,
normal for GMV per user), evaluated at every point of the graph: a picture of the uncertainty, not the
gates' always-valid (mSPRT) intervals of the treatment's lift, which the "Gate verdicts" panel shows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from recops.experiments import queries
from recops.experiments.routing import CONTROL, TREATMENT
from recops.operator import metrics as operator_metrics
from recops.serving import contract

UID = "recops-experiments"
TITLE = "recops: experiments"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
Z95 = 1.96  # two-sided 95% normal quantile

ARM_COLORS = {TREATMENT: "orange", CONTROL: "blue"}
PHASE_COLORS = {
    "Pending": "text", "Progressing": "blue", "Paused": "yellow", "Promoted": "green", "RolledBack": "orange",
    "Failed": "red", "Training": "blue", "Deploying": "purple", "Ready": "green",
}
VERDICT_COLORS = {"Successful": "green", "Inconclusive": "yellow", "Failed": "red", "Error": "purple"}
MODEL_METRICS_HELP = "Offline test metrics of each trained revision (recall@k, ndcg@k, ...), from the RecModel status."

GRAFANA_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


# --------------------------------------------------------------------------- PromQL


def _selector(metric: str, matchers: Mapping[str, str], regex: Mapping[str, str] | None = None) -> str:
    parts = [f"{name}={queries.label_value(value)}" for name, value in matchers.items()]
    parts += [f"{name}=~{queries.label_value(value)}" for name, value in (regex or {}).items()]
    return f"{metric}{{{','.join(parts)}}}"


def _router(metric: str, **labels: str) -> str:
    """A router series of the selected experiment (the gates' ``selector``, plus the namespace)."""
    return _selector(metric, {queries.EXPERIMENT_LABEL: "$experiment", "namespace": "$namespace", **labels})


def _experiment(metric: str, **labels: str) -> str:
    """An operator series of the selected experiment."""
    return _selector(metric, {"namespace": "$namespace", "experiment": "$experiment", **labels})


def _recmodels(metric: str, **labels: str) -> str:
    """An operator series of the selected RecModels."""
    return _selector(metric, {"namespace": "$namespace", **labels}, {"recmodel": "$recmodel"})


def _triton(metric: str, **labels: str) -> str:
    """A Triton series of the selected RecModels' Triton Deployments."""
    return _selector(metric, {"namespace": "$namespace", **labels}, {"job": "$recmodel-triton"})


def _increase_by_arm(series: str, window: str = "$window") -> str:
    """``sum by (arm) (increase(...))``: the gates' :class:`~recops.experiments.queries.CounterQuery`."""
    return f"sum by ({queries.ARM_LABEL}) (increase({series}[{window}]))"


def _positive(expr: str, floor: int = 0) -> str:
    """Keep only the arms where ``expr`` exceeds ``floor`` (no division by zero, no empty-window NaN)."""
    return f"({expr} > {floor})"


def _wilson(successes: str, trials: str) -> tuple[str, str, str]:
    """The rate and its 95% Wilson score interval, per arm, from two count expressions.

    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with ``p`` clamped to [0, 1]: the counts
    are extrapolated separately by ``increase`` and may disagree by a fraction of an event.
    """
    n = _positive(trials)
    p = f"clamp({successes} / {n}, 0, 1)"
    z2 = Z95 * Z95
    half = f"{Z95:g} * sqrt({p} * (1 - {p}) / {n} + {z2 / 4:g} / {n} ^ 2)"
    centre = f"{p} + {z2 / 2:g} / {n}"
    scale = f"(1 + {z2:g} / {n})"
    return p, f"({centre} - {half}) / {scale}", f"({centre} + {half}) / {scale}"


def _gmv_per_user() -> tuple[str, str, str]:
    """GMV per user and its 95% normal interval, per arm.

    Mean ``Σv / n``; a user's variance ``Σv² / (n - 1)`` under the gates' compound-Poisson model
    (:func:`recops.experiments.gates.gmv_per_user_variance`), so the standard error is
    ``sqrt(Σv² / (n - 1) / n)``.
    """
    users = _positive(_increase_by_arm(_router(contract.USERS)), floor=1)
    value = _increase_by_arm(_router(contract.PURCHASE_VALUE))
    squares = _increase_by_arm(_router(contract.PURCHASE_VALUE_SQUARED))
    mean = f"{value} / {users}"
    error = f"{Z95:g} * sqrt({squares} / ({users} - 1) / {users})"
    return mean, f"{mean} - {error}", f"{mean} + {error}"


def _state_code(metric: str, label: str, states: Sequence[str], selector: Any, by: str) -> str:
    """One number per ``by`` for gauges that are 1 on the current state: the state's 1-based index (0: none).

    ``metric{label="A"} * 1 or metric{label="B"} * 2 or ...``, then ``max by``: a state timeline's value
    mappings turn the number back into the state's name.
    """
    parts = [f"{selector(metric, **{label: state})} * {index}" for index, state in enumerate(states, 1)]
    return f"max by ({by}) ({' or '.join(parts)})"


def _status_regex(statuses: Sequence[str]) -> str:
    return "|".join(statuses)


# --------------------------------------------------------------------------- panel pieces


def _target(expr: str, legend: str = "__auto", ref: str = "A", *, instant: bool = False,
            table_format: bool = False) -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref)
    query = query.instant() if instant else query.range()
    if table_format:
        query = query.format(PromQueryFormat.TABLE)
    return query


def _legend() -> common_builders.VizLegendOptions:
    return (common_builders.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM).show_legend(True))


def _timeseries(title: str, description: str, unit: str, width: int = 12, height: int = 8) -> timeseries.Panel:
    return (timeseries.Panel().title(title).description(description).datasource(DATASOURCE).unit(unit)
            .span(width).height(height).legend(_legend()).line_width(2).fill_opacity(0)
            .show_points(common.VisibilityMode.NEVER))


def _arm_colors(panel: timeseries.Panel) -> timeseries.Panel:
    for arm, color in ARM_COLORS.items():
        panel = panel.override_by_regexp(f"/^{arm}/", [model.DynamicConfigValue(
            "color", {"mode": "fixed", "fixedColor": color})])
    return panel


def _with_interval(panel: timeseries.Panel, estimate: str, low: str, high: str) -> timeseries.Panel:
    """Three targets per arm (estimate, lower, upper) and the band between the bounds shaded."""
    panel = (panel.with_target(_target(estimate, "{{arm}}", "A"))
             .with_target(_target(low, "{{arm}} lower 95%", "B"))
             .with_target(_target(high, "{{arm}} upper 95%", "C")))
    panel = _arm_colors(panel).override_by_regexp("/ (lower|upper) 95%$/", [
        model.DynamicConfigValue("custom.lineWidth", 0),
        model.DynamicConfigValue("custom.hideFrom", {"legend": True, "tooltip": False, "viz": False}),
    ])
    for arm in ARM_COLORS:
        panel = panel.override_by_name(f"{arm} upper 95%", [
            model.DynamicConfigValue("custom.fillBelowTo", f"{arm} lower 95%"),
            model.DynamicConfigValue("custom.fillOpacity", 15),
        ])
    return panel


def _value_mappings(colors: Mapping[str, str], states: Sequence[str]) -> list[model.ValueMapping]:
    options = {"0": model.ValueMappingResult(text="none", color="text", index=0)}
    for index, state in enumerate(states, 1):
        options[str(index)] = model.ValueMappingResult(text=state, color=colors.get(state, "text"), index=index)
    return [model.ValueMap(options=options)]


def _state_timeline(title: str, description: str, expr: str, legend: str, states: Sequence[str],
                    colors: Mapping[str, str], width: int = 12, height: int = 8) -> statetimeline.Panel:
    return (statetimeline.Panel().title(title).description(description).datasource(DATASOURCE)
            .span(width).height(height).with_target(_target(expr, legend))
            .mappings(_value_mappings(colors, states))
            .color_scheme(dash.FieldColor().mode(model.FieldColorModeId.FIXED).fixed_color("text"))
            .show_value(common.VisibilityMode.AUTO).merge_values(True).legend(_legend())
            .line_width(0).fill_opacity(70))


def _stat(title: str, description: str, expr: str, unit: str, width: int = 4, height: int = 5) -> stat.Panel:
    return (stat.Panel().title(title).description(description).datasource(DATASOURCE).unit(unit)
            .span(width).height(height).with_target(_target(expr, "__auto"))
            .graph_mode(common.BigValueGraphMode.NONE)
            .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))


def _table(title: str, description: str, expr: str, width: int = 12, height: int = 8,
           transformations: Sequence[model.DataTransformerConfig] = ()) -> table.Panel:
    panel = (table.Panel().title(title).description(description).datasource(DATASOURCE)
             .span(width).height(height).with_target(_target(expr, "__auto", instant=True, table_format=True))
             .show_header(True).cell_height(common.TableCellHeight.SM))
    for transformation in transformations:
        panel = panel.with_transformation(transformation)
    return panel


# --------------------------------------------------------------------------- the panels


def _experiment_row() -> list[Any]:
    phase = _state_code(operator_metrics.EXPERIMENT_PHASE, "phase", operator_metrics.EXPERIMENT_PHASES,
                        _experiment, "experiment")
    verdicts = _state_code(operator_metrics.GATE_VERDICT, "verdict", operator_metrics.VERDICTS, _experiment, "gate")
    users = _increase_by_arm(_router(contract.USERS))
    # group_left () with its empty label list: a bare group_left before "(" would read the parenthesis as one.
    observed = (f"100 * {users} / ignoring ({queries.ARM_LABEL}) group_left () "
                f"{_positive(f'sum (increase({_router(contract.USERS)}[$window]))')}")
    weight = (_timeseries("Traffic weight", "The treatment's configured weight (operator) and each arm's observed "
                          "share of the users first seen in the window (router): they agree unless the sample "
                          "ratio is off.", "percent", width=12)
              .with_target(_target(_experiment(operator_metrics.EXPERIMENT_WEIGHT), "configured treatment weight"))
              .with_target(_target(observed, "{{arm}} share of new users", "B"))
              .min(0).max(100))
    return [
        dash.Row("Experiment"),
        _state_timeline("Experiment phase", "The RecExperiment's phase (recops_experiment_phase).", phase,
                        "{{experiment}}", operator_metrics.EXPERIMENT_PHASES, PHASE_COLORS, width=16, height=5),
        _stat("Current step", "Index of the ramp's current step (recops_experiment_step).",
              f"max({_experiment(operator_metrics.EXPERIMENT_STEP)})", "none"),
        _stat("Treatment weight", "Percent of users on the treatment now.",
              f"max({_experiment(operator_metrics.EXPERIMENT_WEIGHT)})", "percent"),
        _arm_colors(weight),
        _state_timeline("Gate verdicts", "Each gate's verdict at every look (recops_experiment_gate_verdict).",
                        verdicts, "{{gate}}", operator_metrics.VERDICTS, VERDICT_COLORS, width=12),
        _table("Gate values", "Each gate's headline value at the last look: the relative lift for lift gates, "
               "seconds for latency, the ratio for error rate, the p-value for sample ratio.",
               f"max by (gate) ({_experiment(operator_metrics.GATE_VALUE)})", width=24, height=6,
               transformations=[model.DataTransformerConfig(id_val="organize", options={
                   "excludeByName": {"Time": True},
                   "renameByName": {"gate": "Gate", "Value": "Value at the last look"}})]),
    ]


def _outcomes_row() -> list[Any]:
    window_note = (" Over the window chosen in the 'window' variable. Users are counted the first time a router "
                   "sees them, as the gates count them: over a window shorter than the experiment, returning "
                   "users' activity is divided by new users only.")
    impressions = _increase_by_arm(_router(contract.IMPRESSIONS))
    clicks = _increase_by_arm(_router(contract.FEEDBACK, event="click"))
    likes = _increase_by_arm(_router(contract.FEEDBACK, event="like"))
    views = _increase_by_arm(_router(contract.ASSIGNMENTS))
    users = _positive(_increase_by_arm(_router(contract.USERS)))
    return [
        dash.Row("Per-arm outcomes"),
        _with_interval(_timeseries("CTR per arm", "Clicks per impression, with a 95% Wilson interval per arm, "
                                   "over the window chosen in the 'window' variable.", "percentunit"),
                       *_wilson(clicks, impressions)),
        _with_interval(_timeseries("Like rate per arm", "Likes per impression, with a 95% Wilson interval per "
                                   "arm, over the window chosen in the 'window' variable.", "percentunit"),
                       *_wilson(likes, impressions)),
        _arm_colors(_timeseries("Page views per user", "Recommend requests (page views) per distinct user."
                                + window_note, "none")
                    .with_target(_target(f"{views} / {users}", "{{arm}}")).decimals(2)),
        _with_interval(_timeseries("GMV per user", "Purchase value per distinct user, with a 95% normal interval "
                                   "(the gates' compound-Poisson variance, from the squared-value counter)."
                                   + window_note, "none").decimals(2),
                       *_gmv_per_user()),
    ]


def _serving_row() -> list[Any]:
    latency = (f"histogram_quantile(0.99, sum by ({queries.ARM_LABEL}, le) "
               f"(rate({_router(f'{contract.LATENCY}_bucket')}[$__rate_interval])))")
    errors = f"sum by ({queries.ARM_LABEL}) (rate({{series}}[$__rate_interval]))"
    failed = _selector(contract.REQUESTS, {"experiment": "$experiment", "namespace": "$namespace"},
                       {"status": _status_regex(queries.ERROR_STATUSES)})
    attempted = _selector(contract.REQUESTS, {"experiment": "$experiment", "namespace": "$namespace"},
                          {"status": _status_regex(queries.ATTEMPT_STATUSES)})
    error_rate = f"{errors.format(series=failed)} / {_positive(errors.format(series=attempted))}"
    requests = f"sum by ({queries.ARM_LABEL}, status) (rate({_router(contract.REQUESTS)}[$__rate_interval]))"
    return [
        dash.Row("Serving"),
        _arm_colors(_timeseries("p99 latency per arm", "99th percentile of /v1/recommend duration at the router "
                                "(Triton included), from the histogram buckets of every router replica.", "s",
                                width=8).with_target(_target(latency, "{{arm}}"))),
        _arm_colors(_timeseries("Error rate per arm", "Upstream errors and timeouts over the requests the arm was "
                                "asked to answer (bad requests and load shedding are neither), as the errorRate "
                                "gate counts them.", "percentunit", width=8)
                    .with_target(_target(error_rate, "{{arm}}")).min(0)),
        _arm_colors(_timeseries("Requests per second", "Recommend requests by arm and outcome.", "reqps", width=8)
                    .with_target(_target(requests, "{{arm}} {{status}}"))),
    ]


def _models_row() -> list[Any]:
    phase = _state_code(operator_metrics.MODEL_PHASE, "phase", operator_metrics.MODEL_PHASES, _recmodels, "recmodel")
    metric = (f"label_join(max by (recmodel, revision, metric) ({_recmodels(operator_metrics.MODEL_METRIC)}), "
              f'"model_revision", "@", "recmodel", "revision")')
    matrix = model.DataTransformerConfig(id_val="groupingToMatrix", options={
        "columnField": "metric", "rowField": "model_revision", "valueField": "Value"})
    return [
        dash.Row("RecModels"),
        _state_timeline("RecModel phase", "Each selected RecModel's phase (recops_recmodel_phase).", phase,
                        "{{recmodel}}", operator_metrics.MODEL_PHASES, PHASE_COLORS, width=12),
        _table("Training metrics per revision", MODEL_METRICS_HELP + " Rows are recmodel@revision.", metric,
               width=12, transformations=[matrix]),
    ]


def _triton_row() -> list[Any]:
    def by_job(metric: str) -> str:
        return f"sum by (job) (rate({_triton(metric, model=contract.ENSEMBLE)}[$__rate_interval]))"

    success, failure = by_job("nv_inference_request_success"), by_job("nv_inference_request_failure")

    def per_request(metric: str) -> str:
        return f"{by_job(metric)} / {_positive(success)}"

    return [
        dash.Row("Triton"),
        _timeseries("Triton requests per second", f"Successful and failed requests of the {contract.ENSEMBLE} "
                    "model, per RecModel's Triton (job <recmodel>-triton).", "reqps", width=8)
        .with_target(_target(success, "{{job}} success"))
        .with_target(_target(failure, "{{job}} failure", "B")),
        _timeseries("Triton time per request", f"Average queue and compute time of one {contract.ENSEMBLE} request.",
                    "µs", width=8)
        .with_target(_target(per_request("nv_inference_queue_duration_us"), "{{job}} queue"))
        .with_target(_target(per_request("nv_inference_compute_infer_duration_us"),
                             "{{job}} compute", "B")),
        _timeseries("Triton targets up", "Prometheus' scrape health of each Triton pod (1 up, 0 down).", "none",
                    width=8)
        .with_target(_target(f"max by (job, instance) ({_triton('up')})", "{{job}} {{instance}}"))
        .min(0).max(1),
    ]


def _operator_row() -> list[Any]:
    errors = f"sum by (kind) (rate({operator_metrics.RECONCILE_ERRORS}[$__rate_interval]))"
    duration = (f"histogram_quantile(0.99, sum by (kind, le) "
                f"(rate({operator_metrics.RECONCILE_SECONDS}_bucket[$__rate_interval])))")
    return [
        dash.Row("Operator"),
        _timeseries("Reconcile errors", "Reconciles that raised, per second (kopf retries them).", "ops")
        .with_target(_target(errors, "{{kind}}")),
        _timeseries("Reconcile p99 duration", "99th percentile of one reconcile (observe, plan, act).", "s")
        .with_target(_target(duration, "{{kind}}")),
    ]


# --------------------------------------------------------------------------- the dashboard


def _variables() -> list[Any]:
    return [
        dash.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        (dash.QueryVariable("namespace").label("Namespace").datasource(DATASOURCE)
         .query(f"label_values({operator_metrics.EXPERIMENT_PHASE}, namespace)")
         .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(model.VariableSort.ALPHABETICAL_ASC)),
        (dash.QueryVariable("experiment").label("Experiment").datasource(DATASOURCE)
         .query(f'label_values({operator_metrics.EXPERIMENT_PHASE}{{namespace="$namespace"}}, experiment)')
         .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(model.VariableSort.ALPHABETICAL_ASC)),
        (dash.QueryVariable("recmodel").label("RecModel").datasource(DATASOURCE)
         .query(f'label_values({operator_metrics.MODEL_PHASE}{{namespace="$namespace"}}, recmodel)')
         .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(model.VariableSort.ALPHABETICAL_ASC)
         .multi(True).include_all(True)
         .current(model.VariableOption(selected=True, text=["All"], value=["$__all"]))),
        (dash.CustomVariable("window").label("Rate window").values("15m,1h,6h,1d,7d")
         .current(model.VariableOption(selected=True, text="1h", value="1h"))
         .description("Look-back of the per-arm rates and their intervals.")),
    ]


def _build() -> model.Dashboard:
    board = (dash.Dashboard(TITLE).uid(UID).tags(["recops"]).editable().time("now-6h", "now").refresh("1m")
             .tooltip(model.DashboardCursorSync.CROSSHAIR).timezone("browser")
             .description("recops A/B experiments: per-arm outcomes with intervals, serving health, gate "
                          "verdicts, RecModel training and Triton.")
             .variables(_variables()))
    panel_id = 0
    for section in (_experiment_row(), _outcomes_row(), _serving_row(), _models_row(), _triton_row(),
                    _operator_row()):
        for item in section:
            panel_id += 1
            board = board.with_row(item.id(panel_id)) if isinstance(item, dash.Row) else board.with_panel(
                item.id(panel_id))
    return board.build()


def dashboard() -> dict[str, Any]:
    """The dashboard's JSON model (what Grafana imports), as plain JSON types."""
    return json.loads(json.dumps(_build(), cls=JSONEncoder))


def _panels(board: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def panel_queries(board: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` for every target of every panel, in order."""
    return [(panel.get("title", ""), target["expr"]) for panel in _panels(board)
            for target in panel.get("targets", []) if "expr" in target]


def variables_used(expr: str) -> set[str]:
    """Names of the Grafana variables in ``expr`` (``$name`` and ``${name}``/``${name:format}``)."""
    return {match.group(1) or match.group(2) for match in GRAFANA_VARIABLE.finditer(expr)}


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """``expr`` with its Grafana variables replaced by ``values`` (what Grafana sends Prometheus).

    A variable missing from ``values`` raises ``KeyError``: an undefined variable would reach
    Prometheus as literal text.
    """
    return GRAFANA_VARIABLE.sub(lambda match: values[match.group(1) or match.group(2)], expr)
