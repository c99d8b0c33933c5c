"""``recops retrain``: the next revision from the last one and the feedback the router logged.

The training events are the last revision's own (``previous/data/events.parquet``, written by the
retrain that made it) or, for a revision trained from the spec, the spec's source (its event log, or
the synthetic generator's or MovieLens' events, whose catalog is then written beside); the feedback log
is one file or a folder of them (the routers write one folder per pod, rotated files beside the current).

0. **Count** the feedback events the training events lack; fewer than ``min_new_events``: nothing to
   do (the record says so and nothing is trained).
1. **Check** the feedback log against the training events (:mod:`recops.data.feature_check`); on a
   mismatch nothing is trained and the report names the columns.
2. **Merge** the training events and the feedback log into one event log, each event once: an event
   is its (user, item, event, timestamp, request id); one logged twice (a retried write, a replayed
   file, feedback an earlier retrain already merged) counts once, and the counts say how many were
   dropped that way. ``spec.retrain.windowDays`` then keeps the last days only (cleaning's window).
3. **Train** from the last revision's weights (:mod:`recops.training.warm_start`), evaluate, export;
   the merged log is kept beside the model (``data/events.parquet``) for the next retrain.

``out/retrain.json`` holds the counts, the check's report and what the warm start carried over.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recops.api.recmodel import DataSpec, RecModelSpec
from recops.data.feature_check import FeatureCheckConfig, FeatureCheckReport, check_features, read_log
from recops.data.io import DataFormatError, resolve_uri, write_events, write_items
from recops.data.prepare import source_logs
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


MERGED_EVENTS = Path("data") / "events.parquet"  # in a retrained revision's folder


def _typed(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select(
        pl.col(c).cast(dtype, strict=False) if c in frame.columns else pl.lit(None, dtype=dtype).alias(c)
        for c, dtype in EVENT_SCHEMA.items()
    )


def merge_event_logs(training: pl.DataFrame, feedback: pl.DataFrame) -> MergedEvents:
    """Training events then the feedback log, in the event-log schema, each event once."""
    both = pl.concat([_typed(training), _typed(feedback)])
    merged = both.unique(subset=list(EVENT_KEY), keep="first", maintain_order=True)
    return MergedEvents(merged, training.height, feedback.height, both.height - merged.height)


def count_new_events(training: pl.DataFrame, feedback: pl.DataFrame) -> int:
    """Distinct feedback events that the training events do not hold."""
    key = list(EVENT_KEY)
    fresh = _typed(feedback).unique(subset=key).join(_typed(training), on=key, how="anti", nulls_equal=True)
    return fresh.height


def read_feedback(location: str | Path) -> pl.DataFrame:
    """A feedback log: one file, or every non-empty ``*.jsonl`` under a folder (all router pods, rotated files)."""
    path = Path(resolve_uri(location))
    if not path.is_dir():
        return read_log(location)
    files = sorted(f for f in path.rglob("*.jsonl") if f.is_file() and f.stat().st_size > 0)
    if not files:
        raise DataFormatError(f"{path}: no feedback log (*.jsonl) in this folder")
    return pl.concat([read_log(f) for f in files], how="diagonal_relaxed")


def training_events_of(spec: RecModelSpec, previous: Path) -> pl.DataFrame:
    """The events the previous revision trained on: its merged log, or the spec's own source's."""
    merged = previous / MERGED_EVENTS
    if merged.is_file():
        return read_log(merged)
    if spec.data.source == "events":
        assert spec.data.events is not None  # the spec validator guarantees it
        return read_log(spec.data.events)  # with its own dtypes: they are part of what is checked
    return source_logs(spec.data)[0]


def _next_data(spec: RecModelSpec, events: Path, out: Path) -> DataSpec:
    """The next revision's data: the merged log, the spec's catalog (written beside it when the source
    generates one), cut to ``spec.retrain.windowDays``."""
    data = spec.data
    items = data.items
    if data.source != "events":
        items_file = out / "data" / "items.parquet"
        write_items(source_logs(data)[1], items_file)
        items = f"file://{items_file.resolve()}"
    cleaning = data.cleaning
    if spec.retrain is not None and spec.retrain.window_days is not None:
        cleaning = cleaning.model_copy(update={"window_days": spec.retrain.window_days})
    return data.model_copy(update={"source": "events", "events": f"file://{events.resolve()}", "items": items,
                                   "cleaning": cleaning})


def run_retrain(
    spec: RecModelSpec,
    previous: Path,
    feedback: str | Path,
    out: Path,
    check: FeatureCheckConfig | None = None,
    min_new_events: int = 0,
) -> dict:
    """Count, check, merge, train from ``previous`` into ``out``; returns what ``out/retrain.json`` holds.

    With fewer than ``min_new_events`` new feedback events the record has ``skipped`` and nothing is
    trained. Raises :class:`RetrainRefused` (nothing written but the report) when the check fails.
    """
    training, online = training_events_of(spec, previous), read_feedback(feedback)
    new = count_new_events(training, online)
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"previous": str(previous), "feedback": str(feedback),
                    "events": {"training": training.height, "feedback": online.height, "new": new}}
    if new < min_new_events:
        record["skipped"] = f"{new} new feedback events, fewer than the {min_new_events} a retrain needs"
        (out / "retrain.json").write_text(json.dumps(record, indent=2) + "\n")
        return record
    report = check_features(training, online, check)
    record["check"] = report.to_dict()
    if not report.ok:
        (out / "retrain.json").write_text(json.dumps(record, indent=2) + "\n")
        raise RetrainRefused(report)
    merged = merge_event_logs(training, online)
    events = out / MERGED_EVENTS
    events.parent.mkdir(parents=True, exist_ok=True)
    write_events(merged.events, events)
    summary = run_training(spec.model_copy(update={"data": _next_data(spec, events, out)}), out, warm_start=previous)
    record.update(events={**merged.counts(), "new": new}, warm_start=summary["warm_start"], metrics=summary["metrics"],
                  teacher=summary["teacher"])
    (out / "retrain.json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    return record
