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
    assert "recops demo --out $(OUT)" in makefile
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
def test_the_synthetic_example_trains_evaluates_and_writes_the_report(tmp_path):
    """`recops train` on the README's example file (MiniLM, synthetic shop log)."""
    out = tmp_path / "demo"
    result = runner.invoke(app, ["train", "-f", str(REPO / "examples" / "recmodel-synthetic.yaml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"twotower", "pop", "itemcf", "ease", "tfidf"}
    # The text tower places never-seen items: better than a random order of the cold items.
    assert metrics["twotower"]["cold_recall@20"] > metrics["ease"]["cold_recall@20"]
    assert (out / "report.html").stat().st_size > 10_000


@pytest.mark.slow
def test_the_serve_it_commands_answer_recommendations_and_count_feedback(tiny_model, tmp_path):
    """The README's serving block, run by bash as written, on the tiny model and on free ports."""
    import shutil
    import subprocess
    import sys

    from recops.serving.triton_server import free_port

    block = next(b for b in _blocks("bash") if "recops export" in b)
    grpc, router = free_port(), free_port()
    config = (REPO / "examples" / "router-local.yaml").read_text()
    config = config.replace("127.0.0.1:8001", f"127.0.0.1:{grpc}").replace("runs/demo/", f"{tmp_path}/")
    (tmp_path / "router.yaml").write_text(config)
    script = (
        block.replace(".venv/bin/recops", f"{sys.executable} -m recops")
        .replace("runs/demo/triton", str(tmp_path / "triton"))
        .replace("--model runs/demo/models/treatment ", f"--model {tiny_model[2]} ")
        .replace("--grpc-port 8001", f"--grpc-port {grpc} --http-port 0 --metrics-port 0")
        .replace("examples/router-local.yaml", str(tmp_path / "router.yaml"))
        .replace("8080", str(router))
    )
    assert shutil.which("curl"), "the README's serving example uses curl"
    # The background servers are this shell's jobs: stop them (and Triton's stubs) when it exits.
    wrapped = "set -e\ntrap 'kill -INT $(jobs -p) 2>/dev/null; wait' EXIT\n" + script
    done = subprocess.run(["timeout", "180", "bash", "-c", wrapped], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    answer = json.loads(lines[0])
    assert answer["arm"] in {"treatment", "control"} and len(answer["items"]) == 5 and answer["request_id"]
    assert {"P00017", "P00003"}.isdisjoint(item["item_id"] for item in answer["items"])  # history is not repeated
    assert json.loads(lines[1])  # the feedback answer
    clicks = [line for line in lines[2:] if 'event="click"' in line and f'arm="{answer["arm"]}"' in line]
    assert clicks and clicks[0].endswith(" 1.0")


def test_the_gpu_commands_are_the_makefile_target_and_benchmark_the_tests_run():
    """`make kernels` runs kernels/build.py (what tests/test_kernels_build.py runs) and installs the result;
    the benchmark command is run on the CPU by tests/test_benchmarks.py (a GPU machine runs it as written)."""
    block = next(b for b in _blocks("bash") if "make kernels" in b)
    assert "benchmarks/kernels.py --out results/kernels.json" in block
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("\nkernels:", 1)[1].split("\n\n", 1)[0]
    assert "kernels/build.py --out kernels/build/lib" in recipe and "pip install" in recipe
    assert (REPO / "benchmarks" / "kernels.py").is_file()
