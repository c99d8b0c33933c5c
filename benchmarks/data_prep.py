"""Events per second of parse + clean + sessionize, recops (polars) against plain pandas.

    python benchmarks/data_prep.py --events 2000000 --out results/data_prep.json

Both read the same generated JSONL file and apply the same rules (schema
check, event types, timestamps, duplicates, unknown items, bot rate, 30-minute
sessions). Writes {"events", "recops": {"events_per_s", "seconds"},
"pandas": {...}, "ratio", "machine"}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import pandas as pd

from recops.api.recmodel import CleaningSpec
from recops.data.cleaning import clean_events
from recops.data.io import read_events, write_events
from recops.data.schema import EVENT_TYPES
from recops.data.sessions import sessionize
from recops.data.synthetic import SyntheticConfig, generate


def make_log(n_events: int, folder: Path) -> tuple[Path, set[str]]:
    """A synthetic JSONL log of about ``n_events`` rows, and the catalog's item ids."""
    users = max(50, int(n_events / 150))
    dataset = generate(SyntheticConfig(n_users=users, n_items=max(100, users // 3), seed=7))
    events = dataset.events.head(n_events)
    path = folder / "events.jsonl"
    write_events(events, path)
    return path, set(dataset.items["item_id"].to_list())


def run_recops(path: Path, items) -> int:
    raw = read_events(path)
    result = clean_events(raw, items, CleaningSpec())
    return sessionize(result.events, 30).height


def run_pandas(path: Path, item_ids: set[str]) -> int:
    frame = pd.read_json(path, lines=True, dtype={"user_id": str, "item_id": str, "request_id": str})
    frame = frame.dropna(subset=["user_id", "item_id", "event", "timestamp"])
    frame = frame[frame["event"].isin(list(EVENT_TYPES))]
    frame["timestamp"] = pd.to_numeric(frame["timestamp"], errors="coerce")
    frame = frame[frame["timestamp"] > 0]
    frame = frame.drop_duplicates(subset=["user_id", "item_id", "event", "timestamp", "request_id"])
    frame = frame[frame["item_id"].isin(item_ids)]
    per_minute = frame.groupby([frame["user_id"], frame["timestamp"] // 60]).size()
    bots = per_minute[per_minute > CleaningSpec().bot_max_events_per_minute].index.get_level_values(0).unique()
    frame = frame[~frame["user_id"].isin(bots)].sort_values(["user_id", "timestamp"], kind="stable")
    gap = frame.groupby("user_id")["timestamp"].diff() > 30 * 60
    frame["session_id"] = gap.astype(np.int32).groupby(frame["user_id"]).cumsum()
    return len(frame)


def timed(function, *args) -> tuple[float, int]:
    started = time.perf_counter()
    rows = function(*args)
    return time.perf_counter() - started, rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=3, help="best of N for each implementation")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    with TemporaryDirectory() as scratch:
        path, item_ids = make_log(args.events, Path(scratch))
        items = pl_items(item_ids)
        n_lines = sum(1 for _ in path.open())
        ours = [timed(run_recops, path, items) for _ in range(args.repeats)]
        theirs = [timed(run_pandas, path, item_ids) for _ in range(args.repeats)]
    best_ours, best_theirs = min(s for s, _ in ours), min(s for s, _ in theirs)
    report = {
        "events": n_lines,
        "recops": {"events_per_s": n_lines / best_ours, "seconds": best_ours, "rows_kept": ours[0][1]},
        "pandas": {"events_per_s": n_lines / best_theirs, "seconds": best_theirs, "rows_kept": theirs[0][1]},
        "ratio": best_theirs / best_ours,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


def pl_items(item_ids: set[str]):
    import polars as pl

    return pl.DataFrame({"item_id": sorted(item_ids)})


if __name__ == "__main__":
    main()
