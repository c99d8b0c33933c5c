"""Distillation: a smaller student against its teacher, quality and serving cost measured in one run.

    python benchmarks/distillation.py --data-dir ../shared/data/ml-100k --out results/distillation-ml100k.json

Three models on one dataset and split, one after the other, through ``run_training`` (what ``recops train``
runs: train, evaluate, export):

* ``teacher`` — MiniLM at its full depth (6 layers), embedding 256;
* ``student_distilled`` — MiniLM cut to its first ``--student-layers`` layers, a narrower embedding,
  trained with ``spec.distillation`` from the teacher's exported directory;
* ``student_plain`` — the same student without the teacher (the ablation baseline).

The cut backbone is MiniLM's own weights, first N transformer layers kept, saved as a Hugging Face folder
in the run's scratch directory; the student's ``spec.backbone.name`` is that folder (a local folder is a
backbone name recops already accepts, so no new spec field is needed).

Serving cost, teacher against student, alternating the two on every repetition so both share the noise:

* ``request``: per-request ranking latency of ``Scorer.rank`` — the in-process code ``recops_ranker``
  (Triton's python model) wraps — at batch 1 and batch ``--batch``, one torch thread as Triton's CPU
  instances run, k = 20, histories of real users; median and p99. ``recommend``: the same through
  ``Ranker.recommend`` (request checks, ids to indices and back, the three ensemble steps in-process).
  Neither runs the backbone: histories are read as item vectors from the exported index.
* ``item_encoding``: the cold-start path, where the backbone's depth costs — every catalog text tokenized,
  read by the exported backbone and projected to an item vector (what a new item needs before it can be
  served); items per second.

Writes {"dataset", "models": {NAME: {metrics, "train_seconds", "size"}}, "serving": {...},
"ratios": {...}, "targets": {...}, "teacher_in_student_summary", "seconds", "machine"} and prints tables.
``--quick`` is a tiny synthetic run for the smoke test (figures meaningless).

``--serving-only DIR`` trains nothing: it times serving (``request`` and ``recommend``, as above) of models already
exported as ``DIR/teacher`` and ``DIR/student_distilled`` (or ``DIR/student``), on the data given as for training,
and writes {"serving", "ratios": {"latency"}, "models": {NAME: directory}, "machine"}; item encoding only with
``--encode-repeats`` above 0. For before/after comparisons of the serving code on the same exports:

    python benchmarks/distillation.py --data-dir ../shared/data/ml-100k --serving-only /tmp/exports \
        --encode-repeats 0 --out results/serving.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from recops.api.recmodel import DataSpec, RecModelSpec
from recops.data.features import history_matrix
from recops.data.prepare import prepare
from recops.models.backbone import MINILM, minilm_path
from recops.serving.ranker import Ranker
from recops.training.evaluation import evaluate
from recops.training.export import load_model
from recops.training.run import run_training

log = logging.getLogger("distillation")

HISTORY_LENGTH = 600  # as benchmarks/quality.py: every training item of every ML-100K user
K = 20
RECALL_TARGET = 0.95  # student Recall@20 / teacher's, at least
LATENCY_TARGET = 0.50  # student latency / teacher's, at most
# The teacher: MiniLM as shipped, d=256 (the settings of benchmarks/quality.py's two-tower before its
# order-aware tower and residual).
_TRAINING = {"epochs": 6, "batchSize": 512, "temperature": 0.05, "historyDropout": 0.7, "textItemsPerStep": 0}
QUICK_DATA = {"users": 150, "items": 80, "days": 10, "seed": 4}


def truncated_minilm(layers: int, folder: Path) -> Path:
    """MiniLM with only its first ``layers`` transformer layers, as a Hugging Face folder (weights + tokenizer)."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(minilm_path())
    total = model.config.num_hidden_layers
    if not 1 <= layers <= total:
        raise SystemExit(f"--student-layers must be between 1 and {total}")
    model.encoder.layer = model.encoder.layer[:layers]
    model.config.num_hidden_layers = layers
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


def model_settings(args: argparse.Namespace, backbone: str, dim: int) -> dict:
    training = {**_TRAINING, "embeddingDim": dim, "seed": args.seed, "epochs": args.epochs}
    if args.quick:
        training["batchSize"] = 128
    return {
        "backbone": {"name": backbone, "maxSeqLength": 32},
        "lora": {"enabled": False},
        "training": training,
    }


