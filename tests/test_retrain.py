"""`recops retrain`: the feedback the router logged becomes training data for the next revision, each event
once (the counts add up), trained from the last revision; a feedback log that no longer matches the
training data is refused before anything is trained."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from recops.cli import app
from recops.data.io import write_events, write_items
from recops.data.synthetic import SyntheticConfig, generate
from recops.training.retrain import EVENT_KEY, merge_event_logs

pytestmark = pytest.mark.slow
runner = CliRunner()
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A shop's log cut in time, laid out as the README's retrain commands expect: the first 70% trained
    runs/v1 (data/events.jsonl); the rest is what the router logged since (feedback.jsonl), with 25 events of
    the training log logged again (a replayed file)."""
    folder = tmp_path_factory.mktemp("shop")
    dataset = generate(SyntheticConfig(n_users=150, n_items=80, days=10, seed=4))
    events = dataset.events.sort("timestamp")
    cut = int(events.height * 0.7)
    training, since = events.head(cut), events.tail(events.height - cut)
    (folder / "data").mkdir()
    write_events(training, folder / "data" / "events.jsonl")
    write_items(dataset.items, folder / "data" / "items.parquet")
    feedback = pl.concat([since, training.sample(25, seed=3)])
    feedback.write_ndjson(folder / "feedback.jsonl")
    spec = {
        "apiVersion": "recops.dev/v1alpha1", "kind": "RecModel", "metadata": {"name": "shop"},
        "spec": {
            "data": {"events": f"file://{folder / 'data' / 'events.jsonl'}",
                     "items": f"file://{folder / 'data' / 'items.parquet'}"},
            "backbone": {"name": "builtin:tiny-qwen2", "maxSeqLength": 16},
            "lora": {"r": 4, "alpha": 8},
            "training": {"epochs": 1, "batchSize": 128, "embeddingDim": 32, "textItemsPerStep": 8},
        },
    }
    (folder / "recmodel.yaml").write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["train", "-f", str(folder / "recmodel.yaml"), "--out", str(folder / "runs" / "v1"),
                                 "--baselines", ""])
    assert result.exit_code == 0, result.output
    return folder, training, since


def distinct_new(training: pl.DataFrame, feedback: pl.DataFrame) -> int:
    """Counted here with Python sets, independently of the code under test."""
    def keys(frame):
        return {tuple(row[c] for c in EVENT_KEY) for row in frame.select(EVENT_KEY).iter_rows(named=True)}
    return len(keys(feedback) - keys(training))


def test_merging_keeps_every_event_once():
    base = pl.DataFrame({"user_id": ["u1", "u2"], "item_id": ["i1", "i1"], "event": ["click", "impression"],
                         "timestamp": [10, 11], "request_id": ["r1", "r2"]})
    again = pl.DataFrame({"user_id": ["u2", "u3"], "item_id": ["i1", "i2"], "event": ["impression", "like"],
                          "timestamp": [11, 12], "request_id": ["r2", "r3"], "device": ["ios", "web"]})
    merged = merge_event_logs(base, again)
    assert merged.counts() == {"training": 2, "feedback": 2, "duplicates": 1, "merged": 3}
    assert merged.events["user_id"].to_list() == ["u1", "u2", "u3"]
    assert merged.events["device"].to_list() == [None, None, "web"]


def test_feedback_becomes_training_data_of_the_next_revision(shop):
    """The README's two commands, run by bash as written in the shop's folder."""
    folder, training, since = shop
    block = next(b for b in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S) if "recops retrain" in b)
    recops = str(Path(sys.executable).parent / "recops")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.replace(".venv/bin/recops", recops)],
                            cwd=folder, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads((folder / "check.json").read_text())["ok"] is True
    out = folder / "runs" / "v2"
    output = result.stderr
    record = json.loads((out / "retrain.json").read_text())
    # No event lost, none used twice: the 25 replayed training events count once, as do the events the
    # generator writes twice on purpose (cleaning's "duplicate" reason).
    distinct = pl.concat([training, since]).unique(subset=list(EVENT_KEY)).height
    twice = training.height + since.height + 25 - distinct
    assert twice >= 25
    new = distinct_new(training, since)
    assert record["events"] == {"training": training.height, "feedback": since.height + 25, "duplicates": twice,
                                "merged": distinct, "new": new}
    assert f"{training.height} training + {since.height + 25} feedback - {twice} logged twice = {distinct} " \
           f"({new} new)" in output
    merged = pl.read_parquet(out / "data" / "events.parquet")
    assert merged.height == distinct and merged.unique(subset=list(EVENT_KEY)).height == distinct
    assert record["check"]["ok"] and record["warm_start"]["items_kept"] > 0 and record["warm_start"]["backbone"]
    assert (out / "towers.safetensors").is_file() and "recall@20" in record["metrics"]["twotower"]


