"""The demo report: the A/B table and its lifts, the plots, and summary.json."""

from __future__ import annotations

import base64
import json
import math
import re

import matplotlib.image
import numpy as np
import pytest

from recops.demo.report import (
    PLOTS,
    GateLook,
    StepRecord,
    ab_table,
    arm_roles,
    lift,
    write_report,
    write_summary,
)
from recops.demo.simulation import ArmStats, Latency, SimulationResult, TickPoint

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _series(arm: str, final: ArmStats, ticks: int = 20) -> tuple[TickPoint, ...]:
    """Ticks growing linearly to the arm's totals, one per second."""
    points = []
    for i in range(1, ticks + 1):
        f = i / ticks

        def part(total: float, f: float = f) -> int:
            return int(total * f)

        points.append(TickPoint(
            t_s=float(i), requests=part(final.requests), users=part(final.users), impressions=part(final.impressions),
            clicks=part(final.clicks), likes=part(final.likes), carts=part(final.carts),
            purchases=part(final.purchases), gmv=final.gmv * f, window_requests=final.requests // ticks,
            latency_p50_ms=5.0 + i % 3, latency_p95_ms=9.0, latency_p99_ms=12.0 + i % 5,
        ))
    return tuple(points)


@pytest.fixture
def simulation() -> SimulationResult:
    control = ArmStats("control", requests=250, users=100, impressions=2500, clicks=100, likes=20, carts=10,
                       purchases=5, gmv=500.0, gmv_user_sumsq=60_000.0,
                       latency=Latency(250, 6.0, 5.0, 9.0, 12.0, 20.0))
    treatment = ArmStats("treatment", requests=260, users=100, impressions=2600, clicks=130, likes=26, carts=16,
                         purchases=8, gmv=880.0, gmv_user_sumsq=120_000.0,
                         latency=Latency(260, 7.0, 6.0, 10.0, 15.0, 25.0))
    return SimulationResult(
        arms={"treatment": treatment, "control": control},
        series={"treatment": _series("treatment", treatment), "control": _series("control", control)},
        errors={"feedback 503": 2}, page_views=512, lost_events=0, retries=2, started_s=0.0, duration_s=20.0,
    )


