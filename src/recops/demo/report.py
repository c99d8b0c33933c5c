"""The demo report: ``report.html`` (self-contained), its plots as PNG files, and ``summary.json``.

Inputs besides the :class:`~recops.demo.simulation.SimulationResult`:

* ``summary``: free-form facts of the run, shown as a table; the keys the report itself reads are
  ``title``, ``control_arm`` and ``treatment_arm`` (default: arms named ``control`` and ``treatment``,
  else the last and first arm seen).
* ``steps``: the experiment's steps, as :class:`StepRecord` dicts, oldest first.
* ``gate_history``: every gate's verdict at every look, as :class:`GateLook` dicts.
* ``offline``: offline metrics per model, ``{"control": {"recall@20": 0.31, ...}, ...}``.

Times (``t_s``, ``started_s``, ``ended_s``) are seconds on the simulation's clock, i.e. the same
origin as :attr:`~recops.demo.simulation.TickPoint.t_s` (pass ``origin`` to ``simulate``).
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import html
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import matplotlib

matplotlib.use("Agg")  # no display where the demo runs
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from recops.demo.simulation import ArmStats, SimulationResult, TickPoint, wilson_interval
from recops.training.report import _png, metrics_table

REPORT = "report.html"
SUMMARY = "summary.json"
PLOTS = ("ctr.png", "latency.png", "traffic.png", "gates.png")

VERDICTS = ("Successful", "Failed", "Inconclusive", "Error")
"""Gate verdicts, as :class:`recops.experiments.gates.Verdict` spells them."""
VERDICT_COLOURS = {"Successful": "#2e7d32", "Failed": "#c62828", "Inconclusive": "#bdbdbd", "Error": "#6a1b9a"}
_NO_LOOK = "#ffffff"


class StepRecord(TypedDict):
    """One step of the experiment: a treatment weight, held until the rollout moved it.

    ``ended_s`` (None or absent: still running when the report was written) and ``decision`` (the
    rollout decision or phase that started the step, e.g. "Progressing", "Promoted", "RolledBack";
    absent or "" for the first step) are optional.
    """

    index: int  # 0, 1, ...
    weight_pct: float  # treatment's share of users during the step, in percent
    started_s: float
    ended_s: NotRequired[float | None]
    decision: NotRequired[str]


class GateLook(TypedDict):
    """One gate's verdict at one look."""

    t_s: float
    step: int  # StepRecord.index of the step the look belongs to
    gate: str  # the gate's name
    verdict: str  # one of VERDICTS
    value: float | None  # the gate's headline number (lift, p-value, p99 ms, ...)
    message: str


# Spelled out: with postponed annotations, TypedDict cannot see NotRequired (Python 3.11).
_STEP_KEYS = frozenset({"index", "weight_pct", "started_s"})
_LOOK_KEYS = frozenset(GateLook.__annotations__)


def _check(rows: Sequence[Mapping[str, Any]], keys: frozenset[str], what: str) -> None:
    for index, row in enumerate(rows):
        missing = sorted(keys - set(row))
        if missing:
            raise ValueError(f"{what}[{index}] lacks {', '.join(missing)}; expected the keys {sorted(keys)}")


# --------------------------------------------------------------------------- A/B table


@dataclasses.dataclass(frozen=True)
class _Metric:
    key: str
    label: str
    value: Callable[[ArmStats], float]
    format: str  # "int", "float", "pct" or "money"
    interval: Callable[[ArmStats], tuple[float, float]] | None = None
    # +1: a higher value is better, -1: worse (latency), 0: no colour (totals, which follow the traffic split).
    better: int = 0


AB_METRICS = (
    _Metric("users", "users", lambda s: s.users, "int"),
    _Metric("page_views", "page views", lambda s: s.requests, "int"),
    _Metric("page_views_per_user", "page views / user", lambda s: s.page_views_per_user, "float", better=1),
    _Metric("impressions", "impressions", lambda s: s.impressions, "int"),
    _Metric("clicks", "clicks", lambda s: s.clicks, "int"),
    _Metric("ctr", "CTR", lambda s: s.ctr, "pct", lambda s: s.ctr_interval, better=1),
    _Metric("likes", "likes", lambda s: s.likes, "int"),
    _Metric("like_rate", "like rate (likes / impressions)", lambda s: s.like_rate, "pct",
            lambda s: s.like_rate_interval, better=1),
    _Metric("carts", "carts", lambda s: s.carts, "int"),
    _Metric("purchases", "purchases", lambda s: s.purchases, "int"),
    _Metric("gmv", "GMV", lambda s: s.gmv, "money"),
    _Metric("gmv_per_user", "GMV / user", lambda s: s.gmv_per_user, "money", lambda s: s.gmv_per_user_interval,
            better=1),
    _Metric("latency_p50_ms", "latency p50 (ms)", lambda s: _none_nan(s.latency.p50_ms), "float", better=-1),
    _Metric("latency_p95_ms", "latency p95 (ms)", lambda s: _none_nan(s.latency.p95_ms), "float", better=-1),
    _Metric("latency_p99_ms", "latency p99 (ms)", lambda s: _none_nan(s.latency.p99_ms), "float", better=-1),
)


