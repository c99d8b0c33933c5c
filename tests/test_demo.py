"""``recops demo``: the whole loop with real Tritons, the router and real gates, promoted or rolled back.

The two full runs use ``--quick`` (small shop, halved pauses). Bad input is refused before anything
starts; a killed demo leaves no server behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recops.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--dataset", "ml-100k"], "--dataset ml-100k needs --data-dir"),
        (["--dataset", "ml-100k", "--data-dir", "/nonexistent"], "no u.data there"),
        (["--dataset", "imagenet"], "--dataset: expected synthetic or ml-100k"),
        (["--experiment", "/nonexistent.yaml"], "no such file"),
    ],
)
def test_bad_input_is_refused_before_anything_starts(tmp_path, arguments, message):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "out"), *arguments])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()


def test_an_invalid_experiment_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec:\n  control: {model: a}\n  treatment: {model: b}\n  assignment: {salt: s}\n  steps: []\n")
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "out"), "--experiment", str(bad)])
    assert result.exit_code == 2 and "spec.steps" in result.output


def _demo(out: Path, *extra: str) -> dict:
    result = runner.invoke(app, ["demo", "--out", str(out), "--quick", *extra])
    assert result.exit_code == 0, result.output[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "report.html").is_file()
    return summary


@pytest.mark.slow
def test_the_better_treatment_is_promoted(tmp_path):
    summary = _demo(tmp_path / "demo")
    assert summary["decision"] == "promoted" and summary["winner"] == "treatment", summary["reason"]
    assert [step["weight_pct"] for step in summary["steps"]][-1] == 100
    online = summary["online"]
    assert set(online["arms"]) == {"treatment", "control"}


@pytest.mark.slow
@pytest.mark.movielens
def test_the_demo_runs_on_movielens(tmp_path, ml100k):
    """The same loop on ML-100K: shoppers are the test split's ratings (no purchases, so no GMV)."""
    summary = _demo(tmp_path / "demo", "--dataset", "ml-100k", "--data-dir", str(ml100k))
    assert summary["dataset"] == "ml-100k" and summary["decision"] in ("promoted", "rolled_back", "held")
    assert {name.split()[0] for name in summary["offline"]} >= {"control", "treatment", "pop", "itemcf"}
    arms = summary["online"]["arms"]
    assert all(arms[arm]["impressions"] > 1000 and arms[arm]["clicks"] > 0 for arm in ("treatment", "control"))


@pytest.mark.slow
def test_a_worse_treatment_is_rolled_back(tmp_path):
    summary = _demo(tmp_path / "demo", "--worse-treatment")
    assert summary["decision"] == "rolled_back" and summary["winner"] == "control", summary["reason"]
    assert summary["gates"]["ctrLift"]["verdict"] == "Failed"


@pytest.mark.slow
def test_killing_the_demo_leaves_no_process_behind(tmp_path):
    out = tmp_path / "demo"
    process = subprocess.Popen(
        [sys.executable, "-m", "recops", "demo", "--out", str(out), "--quick"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    # Drain the output in a thread: a full pipe would block the demo's own shutdown messages.
    lines: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        for line in process.stdout:
            lines.append(line)
            if "router ready" in line:
                ready.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        assert ready.wait(timeout=300), "the demo never reached the experiment:\n" + "".join(lines[-20:])
        os.kill(process.pid, signal.SIGINT)  # Ctrl-C
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            raise AssertionError("the demo did not stop within 90 s of Ctrl-C:\n" + "".join(lines[-30:])) from None
        deadline = time.monotonic() + 30
        left = ["?"]
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
        assert left == []  # no Triton, stub, router or Prometheus of this demo is left
    finally:
        if process.poll() is None:
            process.kill()
        subprocess.run(["pkill", "-9", "-f", str(out)], check=False)