def data_spec(args: argparse.Namespace) -> DataSpec:
    if args.quick:
        return DataSpec(source="synthetic", synthetic=QUICK_DATA, split="time", history_length=50)
    if not args.data_dir:
        sys.exit("--data-dir is needed (the MovieLens-100K folder with u.data and u.item), or --quick")
    return DataSpec(source="movielens", movielens_dir=args.data_dir, split="recbole", history_length=HISTORY_LENGTH)


def model_size(directory: Path) -> dict:
    """What serving a model directory holds: embedding width, index, tower and backbone parameters."""
    loaded = load_model(directory, with_backbone=True)
    encoder = loaded.model.encoder
    assert encoder is not None
    towers = sum(t.numel() for name, t in loaded.model.state_dict().items()
                 if not name.startswith("encoder.") and name != "text_cache")
    return {
        "backbone": loaded.spec.backbone.name if loaded.spec.backbone.name == MINILM else "minilm (first layers)",
        "backbone_layers": int(encoder.model.config.num_hidden_layers),
        "backbone_parameters": sum(p.numel() for p in encoder.model.parameters()),
        "embedding_dim": loaded.spec.training.width(loaded.spec.data.split),
        "index_bytes": int(loaded.item_index.nbytes),
        "tower_parameters": int(towers),
    }


def _stats(samples: list[float]) -> dict:
    values = np.asarray(samples) * 1000.0
    return {"p50_ms": float(np.median(values)), "p99_ms": float(np.percentile(values, 99)),
            "mean_ms": float(values.mean()), "n": len(samples)}