STEPS: list[StepRecord] = [
    {"index": 0, "weight_pct": 5.0, "started_s": 0.0, "ended_s": 6.0},  # decision is optional
    {"index": 1, "weight_pct": 25.0, "started_s": 6.0, "ended_s": 13.0, "decision": "Progressing"},
    {"index": 2, "weight_pct": 100.0, "started_s": 13.0, "ended_s": 20.0, "decision": "Promoted"},
]
VERDICT_CYCLE = ("Inconclusive", "Successful", "Failed", "Error")
GATES: list[GateLook] = [
    {"t_s": float(t), "step": 0 if t < 6 else 1 if t < 13 else 2, "gate": gate,
     "verdict": "Successful" if gate == "sampleRatio" else VERDICT_CYCLE[(t // 3) % 4],
     "value": 0.12 if gate == "ctrLift" else None, "message": f"{gate} at {t}s"}
    for t in range(3, 21, 3) for gate in ("ctrLift", "sampleRatio", "latencyP99")
]
OFFLINE = {"control": {"recall@20": 0.21, "ndcg@10": 0.11}, "treatment": {"recall@20": 0.27, "ndcg@10": 0.14}}
SUMMARY = {"title": "recops demo (seed 7)", "seed": 7, "experiment": "ranker-v2", "outcome": "promoted",
           "control_arm": "control", "treatment_arm": "treatment"}


def _row(page: str, metric: str) -> list[str]:
    match = re.search(rf'<tr data-metric="{metric}">(.*?)</tr>', page)
    assert match, metric
    return [re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", match.group(1))]


def test_lifts_and_roles(simulation):
    assert lift(0.05, 0.04) == pytest.approx(0.25)
    assert lift(1.0, 0.0) is None and lift(None, 1.0) is None and lift(math.nan, 1.0) is None
    assert arm_roles({}, simulation) == ("control", "treatment")
    assert arm_roles({"control_arm": "treatment", "treatment_arm": "control"}, simulation) == ("treatment", "control")
    rows = {row["metric"]: row for row in ab_table(simulation, "control", "treatment")}
    assert rows["ctr"]["control"] == pytest.approx(0.04) and rows["ctr"]["treatment"] == pytest.approx(0.05)
    assert rows["ctr"]["lift"] == pytest.approx(0.25)
    assert rows["gmv_per_user"]["lift"] == pytest.approx(0.76)
    assert rows["page_views_per_user"]["lift"] == pytest.approx(0.04)
    assert rows["like_rate"]["lift"] == pytest.approx(0.01 / 0.008 - 1)
    assert rows["latency_p99_ms"]["lift"] == pytest.approx(0.25)
    # Without a treatment arm the table still has every metric, lifts undefined.
    only = ab_table(SimulationResult({"control": simulation.arms["control"]}, {}, {}, 0, 0, 0, 0.0, 0.0),
                    "control", None)
    assert all(row["treatment"] is None and row["lift"] is None for row in only)


def test_report_has_the_ab_table_with_lifts_and_every_plot(simulation, tmp_path):
    path = write_report(tmp_path / "out", SUMMARY, simulation, STEPS, GATES, OFFLINE)
    assert path == tmp_path / "out" / "report.html"
    page = path.read_text()
    assert "<title>recops demo (seed 7)</title>" in page and "promoted" in page
    assert _row(page, "ctr")[0] == "CTR"
    control, treatment, lift_cell = _row(page, "ctr")[1:]
    assert control.startswith("4.00%") and treatment.startswith("5.00%") and lift_cell == "+25.0%"
    assert "[" in control  # the 95% interval
    assert _row(page, "users")[1:] == ["100", "100", "+0.0%"]
    assert _row(page, "page_views")[1:] == ["250", "260", "+4.0%"]
    assert _row(page, "gmv")[1:] == ["500.00", "880.00", "+76.0%"]
    assert _row(page, "gmv_per_user")[3] == "+76.0%"
    assert _row(page, "purchases")[1:] == ["5", "8", "+60.0%"]
    assert _row(page, "likes")[3] == "+30.0%"
    assert _row(page, "latency_p50_ms")[1:] == ["5.00", "6.00", "+20.0%"]
    # Green where the treatment is better, red where worse (slower), no colour for totals that follow traffic.
    assert '<span class="good">+25.0%</span>' in page and '<span class="bad">+20.0%</span>' in page
    assert '<td class="lift"><span>+4.0%</span>' in page  # page views
    # Offline metrics per model, steps, the last look of every gate.
    assert "recall@20" in page and "0.2700" in page and "ndcg@10" in page
    assert "Promoted" in page and "latencyP99 at 18s" in page
    # Four images embedded, each identical to its PNG file beside the report.
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == len(PLOTS) == 4
    files = {name: (tmp_path / "out" / name).read_bytes() for name in PLOTS}
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(files.values())
    for name, content in files.items():
        assert content.startswith(PNG_SIGNATURE), name
        image = matplotlib.image.imread(tmp_path / "out" / name)
        assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50, name
        assert np.ptp(image) > 0, f"{name} is blank"


def test_report_without_traffic_steps_or_gates_still_has_every_plot(tmp_path):
    empty = SimulationResult({}, {}, {}, 0, 0, 0, 0.0, 0.0)
    page = write_report(tmp_path, {}, empty, [], [], {}).read_text()
    assert "No steps." in page and "No gate looks." in page and "No offline metrics." in page
    for name in PLOTS:
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)


def test_malformed_steps_and_looks_are_named(simulation, tmp_path):
    with pytest.raises(ValueError, match=r"steps\[0\] lacks started_s"):
        write_report(tmp_path, {}, simulation, [{"index": 0, "weight_pct": 5}], [], {})
    # A step still running (no ended_s) is fine.
    write_report(tmp_path, {}, simulation, [{"index": 0, "weight_pct": 5, "started_s": 0}], [], {})
    assert "running" in (tmp_path / "report.html").read_text()
    with pytest.raises(ValueError, match=r"gate_history\[0\] lacks message, verdict"):
        write_report(tmp_path, {}, simulation, [], [{"t_s": 1, "step": 0, "gate": "g", "value": None}], {})


def test_summary_json_round_trips(simulation, tmp_path):
    summary = {**SUMMARY, "steps": STEPS, "gates": GATES[:3], "offline": OFFLINE,
               "ab": ab_table(simulation, "control", "treatment")}
    path = write_summary(tmp_path / "out", summary)
    assert path == tmp_path / "out" / "summary.json"
    assert json.loads(path.read_text()) == summary
    # Values JSON has no literal for are made plain: numpy numbers, NaN, dataclasses with to_json.
    odd = {"n": np.int64(3), "x": np.float32(0.5), "nan": math.nan, "arr": np.arange(3), "simulation": simulation}
    loaded = json.loads(write_summary(tmp_path, odd).read_text())
    assert loaded["n"] == 3 and loaded["x"] == 0.5 and loaded["nan"] is None and loaded["arr"] == [0, 1, 2]
    assert SimulationResult.from_json(loaded["simulation"]) == simulation
