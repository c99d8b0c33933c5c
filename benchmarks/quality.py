"""Offline quality: every baseline and the two-tower model on one dataset, one split, for one or more seeds.

    python benchmarks/quality.py --dataset ml-100k --data-dir ../shared/data/ml-100k \
        --protocol recbole --seeds 0,1,2 --out results/quality-ml100k.json
    python benchmarks/quality.py --dataset amazon-beauty --data-dir ../shared/data/amazon-beauty \
        --protocol loo --seeds 0,1,2 --out results/quality-beauty.json

A seed draws the split (RecBole protocol; leave-one-out and time splits do not depend on it)
and every model's initialisation and sampling. With several seeds each figure is
``{"mean", "std", "values"}`` over them (sample std); with one, a plain number.

Leave-one-out (``--protocol loo``) reports Recall and NDCG at 5, 10 and 20, as the sequential
recommendation papers do; the other protocols at 10, 20, 50 and 100.

Writes {"dataset", "protocol", "seeds", "models": {NAME: {...metrics, "train_seconds", "seconds", "peak_rss_mb",
"epochs", "best_epoch", "curves"}}, "runs": [{"seed", "models", "seconds"}], "seconds", "peak_rss_mb", "machine"}
and prints a Markdown table. Models trained by epochs (SASRec, the two-tower) stop early on validation NDCG@10
and keep their best epoch; "curves" holds their validation NDCG@10 by epoch, one ``[[epoch, value], ...]`` per
seed (``--curves`` draws them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from recops.api.recmodel import DataSpec, RecModelSpec
from recops.data.prepare import prepare
from recops.models.baselines import BASELINES
from recops.training.evaluation import DEFAULT_KS, evaluate
from recops.training.report import markdown_table, save_learning_curves, save_recall_plot, summarise_seeds
from recops.training.run import evaluate_baselines, train_with_progress
from recops.training.trainer import ModelScorer

LOO_KS = (5, 10, 20)
HEADLINE = ("recall@10", "recall@20", "ndcg@10", "cold_recall@20", "like_auc", "train_seconds")
# Leave-one-out has no cold items and, on review data, no likes: the papers' cut-offs instead.
LOO_HEADLINE = ("recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20", "train_seconds")
# The two-tower variants the benchmark trains (MiniLM: the offline CPU backbone; a spec names its own).
# `twotower` is what `recops train` trains when the spec says nothing else (the sequence user tower under
# loo/time splits; the pooled tower trained on the user's other items under recbole); `twotower_pooled` the
# pooled tower of issue 14 (mean + gated attention read, half next-item samples); `twotower_sequence` the
# sequence tower whatever the split (a set under recbole); `twotower_bag` the pooled tower with
# `nextItemFraction: 0`;
# `twotower_lora` adds a LoRA adapter trained on 16 items' text per step (opt-in: a `lora` section).
_MINILM = {"name": "builtin:minilm", "maxSeqLength": 32}
TWO_TOWERS = {
    "twotower": {"backbone": _MINILM},
    "twotower_pooled": {"backbone": _MINILM, "training": {"userTower": "pooled", "nextItemFraction": 0.5}},
    "twotower_sequence": {"backbone": _MINILM, "training": {"userTower": "sequence"}},
    "twotower_bag": {"backbone": _MINILM, "training": {"userTower": "pooled", "nextItemFraction": 0.0}},
    "twotower_lora": {
        "backbone": _MINILM,
        "lora": {"r": 32, "alpha": 64, "dropout": 0.05},
        "training": {"textItemsPerStep": 16},
    },
}
HISTORY_LENGTH = 600  # every training item of every ML-100K user (the longest has 590)


def data_spec(args: argparse.Namespace) -> DataSpec:
    """The DataSpec the command-line flags describe."""
    split = args.protocol
    if args.dataset == "ml-100k":
        if not args.data_dir:
            sys.exit("--dataset ml-100k needs --data-dir (the folder with u.data and u.item)")
        return DataSpec(source="movielens", movielens_dir=args.data_dir, split=split, history_length=HISTORY_LENGTH)
    if args.dataset == "amazon-beauty":
        if not args.data_dir:
            sys.exit("--dataset amazon-beauty needs --data-dir (the folder with user_sequence.txt)")
        if split == "time":
            sys.exit("--dataset amazon-beauty has no timestamps: --protocol loo or recbole")
        return DataSpec(source="amazon-beauty", amazon_beauty_dir=args.data_dir, split=split,
                        history_length=HISTORY_LENGTH)
    if args.dataset == "events":
        if not (args.events and args.items):
            sys.exit("--dataset events needs --events PATH and --items PATH")
        return DataSpec(
            source="events", events=args.events, items=args.items, split=split, history_length=HISTORY_LENGTH
        )
    return DataSpec(source="synthetic", split=split, history_length=HISTORY_LENGTH)


def parse_seeds(text: str, parser: argparse.ArgumentParser) -> list[int]:
    """``--seeds 0,1,2`` as distinct non-negative integers, in order."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {text!r}")
    if not seeds or any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def parse_override(text: str, parser: argparse.ArgumentParser) -> tuple[str, Any]:
    """``--tower-set training.nextItemFraction=1`` as (dotted path, JSON value)."""
    path, sep, value = text.partition("=")
    if not sep or not path:
        parser.error(f"--tower-set wants PATH=VALUE, got {text!r}")
    try:
        return path, json.loads(value)
    except json.JSONDecodeError:
        parser.error(f"--tower-set {path}: VALUE must be JSON (a number, true/false, a quoted string), got {value!r}")


