"""``recops retrain``: the next revision from the last one and the feedback the router logged.

1. **Check** the feedback log against the training events (:mod:`recops.data.feature_check`); on a
   mismatch nothing is trained and the report names the columns.
2. **Merge** the training events and the feedback log into one event log, each event once: an event
   is its (user, item, event, timestamp, request id); one logged twice (a retried write, a replayed
   file) counts once, and the counts say how many were dropped that way.
3. **Train** from the last revision's weights (:mod:`recops.training.warm_start`), evaluate, export.

``out/retrain.json`` holds the counts, the check's report and what the warm start carried over.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recops.api.recmodel import RecModelSpec
from recops.data.feature_check import FeatureCheckConfig, FeatureCheckReport, check_features, read_log
from recops.data.io import write_events
from recops.data.schema import EVENT_SCHEMA
from recops.training.run import run_training

EVENT_KEY = ("user_id", "item_id", "event", "timestamp", "request_id")


class RetrainRefused(RuntimeError):
    """The feedback log does not match the training data: nothing was trained."""

    def __init__(self, report: FeatureCheckReport) -> None:
        self.report = report
        columns = ", ".join(sorted({f.column for f in report.failed}))
        super().__init__(f"the feedback log differs from the training data in {columns}")


@dataclass(frozen=True)
class MergedEvents:
    """The event log of the next revision and where its rows came from."""

    events: pl.DataFrame
    training_rows: int
    feedback_rows: int
    duplicates: int

    def counts(self) -> dict[str, int]:
        return {"training": self.training_rows, "feedback": self.feedback_rows, "duplicates": self.duplicates,
                "merged": self.events.height}


def merge_event_logs(training: pl.DataFrame, feedback: pl.DataFrame) -> MergedEvents:
    """Training events then the feedback log, in the event-log schema, each event once."""

    def typed(frame: pl.DataFrame) -> pl.DataFrame:
        return frame.select(
            pl.col(c).cast(dtype, strict=False) if c in frame.columns else pl.lit(None, dtype=dtype).alias(c)
            for c, dtype in EVENT_SCHEMA.items()
        )

    both = pl.concat([typed(training), typed(feedback)])
    merged = both.unique(subset=list(EVENT_KEY), keep="first", maintain_order=True)
    return MergedEvents(merged, training.height, feedback.height, both.height - merged.height)


def run_retrain(
    spec: RecModelSpec,
    previous: Path,
    feedback: Path,
    out: Path,
    check: FeatureCheckConfig | None = None,
) -> dict:
    """Check, merge, train from ``previous`` into ``out``; returns what ``out/retrain.json`` holds.

    Raises :class:`RetrainRefused` (nothing written but the report) when the check fails.
    """
    if spec.data.source != "events" or not spec.data.events:
        raise ValueError("retrain reads the training events from spec.data.events (spec.data.source: events)")
    training, online = read_log(spec.data.events), read_log(feedback)
    report = check_features(training, online, check)
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"previous": str(previous), "feedback": str(feedback), "check": report.to_dict()}
    if not report.ok:
        (out / "retrain.json").write_text(json.dumps(record, indent=2) + "\n")
        raise RetrainRefused(report)
    merged = merge_event_logs(training, online)
    events = out / "data" / "events.parquet"
    events.parent.mkdir(parents=True, exist_ok=True)
    write_events(merged.events, events)
    next_spec = spec.model_copy(update={"data": spec.data.model_copy(update={"events": f"file://{events.resolve()}"})})
    summary = run_training(next_spec, out, warm_start=previous)
    record.update(events=merged.counts(), warm_start=summary["warm_start"], metrics=summary["metrics"])
    (out / "retrain.json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    return record