class ABRow(TypedDict):
    """One metric of the A/B table; None where undefined (no traffic, control at 0)."""

    metric: str
    control: float | None
    treatment: float | None
    lift: float | None  # treatment / control - 1


def _none_nan(value: float | None) -> float:
    return math.nan if value is None else value


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def lift(treatment: float | None, control: float | None) -> float | None:
    """Relative lift ``treatment / control - 1``; None when either is missing or control is 0."""
    t, c = _finite(treatment), _finite(control)
    if t is None or c is None or c == 0:
        return None
    return t / c - 1


def arm_roles(summary: Mapping[str, Any], simulation: SimulationResult) -> tuple[str, str | None]:
    """``(control, treatment)`` arm names: the summary's, else ``control``/``treatment``, else last/first seen."""
    names = list(simulation.arms)
    control = summary.get("control_arm") or ("control" if "control" in names or not names else names[-1])
    treatment = summary.get("treatment_arm")
    if treatment is None:
        others = [name for name in names if name != control]
        treatment = "treatment" if "treatment" in others else (others[0] if others else None)
    return control, treatment


def ab_table(simulation: SimulationResult, control: str, treatment: str | None) -> list[ABRow]:
    """Every A/B metric for the two arms with the treatment's lift (JSON-ready, for summary.json too)."""
    c = simulation.arms.get(control, ArmStats(control))
    t = simulation.arms.get(treatment) if treatment is not None else None
    rows: list[ABRow] = []
    for metric in AB_METRICS:
        c_value = _finite(metric.value(c))
        t_value = _finite(metric.value(t)) if t is not None else None
        rows.append(ABRow(metric=metric.key, control=c_value, treatment=t_value, lift=lift(t_value, c_value)))
    return rows


def _fmt(value: float | None, kind: str) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    if kind == "int":
        return f"{round(value):,}"
    if kind == "pct":
        return f"{100 * value:.2f}%"
    if kind == "money":
        return f"{value:,.2f}"
    return f"{value:.2f}"


def _fmt_lift(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f}%"


def _cell(stats: ArmStats | None, metric: _Metric) -> str:
    if stats is None:
        return "<td>–</td>"
    text = _fmt(_finite(metric.value(stats)), metric.format)
    if metric.interval is not None:
        low, high = metric.interval(stats)
        if math.isfinite(low) and math.isfinite(high):
            text += f' <span class="ci">[{_fmt(low, metric.format)}, {_fmt(high, metric.format)}]</span>'
    return f"<td>{text}</td>"


def _role(name: str | None, role: str) -> str:
    if name is None:
        return f"(no {role})"
    return html.escape(name) if name == role else f"{html.escape(name)} ({role})"


def ab_table_html(simulation: SimulationResult, control: str, treatment: str | None) -> str:
    """The A/B table: one row per metric, a column per arm (with 95% intervals) and the lift."""
    c = simulation.arms.get(control, ArmStats(control))
    t = simulation.arms.get(treatment) if treatment is not None else None
    rows = []
    for metric, row in zip(AB_METRICS, ab_table(simulation, control, treatment), strict=True):
        lift_value = row["lift"]
        css = ""
        if lift_value and metric.better:
            css = ' class="good"' if lift_value * metric.better > 0 else ' class="bad"'
        rows.append(
            f'<tr data-metric="{metric.key}"><th>{html.escape(metric.label)}</th>{_cell(c, metric)}{_cell(t, metric)}'
            f'<td class="lift"><span{css}>{_fmt_lift(lift_value)}</span></td></tr>'
        )
    head = f"<tr><th>metric</th><th>{_role(control, 'control')}</th><th>{_role(treatment, 'treatment')}</th>" \
           "<th>lift</th></tr>"
    return f'<table class="ab">{head}{"".join(rows)}</table>'


# --------------------------------------------------------------------------- figures