def test_a_feedback_log_that_no_longer_matches_is_refused_before_training(shop, tmp_path):
    folder, _, since = shop
    since.with_columns(pl.col("item_id").str.replace(r"^\D+0*", "")).write_ndjson(tmp_path / "feedback.jsonl")
    out = tmp_path / "rev2"
    result = runner.invoke(app, ["retrain", "-f", str(folder / "recmodel.yaml"), "--previous",
                                 str(folder / "runs" / "v1"), "--feedback", str(tmp_path / "feedback.jsonl"),
                                 "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "refusing to train: the feedback log differs from the training data in item_id" in result.output
    assert json.loads((out / "retrain.json").read_text())["check"]["failed_columns"] == ["item_id"]
    assert not (out / "towers.safetensors").exists()


def test_a_previous_revision_that_is_not_a_model_is_a_clear_error(shop, tmp_path):
    folder, _, _ = shop
    result = runner.invoke(app, ["retrain", "-f", str(folder / "recmodel.yaml"), "--previous", str(tmp_path),
                                 "--feedback", str(folder / "feedback.jsonl"), "--out", str(tmp_path / "rev2")])
    assert result.exit_code == 2 and "not an exported model directory" in result.output, result.output


def test_a_missing_feedback_log_is_a_clear_error(shop, tmp_path):
    folder, _, _ = shop
    result = runner.invoke(app, ["retrain", "-f", str(folder / "recmodel.yaml"), "--previous",
                                 str(folder / "runs" / "v1"), "--feedback", str(tmp_path / "nope.jsonl"),
                                 "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "nope.jsonl: no such file" in result.output, result.output
    assert not (tmp_path / "b" / "towers.safetensors").exists()
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["retrain", "-f", str(folder / "recmodel.yaml"), "--previous",
                                 str(folder / "runs" / "v1"), "--feedback", str(tmp_path / "empty"),
                                 "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "no feedback log (*.jsonl) in this folder" in result.output, result.output
    for feedback, extra, message in (
            ("kafka://127.0.0.1:9/fb", [], "needs --feedback-store DIR"),
            ("kafka://127.0.0.1:9/", ["--feedback-store", str(tmp_path / "store")], "the broker and one topic")):
        result = runner.invoke(app, ["retrain", "-f", str(folder / "recmodel.yaml"), "--previous",
                                     str(folder / "runs" / "v1"), "--feedback", feedback, *extra,
                                     "--out", str(tmp_path / "d")])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "d").exists()


def test_a_generated_source_retrains_from_its_own_events_and_catalog(shop, tmp_path):
    """A spec whose data the synthetic generator makes (the shop's, whole): its events are the training
    events, and the next revision trains on an event log and the catalog written beside it."""
    folder, _, since = shop
    spec = yaml.safe_load((folder / "recmodel.yaml").read_text())
    spec["spec"]["data"] = {"source": "synthetic", "synthetic": {"users": 150, "items": 80, "days": 10, "seed": 4}}
    (tmp_path / "synthetic.yaml").write_text(yaml.safe_dump(spec))
    since.write_ndjson(tmp_path / "seen.jsonl")
    later = since.with_columns(pl.col("timestamp") + 86_400)  # the same events a day later: new ones
    later.write_ndjson(tmp_path / "later.jsonl")

    def retrain(feedback: str, out: str) -> object:
        return runner.invoke(app, ["retrain", "-f", str(tmp_path / "synthetic.yaml"), "--previous",
                                   str(folder / "runs" / "v1"), "--feedback", str(tmp_path / feedback),
                                   "--out", str(tmp_path / out), "--min-new-events", "1"])

    seen = retrain("seen.jsonl", "seen")
    assert seen.exit_code == 0 and "nothing to retrain: 0 new feedback events" in seen.output, seen.output
    result = retrain("later.jsonl", "v2")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "v2" / "retrain.json").read_text())
    assert record["events"]["new"] == later.unique(subset=list(EVENT_KEY)).height
    assert pl.read_parquet(tmp_path / "v2" / "data" / "items.parquet").height == 80
    assert (tmp_path / "v2" / "towers.safetensors").is_file()


def test_a_folder_of_router_logs_retrains_only_with_enough_new_events_and_never_twice(shop, tmp_path):
    """The cluster's layout: one folder per router pod, rotated files beside the current one, an empty file
    just opened. Below --min-new-events nothing trains; the revision trained from those events finds none
    new in the same logs, so an event feeds one revision only."""
    folder, training, since = shop
    logs = tmp_path / "feedback"
    parts = [since[i::3] for i in range(3)]
    for path, part in zip(("pod-a/feedback-20261129T100000000000Z.jsonl", "pod-a/feedback.jsonl",
                           "pod-b/feedback.jsonl"), parts, strict=True):
        (logs / path).parent.mkdir(parents=True, exist_ok=True)
        part.write_ndjson(logs / path)
    (logs / "pod-c").mkdir()
    (logs / "pod-c" / "feedback.jsonl").touch()
    new = distinct_new(training, since)
    spec, v1 = str(folder / "recmodel.yaml"), str(folder / "runs" / "v1")

    def retrain(previous: str, out: Path, minimum: int) -> tuple[object, dict]:
        message = tmp_path / f"{out.name}.termination"
        result = runner.invoke(app, ["retrain", "-f", spec, "--previous", previous, "--feedback", str(logs),
                                     "--out", str(out), "--min-new-events", str(minimum)],
                               env={"RECOPS_TERMINATION_LOG": str(message)})
        assert result.exit_code == 0, result.output
        return result, json.loads(message.read_text())

    result, message = retrain(v1, tmp_path / "too-few", new + 1)
    assert f"nothing to retrain: {new} new feedback events, fewer than the {new + 1}" in result.output
    assert message == {"skipped": message["skipped"], "events": {"training": training.height,
                                                                 "feedback": since.height, "new": new}}
    assert not (tmp_path / "too-few" / "towers.safetensors").exists()

    _, message = retrain(v1, tmp_path / "v2", new)
    assert message["events"]["new"] == new and message["events"]["merged"] == training.height + new \
        - (training.height - training.unique(subset=list(EVENT_KEY)).height)
    assert "recall@20" in message["metrics"]

    result, message = retrain(str(tmp_path / "v2"), tmp_path / "v3", 1)
    assert message["events"]["new"] == 0 and "skipped" in message, result.output