def alternate(calls: dict[str, Callable[[int], object]], repeats: int, label: str) -> dict[str, list[float]]:
    """Time ``call(rep)`` of each model ``repeats`` times, interleaved (the order flips every round, both models
    get the same ``rep``), after one warm-up each."""
    for call in calls.values():
        call(0)
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    step = max(1, repeats // 4)
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            calls[name](rep)
            times[name].append(time.perf_counter() - started)
        if (rep + 1) % step == 0:
            log.info("  %s: %d/%d", label, rep + 1, repeats)
    return times


def serving_cost(dirs: dict[str, Path], data, args: argparse.Namespace) -> dict:
    """Per-request latency (batch 1 and ``--batch``) and item-encoding throughput, the models interleaved."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as recops_ranker's CPU instances
    try:
        rankers = {name: Ranker.load(d) for name, d in dirs.items()}
        item_ids = np.array(data.items["item_id"].to_list(), dtype=object)
        histories = history_matrix(data.train, data.n_users, data_spec(args).history_length)
        users = [u for u in range(data.n_users) if histories.mask[u].any()]
        rng = np.random.default_rng(args.seed)
        n = max(args.batch, 256)
        # Real users' training histories (item ids, oldest first): each repetition is another request.
        request_histories = [item_ids[histories.items[u][histories.mask[u]]].tolist()
                             for u in rng.choice(users, size=n, replace=len(users) < n)]
        result: dict = {"threads": 1, "k": K, "history_items_mean": float(np.mean([len(h) for h in request_histories])),
                        "request": {}, "recommend": {}}
        for batch, repeats in ((1, args.repeats), (args.batch, max(10, args.repeats // 10))):
            batches = [[request_histories[(i * batch + j) % n] for j in range(batch)] for i in range(n)]
            inputs = {name: [[r.catalog.features(h, K) for h in b] for b in batches] for name, r in rankers.items()}

            def rank(name: str, inputs=inputs) -> Callable[[int], object]:
                return lambda rep: rankers[name].scorer.rank(inputs[name][rep % n])

            def recommend(name: str, batches=batches) -> Callable[[int], object]:
                return lambda rep: rankers[name].recommend(batches[rep % n], k=K)

            for kind, make in (("request", rank), ("recommend", recommend)):
                log.info("%s latency, batch %d, %d repetitions", kind, batch, repeats)
                times = alternate({name: make(name) for name in rankers}, repeats, f"{kind} batch {batch}")
                result[kind][f"batch_{batch}"] = {name: _stats(t) for name, t in times.items()}
        torch.set_num_threads(threads)  # the backbone is a batch job: it gets the machine's threads
        if args.encode_repeats > 0 or not getattr(args, "serving_only", None):
            result["item_encoding"] = item_encoding(dirs, args)
            result["item_encoding_threads"] = threads
    finally:
        torch.set_num_threads(threads)
    return result


def item_encoding(dirs: dict[str, Path], args: argparse.Namespace) -> dict:
    """Cold-start path: the catalog's text → tokens → exported backbone → projection → normalised item vectors."""
    loaded = {name: load_model(d, with_backbone=True) for name, d in dirs.items()}
    texts = {name: m.items["text"].to_list() for name, m in loaded.items()}

    def encode(name: str) -> Callable[[int], object]:
        model = loaded[name].model
        encoder = model.encoder
        assert encoder is not None

        @torch.no_grad()
        def run(rep: int) -> torch.Tensor:
            tokens = encoder.tokenize(texts[name])
            text = encoder.encode_all(tokens)
            return torch.nn.functional.normalize(model.text_projection(text), dim=-1)

        return run

    n_items = len(next(iter(texts.values())))
    log.info("item encoding: %d catalog texts, %d repetitions", n_items, args.encode_repeats)
    times = alternate({name: encode(name) for name in loaded}, args.encode_repeats, "item encoding")
    return {name: {"items": n_items, "seconds_p50": float(np.median(t)), "items_per_s": n_items / float(np.median(t)),
                   "n": len(t)} for name, t in times.items()}


def ratios(report: dict) -> dict:
    """Student / teacher for recall, NDCG and every latency figure (and throughput: higher is better there)."""
    models, serving = report["models"], report["serving"]
    out: dict = {}
    for student in ("student_distilled", "student_plain"):
        out[student] = {m: models[student][m] / models["teacher"][m] if models["teacher"][m] else None
                        for m in ("recall@20", "ndcg@20", "recall@10", "ndcg@10", "cold_recall@20")
                        if m in models["teacher"]}
    out["latency"] = latency_ratios(serving)
    encoding = serving["item_encoding"]
    out["item_encoding_time"] = encoding["student_distilled"]["seconds_p50"] / encoding["teacher"]["seconds_p50"]
    return out


def latency_ratios(serving: dict) -> dict:
    """Student / teacher of every latency figure."""
    latency = {}
    for kind in ("request", "recommend"):
        for batch, per_model in serving[kind].items():
            for stat in ("p50_ms", "p99_ms"):
                latency[f"{kind}_{batch}_{stat}"] = per_model["student_distilled"][stat] / per_model["teacher"][stat]
    return latency


def serving_only(args: argparse.Namespace) -> dict:
    """Serving cost of already exported teacher and student directories (``--serving-only DIR``), nothing trained."""
    root = args.serving_only
    student = next((root / name for name in ("student_distilled", "student") if (root / name).is_dir()), None)
    if not (root / "teacher").is_dir() or student is None:
        sys.exit(f"--serving-only needs {root}/teacher and {root}/student_distilled (or {root}/student)")
    started = time.perf_counter()
    data = prepare(data_spec(args), seed=args.seed)
    dirs = {"teacher": root / "teacher", "student_distilled": student}
    serving = serving_cost(dirs, data, args)
    report = {"models": {name: str(d) for name, d in dirs.items()}, "serving": serving,
              "ratios": {"latency": latency_ratios(serving)}, "seconds": time.perf_counter() - started,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "torch": torch.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float))
    print("\n".join(serving_lines(serving)))
    print(f"seconds {report['seconds']:.0f} → {args.out}")
    return report


