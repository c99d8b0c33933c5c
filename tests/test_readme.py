"""Every example in the README runs: the spec validates, the event line parses, the demo trains."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from recops.api import parse_recmodel_spec
from recops.cli import app

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
runner = CliRunner()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_quick_start_commands_are_the_makefile_targets_ci_runs():
    quick_start = _blocks("bash")[0]
    assert "make demo" in quick_start and "make test" in quick_start
    makefile = (REPO / "Makefile").read_text()
    assert "recops train -f examples/recmodel-synthetic.yaml" in makefile
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_the_spec_and_event_line_in_the_readme_work_with_recops_prepare(tmp_path):
    event = json.loads(_blocks("json")[0])
    spec_text = _blocks("yaml")[0]
    spec = parse_recmodel_spec(yaml.safe_load(spec_text))
    assert spec.backbone.name == "Qwen/Qwen2.5-0.5B"
    events, items = tmp_path / "events.jsonl", tmp_path / "items.parquet"
    rows = [{**event, "user_id": f"U{i % 7}", "timestamp": event["timestamp"] + 60 * i} for i in range(40)]
    events.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    import polars as pl

    pl.DataFrame({"item_id": [event["item_id"]], "title": ["a shoe"], "category": ["shoes"],
                  "description": ["red"]}).write_parquet(items)
    local = spec_text.replace("file:///data/events.jsonl", f"file://{events}").replace(
        "file:///data/items.parquet", f"file://{items}"
    )
    (tmp_path / "spec.yaml").write_text(local)
    result = runner.invoke(app, ["prepare", "-f", str(tmp_path / "spec.yaml")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rows_read"] == 40 and summary["users"] == 7


@pytest.mark.slow
def test_make_demo_trains_evaluates_and_writes_the_report(tmp_path):
    """What `make demo` runs, on the exact example file (MiniLM, synthetic shop log)."""
    out = tmp_path / "demo"
    result = runner.invoke(app, ["train", "-f", str(REPO / "examples" / "recmodel-synthetic.yaml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"twotower", "pop", "itemcf", "ease", "tfidf"}
    # The text tower places never-seen items: better than a random order of the cold items.
    assert metrics["twotower"]["cold_recall@20"] > metrics["ease"]["cold_recall@20"]
    assert (out / "report.html").stat().st_size > 10_000