def _reset_peak_rss() -> None:
    """Start a new peak-RSS count for this process (Linux: writing 5 to clear_refs resets VmHWM)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb() -> float:
    """This process's peak resident memory since the last reset (the whole run's where it cannot be reset)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_seed(args: argparse.Namespace, names: list[str], seed: int) -> tuple[Any, dict]:
    """One seed: the split, every named model trained and evaluated on it, each with its seconds (training and
    evaluation) and peak memory (the data's included)."""
    data = prepare(data_spec(args), seed=seed)
    ks = LOO_KS if args.protocol == "loo" else DEFAULT_KS
    models = {}
    for name in names:
        started = time.perf_counter()
        _reset_peak_rss()
        models[name] = train_baseline(name, data, seed, ks) if name in BASELINES else train_tower(
            args, name, data, seed, ks)
        models[name].update(seconds=time.perf_counter() - started, peak_rss_mb=_peak_rss_mb())
        logging.info("%s: %s", name, {k: v for k, v in models[name].items() if not isinstance(v, list)})
    return data, models


def train_baseline(name: str, data: Any, seed: int, ks: tuple[int, ...]) -> dict:
    """One baseline, as ``recops train`` evaluates them."""
    return evaluate_baselines(data, [name], seed=seed, ks=ks)[name]


def train_tower(args: argparse.Namespace, name: str, data: Any, seed: int, ks: tuple[int, ...]) -> dict:
    """One two-tower variant: its settings, the seed and the command line's overrides."""
    settings = json.loads(json.dumps(TWO_TOWERS[name]))
    settings.setdefault("training", {})["seed"] = seed
    if args.epochs:
        settings["training"]["epochs"] = args.epochs
    for path, value in args.tower_overrides:
        *parents, leaf = path.split(".")
        node = settings
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    spec = RecModelSpec.model_validate({"data": data_spec(args).to_manifest_dict(), **settings})
    with TemporaryDirectory() as scratch:
        result = train_with_progress(spec, data, Path(scratch), restart=True)
    return {
        **evaluate(ModelScorer(result.model, result.histories), data, ks=ks, seed=seed),
        "train_seconds": result.seconds,
        # Epochs counted from 1, as the baselines' (best_epoch: the one kept).
        "epochs": len(result.state.valid),
        "best_epoch": result.state.best_epoch + 1,
        "curve": [[v["epoch"] + 1, v["ndcg@10"]] for v in result.state.valid if "ndcg@10" in v],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["ml-100k", "amazon-beauty", "synthetic", "events"], default="synthetic")
    parser.add_argument("--data-dir", help="the dataset's folder (--dataset ml-100k or amazon-beauty)")
    parser.add_argument("--events", help="event log (--dataset events)")
    parser.add_argument("--items", help="item catalog (--dataset events)")
    parser.add_argument("--protocol", choices=["recbole", "time", "loo"], default="recbole")
    parser.add_argument("--models", default="pop,itemcf,bpr,ease,tfidf,sasrec,twotower")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2 (figures: mean ± std)")
    parser.add_argument("--epochs", type=int, help="override the two-tower epochs")
    parser.add_argument("--tower-set", action="append", default=[], metavar="PATH=VALUE",
                        help="override a two-tower setting in every variant, e.g. training.nextItemFraction=1 "
                        "(VALUE is JSON; repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path, help="also write the recall bar chart as a PNG")
    parser.add_argument("--curves", type=Path, help="also write the learning curves (validation NDCG@10 by epoch) "
                        "as a PNG")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in BASELINES and n not in TWO_TOWERS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {sorted(BASELINES)} and {sorted(TWO_TOWERS)}")
    seeds = parse_seeds(args.seeds, parser)
    args.tower_overrides = [parse_override(text, parser) for text in args.tower_set]
    started = time.perf_counter()
    runs = []
    for seed in seeds:
        seed_started = time.perf_counter()
        data, models = run_seed(args, names, seed)
        runs.append({"seed": seed, "models": models, "seconds": time.perf_counter() - seed_started})
        logging.info("seed %d done in %.0f s", seed, runs[-1]["seconds"])
    models = summarise_seeds([run["models"] for run in runs])
    # Each model's validation NDCG@10 by epoch, one curve per seed (models trained by epochs only).
    curves = {name: [run["models"][name]["curve"] for run in runs] for name in names
              if all("curve" in run["models"][name] for run in runs)}
    for name, per_seed in curves.items():
        models[name]["curves"] = per_seed
    report = {
        "dataset": args.dataset,
        "protocol": args.protocol,
        "seeds": seeds,
        "data": data.summary(),
        "models": models,
        "runs": runs,
        "seconds": time.perf_counter() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float))
    headline = LOO_HEADLINE if args.protocol == "loo" else HEADLINE
    if args.plot:
        save_recall_plot(models, args.plot, [k for k in headline if k.startswith(("recall", "ndcg", "cold"))])
    if args.curves and curves:
        save_learning_curves(curves, args.curves)
    print(markdown_table(models, headline))
    print(f"seconds {report['seconds']:.0f}, peak RSS {report['peak_rss_mb']:.0f} MB → {args.out}")
    return report


if __name__ == "__main__":
    main()