def _empty(axis, text: str) -> None:
    axis.text(0.5, 0.5, text, ha="center", va="center", transform=axis.transAxes, color="#757575")
    axis.set_xticks([])
    axis.set_yticks([])


def _step_lines(axis, steps: Sequence[StepRecord]) -> None:
    """Dotted lines where steps start, labelled with the treatment weight."""
    for step in steps:
        axis.axvline(step["started_s"], color="#9e9e9e", linestyle=":", linewidth=1)
        axis.annotate(f"{step['weight_pct']:g}%", (step["started_s"], 1.0), xycoords=("data", "axes fraction"),
                      xytext=(2, -10), textcoords="offset points", fontsize=7, color="#616161")


def ctr_figure(series: Mapping[str, Sequence[TickPoint]], steps: Sequence[StepRecord]):
    """Cumulative CTR per arm over time, with its 95% Wilson band."""
    figure, axis = plt.subplots(figsize=(9, 3.6))
    drawn = False
    for name, points in series.items():
        points = [p for p in points if p.impressions > 0]
        if not points:
            continue
        t = np.array([p.t_s for p in points])
        ctr = np.array([p.ctr for p in points])
        bands = np.array([wilson_interval(p.clicks, p.impressions) for p in points])
        (line,) = axis.plot(t, 100 * ctr, label=name)
        axis.fill_between(t, 100 * bands[:, 0], 100 * bands[:, 1], color=line.get_color(), alpha=0.2, linewidth=0)
        drawn = True
    if not drawn:
        _empty(axis, "no impressions")
        return figure
    _step_lines(axis, steps)
    axis.set_xlabel("time (s)")
    axis.set_ylabel("CTR (%), cumulative")
    axis.set_title("CTR per arm with 95% interval")
    axis.legend()
    return figure


def latency_figure(arms: Mapping[str, ArmStats], series: Mapping[str, Sequence[TickPoint]]):
    """Latency percentiles per arm over the whole run, and p50/p99 per tick window over time."""
    figure, (bars, lines) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 2]})
    names = [name for name, stats in arms.items() if stats.latency.count]
    if names:
        width = 0.8 / len(names)
        positions = np.arange(3)
        for i, name in enumerate(names):
            latency = arms[name].latency
            bars.bar(positions + i * width, [latency.p50_ms, latency.p95_ms, latency.p99_ms], width, label=name)
        bars.set_xticks(positions + width * (len(names) - 1) / 2, ["p50", "p95", "p99"])
        bars.set_ylabel("ms")
        bars.set_title("Recommend latency (client side)")
        bars.legend()
    else:
        _empty(bars, "no requests")
    drawn = False
    for name, points in series.items():
        points = [p for p in points if p.latency_p50_ms is not None]
        if not points:
            continue
        t = [p.t_s for p in points]
        (line,) = lines.plot(t, [p.latency_p99_ms for p in points], label=f"{name} p99")
        lines.plot(t, [p.latency_p50_ms for p in points], label=f"{name} p50", color=line.get_color(),
                   linestyle="--")
        drawn = True
    if drawn:
        lines.set_xlabel("time (s)")
        lines.set_ylabel("ms")
        lines.set_title("Latency per tick")
        lines.legend(fontsize=8)
    else:
        _empty(lines, "no requests")
    return figure


def traffic_figure(steps: Sequence[StepRecord], series: Mapping[str, Sequence[TickPoint]], treatment: str | None,
                   end_s: float):
    """The treatment's configured weight per step, and the share of page views it actually served."""
    figure, axis = plt.subplots(figsize=(9, 3.2))
    if not steps and not series:
        _empty(axis, "no steps and no traffic")
        return figure
    if steps:
        xs, ys = [], []
        for step in steps:
            xs += [step["started_s"], _ended(step, end_s)]
            ys += [step["weight_pct"], step["weight_pct"]]
        axis.plot(xs, ys, drawstyle="steps-post", linewidth=2, label="configured weight")
        for step in steps:
            if step.get("decision"):
                axis.annotate(step["decision"], (step["started_s"], step["weight_pct"]), xytext=(3, 4),
                              textcoords="offset points", fontsize=7)
    share = _served_share(series, treatment)
    if share:
        axis.scatter([t for t, _ in share], [s for _, s in share], s=8, color="#ef6c00", label="page views served")
    axis.set_ylim(-3, 103)
    axis.margins(x=0.08)  # room for the last decision's label
    axis.set_xlabel("time (s)")
    axis.set_ylabel(f"{treatment or 'treatment'} (%)")
    axis.set_title("Traffic to the treatment")
    axis.legend(fontsize=8)
    return figure


