"""The recops command line: help everywhere, clear errors, the train command end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from recops.cli import app

runner = CliRunner()
TINY = {
    "data": {"source": "synthetic", "synthetic": {"users": 120, "items": 60, "days": 8, "seed": 2}},
    "backbone": {"name": "builtin:tiny-qwen2", "maxSeqLength": 16},
    "lora": {"r": 4, "alpha": 8},
    "training": {"epochs": 1, "batchSize": 128, "embeddingDim": 16, "textItemsPerStep": 4},
}


@pytest.mark.parametrize("command", [[], ["train"], ["prepare"]])
def test_help_on_every_command(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "recops", "--help"], capture_output=True, text=True, check=True)
    assert "train" in result.stdout


def test_a_bad_spec_exits_2_naming_the_field(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**TINY, "training": {"batchSize": -4}}))
    result = runner.invoke(app, ["train", "-f", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "spec.training.batchSize" in result.output
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_unknown_baseline_is_refused_before_training(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(TINY))
    result = runner.invoke(app, ["train", "-f", str(path), "--out", str(tmp_path / "out"),
                                 "--baselines", "pop,gru4rec"])
    assert result.exit_code == 2
    assert "unknown gru4rec" in result.output and "sasrec" in result.output
    assert not (tmp_path / "out").exists()


def test_missing_event_file_is_named(tmp_path):
    path = tmp_path / "spec.yaml"
    spec = {**TINY, "data": {"source": "events", "events": str(tmp_path / "none.jsonl"),
                             "items": str(tmp_path / "items.csv")}}
    (tmp_path / "items.csv").write_text("item_id,title,category,description\nP1,a,b,c\n")
    path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["prepare", "-f", str(path)])
    assert result.exit_code == 2
    assert "none.jsonl: no such file" in result.output


def test_prepare_prints_drops_and_split_sizes(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(TINY))
    result = runner.invoke(app, ["prepare", "-f", str(path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert 0 < sum(summary["drops"].values()) < summary["rows_read"]
    assert set(summary["drops"]) >= {"malformed", "duplicate", "bot"}
    assert summary["train"] > 0 and summary["items"] == 60


@pytest.mark.slow
def test_train_writes_the_model_the_report_and_the_termination_message(tmp_path, monkeypatch):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "recops.dev/v1alpha1", "kind": "RecModel",
                                    "metadata": {"name": "tiny"}, "spec": TINY}))
    monkeypatch.setenv("RECOPS_TERMINATION_LOG", str(tmp_path / "termination-log"))
    result = runner.invoke(app, ["train", "-f", str(path), "--out", str(tmp_path / "out"), "--baselines", "pop"])
    assert result.exit_code == 0, result.output
    assert "twotower" in result.output and "recall@10" in result.output  # the metrics table
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"twotower", "pop"}
    report = (tmp_path / "out" / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 2
    message = json.loads((tmp_path / "termination-log").read_text())
    assert message["metrics"]["recall@20"] == metrics["twotower"]["recall@20"]