def targets(report: dict) -> dict:
    """The issue's targets, each with the figure it was judged on."""
    r = report["ratios"]
    recall = r["student_distilled"]["recall@20"]
    request = {key: value for key, value in r["latency"].items() if key.startswith("request_") and "p50" in key}
    return {
        "recall_at_20_ratio": {"value": recall, "target": f">= {RECALL_TARGET}", "met": recall >= RECALL_TARGET},
        "request_latency_p50_ratio": {
            "value": request, "target": f"<= {LATENCY_TARGET} at every batch size",
            "met": all(v <= LATENCY_TARGET for v in request.values()),
        },
        "item_encoding_time_ratio": {
            "value": r["item_encoding_time"], "target": f"<= {LATENCY_TARGET}",
            "met": r["item_encoding_time"] <= LATENCY_TARGET,
        },
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="MovieLens-100K folder (u.data, u.item)")
    parser.add_argument("--quick", action="store_true", help="tiny synthetic run (smoke test; figures meaningless)")
    parser.add_argument("--teacher-dim", type=int, default=256)
    parser.add_argument("--student-dim", type=int, default=64)
    parser.add_argument("--student-layers", type=int, default=2, help="MiniLM layers the student keeps (of 6)")
    parser.add_argument("--temperature", type=float, default=2.0, help="spec.distillation.temperature")
    parser.add_argument("--weight", type=float, default=0.5, help="spec.distillation.weight")
    parser.add_argument("--retrieval-weight", type=float, default=0.5, help="spec.distillation.retrievalWeight")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=64, help="the larger request batch measured")
    parser.add_argument("--repeats", type=int, default=2000, help="latency repetitions at batch 1 (a tenth at --batch)")
    parser.add_argument("--encode-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path, help="also write recall and latency, teacher vs students, as a PNG")
    parser.add_argument("--serving-only", type=Path, metavar="DIR",
                        help="train nothing: time serving of DIR/teacher and DIR/student_distilled (or DIR/student)")
    args = parser.parse_args(argv)
    if args.serving_only:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        return serving_only(args)
    if args.quick:
        args.epochs, args.repeats, args.encode_repeats, args.batch = 1, 20, 1, 8
        args.teacher_dim, args.student_dim = min(args.teacher_dim, 32), min(args.student_dim, 16)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()

    data = prepare(data_spec(args), seed=args.seed)
    log.info("data: %s", data.summary())
    models: dict[str, dict] = {}
    summaries: dict[str, dict] = {}
    with TemporaryDirectory(prefix="recops-distill-") as scratch_dir:
        scratch = Path(scratch_dir)
        student_backbone = str(truncated_minilm(args.student_layers, scratch / f"minilm-{args.student_layers}l"))
        dirs = {name: scratch / name for name in ("teacher", "student_distilled", "student_plain")}
        plans = {
            "teacher": model_settings(args, MINILM, args.teacher_dim),
            "student_distilled": {
                **model_settings(args, student_backbone, args.student_dim),
                "distillation": {"teacher": f"file://{dirs['teacher']}", "temperature": args.temperature,
                                 "weight": args.weight, "retrievalWeight": args.retrieval_weight},
            },
            "student_plain": model_settings(args, student_backbone, args.student_dim),
        }
        for position, (name, settings) in enumerate(plans.items(), start=1):
            log.info("[%d/3] training %s: %s", position, name, json.dumps(settings))
            spec = RecModelSpec.model_validate({"data": data_spec(args).to_manifest_dict(), **settings})
            summary = run_training(spec, dirs[name], restart=True, baselines=(), data=data)
            summaries[name] = summary
            scorer_model = load_model(dirs[name], with_backbone=False)
            at_20 = _ndcg_at_20(scorer_model, data, args.seed)
            models[name] = {**summary["metrics"]["twotower"], **at_20, "best_epoch": summary["best_epoch"],
                            "size": model_size(dirs[name])}
            log.info("%s: recall@20 %.4f, ndcg@20 %.4f, %.0f s", name, models[name]["recall@20"],
                     models[name]["ndcg@20"], models[name]["train_seconds"])
        log.info("[serving] teacher vs student_distilled (student_plain has the student's shapes: same cost)")
        serving = serving_cost({"teacher": dirs["teacher"], "student_distilled": dirs["student_distilled"]}, data, args)

    report: dict = {
        "dataset": "synthetic" if args.quick else "ml-100k",
        "protocol": "time" if args.quick else "recbole",
        "seed": args.seed,
        "data": data.summary(),
        "settings": {"student_layers": args.student_layers, "teacher_dim": args.teacher_dim,
                     "student_dim": args.student_dim, "distillation_temperature": args.temperature,
                     "distillation_weight": args.weight, "distillation_retrieval_weight": args.retrieval_weight,
                     "epochs": args.epochs, "k": K},
        "models": models,
        "serving": serving,
        # What `recops train` of the student wrote beside its own metrics (metrics.json's "teacher").
        "teacher_in_student_summary": summaries["student_distilled"]["teacher"],
    }
    report["ratios"] = ratios(report)
    report["targets"] = targets(report)
    report["seconds"] = time.perf_counter() - started
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                         "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float))
    if args.plot:
        save_plot(report, args.plot)
    print(markdown(report))
    print(f"seconds {report['seconds']:.0f}, peak RSS {report['peak_rss_mb']:.0f} MB → {args.out}")
    return report


def _ndcg_at_20(loaded, data, seed: int) -> dict[str, float]:
    """NDCG@20 (the evaluator gives NDCG at its smallest cut-off, so it is asked for 20 alone)."""
    from recops.training.trainer import ModelScorer

    histories = history_matrix(data.train, data.n_users, loaded.spec.data.history_length)
    metrics = evaluate(ModelScorer(loaded.model, histories), data, ks=(20,), seed=seed, with_auc=False)
    return {"ndcg@20": float(metrics["ndcg@20"])}


def markdown(report: dict) -> str:
    """Quality, size and serving cost, teacher and students side by side."""
    models, serving, ratio = report["models"], report["serving"], report["ratios"]
    lines = ["| model | layers | d | Recall@20 | NDCG@20 | Recall@10 | cold Recall@20 | × teacher R@20 | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        share = ratio[name]["recall@20"] if name in ratio else 1.0
        lines.append(f"| {name} | {m['size']['backbone_layers']} | {m['size']['embedding_dim']} | "
                     f"{m['recall@20']:.4f} | {m['ndcg@20']:.4f} | {m['recall@10']:.4f} | "
                     f"{m.get('cold_recall@20', float('nan')):.4f} | {share:.3f} | {m['train_seconds']:.0f} |")
    lines += ["", *serving_lines(serving)]
    enc = serving["item_encoding"]
    lines.append(f"| item encoding, items/s | {enc['teacher']['items_per_s']:.0f} | "
                 f"{enc['student_distilled']['items_per_s']:.0f} | time {ratio['item_encoding_time']:.2f} |")
    lines += ["", "targets: " + "; ".join(f"{k} {'MET' if v['met'] else 'NOT met'}"
                                         for k, v in report["targets"].items())]
    return "\n".join(lines)


def serving_lines(serving: dict) -> list[str]:
    """The latency table, teacher and student side by side."""
    lines = ["| serving cost | teacher | student | student / teacher |", "|---|---|---|---|"]
    for kind in ("request", "recommend"):
        for batch, per_model in serving[kind].items():
            for stat in ("p50_ms", "p99_ms"):
                t, s = per_model["teacher"][stat], per_model["student_distilled"][stat]
                lines.append(f"| {kind} {batch.replace('_', ' ')} {stat[:3]} ms | {t:.3f} | {s:.3f} | {s / t:.2f} |")
    return lines


def save_plot(report: dict, path: Path) -> Path:
    """Two panels: Recall@20 / NDCG@20 of the three models; p50 latency and encoding time, teacher vs student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, serving = report["models"], report["serving"]
    figure, (quality, cost) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(models)
    x = np.arange(len(names))
    for offset, metric in ((-0.2, "recall@20"), (0.2, "ndcg@20")):
        bars = quality.bar(x + offset, [models[n][metric] for n in names], 0.4, label=metric)
        quality.bar_label(bars, fmt="%.3f", fontsize=8)
    quality.set_xticks(x, [f"{n}\n{models[n]['size']['backbone_layers']} layers, d={models[n]['size']['embedding_dim']}"
                           for n in names], fontsize=8)
    quality.set_title(f"{report['dataset']}: quality (test)")
    quality.set_ylim(0, max(m["recall@20"] for m in models.values()) * 1.25)
    quality.legend(fontsize=8, loc="upper center", ncol=2)
    labels, teacher, student = [], [], []
    for kind in ("request", "recommend"):
        for batch, per_model in serving[kind].items():
            labels.append(f"{kind}\n{batch.replace('_', ' ')}")
            teacher.append(1.0)
            student.append(per_model["student_distilled"]["p50_ms"] / per_model["teacher"]["p50_ms"])
    labels.append("item\nencoding")
    teacher.append(1.0)
    student.append(report["ratios"]["item_encoding_time"])
    x = np.arange(len(labels))
    cost.bar(x - 0.2, teacher, 0.4, label="teacher")
    bars = cost.bar(x + 0.2, student, 0.4, label="student")
    cost.bar_label(bars, fmt="%.2f", fontsize=8)
    cost.axhline(LATENCY_TARGET, color="grey", linestyle="--", linewidth=1, label="target ≤ 0.5")
    cost.set_xticks(x, labels, fontsize=8)
    cost.set_ylabel("p50 time / teacher's")
    cost.set_title("serving cost, relative to the teacher")
    cost.set_ylim(0, 1.3)
    cost.legend(fontsize=8, loc="upper center", ncol=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


if __name__ == "__main__":
    main()