def _ended(step: StepRecord, end_s: float) -> float:
    ended = step.get("ended_s")
    return end_s if ended is None else ended


def _served_share(series: Mapping[str, Sequence[TickPoint]], treatment: str | None) -> list[tuple[float, float]]:
    """Per tick: the treatment's percentage of the page views served in that tick's window."""
    windows: dict[float, dict[str, int]] = {}
    for name, points in series.items():
        for point in points:
            windows.setdefault(point.t_s, {})[name] = point.window_requests
    share = []
    for t, counts in sorted(windows.items()):
        total = sum(counts.values())
        if total:
            share.append((t, 100 * counts.get(treatment or "", 0) / total))
    return share


def gates_figure(gate_history: Sequence[GateLook]):
    """A colour grid: one row per gate, one column per look, the cell coloured by the verdict."""
    if not gate_history:
        figure, axis = plt.subplots(figsize=(9, 2))
        _empty(axis, "no gate looks")
        return figure
    gates = list(dict.fromkeys(look["gate"] for look in gate_history))
    looks = sorted({(look["t_s"], look["step"]) for look in gate_history})
    column = {look: i for i, look in enumerate(looks)}
    grid = np.full((len(gates), len(looks)), len(VERDICTS))  # the last colour: no look
    for look in gate_history:
        verdict = look["verdict"] if look["verdict"] in VERDICTS else "Error"
        grid[gates.index(look["gate"]), column[(look["t_s"], look["step"])]] = VERDICTS.index(verdict)
    figure, axis = plt.subplots(figsize=(min(2 + 0.45 * len(looks), 16), 1 + 0.45 * len(gates)))
    colours = ListedColormap([VERDICT_COLOURS[v] for v in VERDICTS] + [_NO_LOOK])
    axis.imshow(grid, cmap=colours, vmin=0, vmax=len(VERDICTS), aspect="auto", interpolation="nearest")
    axis.set_yticks(range(len(gates)), gates)
    every = max(1, len(looks) // 20)  # keep the tick labels legible on long runs
    axis.set_xticks(range(0, len(looks), every), [f"{t:.0f}s" for t, _ in looks[::every]], rotation=45,
                    fontsize=7)
    axis.set_xticks(np.arange(-0.5, len(looks)), minor=True)
    axis.set_yticks(np.arange(-0.5, len(gates)), minor=True)
    axis.grid(which="minor", color="white", linewidth=1)
    axis.tick_params(which="minor", length=0)
    for i in range(1, len(looks)):  # step boundaries
        if looks[i][1] != looks[i - 1][1]:
            axis.axvline(i - 0.5, color="black", linewidth=1.5)
    axis.set_xlabel("look (time; black lines separate steps)")
    axis.set_title("Gate verdicts per look")
    handles = [Patch(color=VERDICT_COLOURS[v], label=v) for v in VERDICTS]
    axis.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return figure


# --------------------------------------------------------------------------- HTML


_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#212121}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child{text-align:left}.ci{color:#757575;font-size:85%}.good{color:#2e7d32}.bad{color:#c62828}
.verdict{color:white;padding:1px 6px;border-radius:3px}td.message{text-align:left;font-size:90%}
img{max-width:100%}code{font-size:85%}"""


def _facts(summary: Mapping[str, Any]) -> str:
    rows = []
    for key, value in summary.items():
        text = value if isinstance(value, str) else json.dumps(_jsonable(value))
        if len(text) > 160:  # nested results (the simulation, the steps) have their own sections
            text = "(see summary.json)"
        rows.append(f"<tr><th>{html.escape(str(key))}</th><td class=\"message\">{html.escape(text)}</td></tr>")
    return f"<table>{''.join(rows)}</table>" if rows else "<p>–</p>"


def _steps_table(steps: Sequence[StepRecord]) -> str:
    if not steps:
        return "<p>No steps.</p>"
    rows = []
    for step in steps:
        ended = step.get("ended_s")
        duration = "–" if ended is None else f"{ended - step['started_s']:.1f}"
        rows.append(
            f"<tr><td>{step['index']}</td><td>{step['weight_pct']:g}%</td><td>{step['started_s']:.1f}</td>"
            f"<td>{'running' if ended is None else f'{ended:.1f}'}</td><td>{duration}</td>"
            f"<td>{html.escape(step.get('decision') or '–')}</td></tr>"
        )
    head = "<tr><th>step</th><th>treatment weight</th><th>started (s)</th><th>ended (s)</th>" \
           "<th>duration (s)</th><th>decision</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _last_looks(gate_history: Sequence[GateLook]) -> str:
    if not gate_history:
        return "<p>No gate looks.</p>"
    last: dict[str, GateLook] = {}
    for look in sorted(gate_history, key=lambda look: look["t_s"]):
        last[look["gate"]] = look
    rows = []
    for gate, look in last.items():
        colour = VERDICT_COLOURS.get(look["verdict"], VERDICT_COLOURS["Error"])
        value = "–" if _finite(look["value"]) is None else f"{look['value']:.4g}"
        rows.append(
            f"<tr><th>{html.escape(gate)}</th><td>{look['t_s']:.1f}</td><td>{look['step']}</td>"
            f'<td><span class="verdict" style="background:{colour}">{html.escape(look["verdict"])}</span></td>'
            f'<td>{value}</td><td class="message">{html.escape(look["message"])}</td></tr>'
        )
    head = "<tr><th>gate</th><th>t (s)</th><th>step</th><th>verdict</th><th>value</th><th>message</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _errors(simulation: SimulationResult) -> str:
    rows = [f"<tr><th>{html.escape(kind)}</th><td>{count:,}</td></tr>" for kind, count in simulation.errors.items()]
    rows.append(f"<tr><th>feedback re-posts</th><td>{simulation.retries:,}</td></tr>")
    rows.append(f"<tr><th>feedback events lost</th><td>{simulation.lost_events:,}</td></tr>")
    return f"<table>{''.join(rows)}</table>"


def write_report(
    out_dir: Path,
    summary: Mapping[str, Any],
    simulation: SimulationResult,
    steps: Sequence[StepRecord],
    gate_history: Sequence[GateLook],
    offline: Mapping[str, Mapping[str, float]],
) -> Path:
    """Write ``out_dir/report.html`` and the plots (:data:`PLOTS`) beside it; return the HTML's path.

    The HTML embeds the same PNGs (base64), so it can be mailed or attached on its own.
    """
    _check(steps, _STEP_KEYS, "steps")
    _check(gate_history, _LOOK_KEYS, "gate_history")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    control, treatment = arm_roles(summary, simulation)
    end_s = simulation.started_s + simulation.duration_s
    if steps:
        end_s = max(end_s, *(_ended(s, s["started_s"]) for s in steps))
    figures = {
        "ctr.png": ("CTR over time", ctr_figure(simulation.series, steps)),
        "latency.png": ("Latency", latency_figure(simulation.arms, simulation.series)),
        "traffic.png": ("Traffic", traffic_figure(steps, simulation.series, treatment, end_s)),
        "gates.png": ("Gates", gates_figure(gate_history)),
    }
    images = {}
    for file_name, (title, figure) in figures.items():
        encoded = _png(figure)  # closes the figure
        (out_dir / file_name).write_bytes(base64.b64decode(encoded))
        images[file_name] = (
            f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" src="data:image/png;base64,{encoded}">'
        )
    title = str(summary.get("title", "recops demo"))
    offline_html = metrics_table(offline) if offline else "<p>No offline metrics.</p>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Run</h2>{_facts(summary)}
<h2>A/B results (simulated users)</h2>
<p>Intervals are 95%: Wilson for rates, normal for GMV per user. Lift is treatment / control − 1.</p>
{ab_table_html(simulation, control, treatment)}
{images["ctr.png"]}
{images["traffic.png"]}
<h2>Steps</h2>{_steps_table(steps)}
{images["gates.png"]}
<h2>Gate verdicts at the last look</h2>{_last_looks(gate_history)}
{images["latency.png"]}
<h2>Offline metrics (test split)</h2>{offline_html}
<h2>Client errors</h2>{_errors(simulation)}
</body></html>"""
    path = out_dir / REPORT
    path.write_text(page)
    return path


# --------------------------------------------------------------------------- summary.json


def _jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays, dataclasses (``to_json`` if they have one), Paths,
    enums; NaN and infinities become null (JSON has no such numbers)."""
    if hasattr(value, "to_json") and callable(value.to_json):
        return _jsonable(value.to_json())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_summary(out_dir: Path, summary: Mapping[str, Any]) -> Path:
    """Write ``out_dir/summary.json`` (indented, keys in the given order) and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SUMMARY
    path.write_text(json.dumps(_jsonable(summary), indent=2, allow_nan=False) + "\n")
    return path
