"""The benchmark scripts run and write the JSON shape the issue asks for (tiny sizes: speed is not asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_data_prep_benchmark_writes_both_implementations(tmp_path):
    out = tmp_path / "data_prep.json"
    report = _load("data_prep").main(["--events", "20000", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    for name in ("recops", "pandas"):
        assert report[name]["events_per_s"] > 0 and report[name]["seconds"] > 0
    # Same rules, same input: both keep the same rows.
    assert report["recops"]["rows_kept"] == report["pandas"]["rows_kept"]


def test_quality_benchmark_on_synthetic_baselines(tmp_path):
    out = tmp_path / "quality.json"
    report = _load("quality").main(
        ["--dataset", "synthetic", "--protocol", "time", "--models", "pop,ease,tfidf", "--out", str(out)]
    )
    assert set(report["models"]) == {"pop", "ease", "tfidf"}
    for metrics in report["models"].values():
        assert {"recall@10", "recall@20", "ndcg@10", "like_auc", "train_seconds"} <= set(metrics)
    assert report["peak_rss_mb"] > 0 and report["seconds"] > 0


def test_quality_benchmark_leave_one_out_reports_the_papers_cut_offs(tmp_path):
    report = _load("quality").main(
        ["--dataset", "synthetic", "--protocol", "loo", "--models", "pop,itemcf", "--out", str(tmp_path / "q.json")]
    )
    assert report["protocol"] == "loo" and report["data"]["valid"] == report["data"]["test"]  # one item per user
    for metrics in report["models"].values():
        recall, ndcg = ([metrics[f"{m}@{k}"] for k in (5, 10, 20)] for m in ("recall", "ndcg"))
        assert recall == sorted(recall) and ndcg == sorted(ndcg) and recall[-1] > 0
        # One held-out item per user: its NDCG@K is at most its hit rate, equal only if always ranked first.
        assert all(n <= r for n, r in zip(ndcg, recall, strict=True))


def test_quality_benchmark_over_seeds_reports_mean_spread_and_values(tmp_path):
    out = tmp_path / "q.json"
    report = _load("quality").main(["--dataset", "synthetic", "--protocol", "recbole", "--models", "pop,itemcf",
                                    "--seeds", "0,1,2", "--out", str(out), "--plot", str(tmp_path / "q.png")])
    assert json.loads(out.read_text())["models"] == report["models"] and (tmp_path / "q.png").stat().st_size > 0
    assert report["seeds"] == [0, 1, 2] and [run["seed"] for run in report["runs"]] == [0, 1, 2]
    for name in ("pop", "itemcf"):
        recall = report["models"][name]["recall@10"]
        values = [run["models"][name]["recall@10"] for run in report["runs"]]
        assert recall["values"] == values and recall["mean"] == pytest.approx(sum(values) / 3)
        assert recall["std"] >= 0
    # The seed draws the split: three seeds, three different figures for the same model.
    assert len(set(report["models"]["itemcf"]["recall@10"]["values"])) == 3


@pytest.mark.parametrize("seeds", ["0,x", "0,0", "-1", ""])
def test_quality_benchmark_refuses_bad_seeds(tmp_path, seeds, capsys):
    with pytest.raises(SystemExit):
        _load("quality").main(["--models", "pop", "--seeds", seeds, "--out", str(tmp_path / "q.json")])
    assert "--seeds" in capsys.readouterr().err


def test_quality_benchmark_leave_one_out_on_an_event_log_whose_items_have_only_titles(tmp_path):
    from recops.data.io import write_events, write_items
    from recops.data.synthetic import SyntheticConfig, generate

    shop = generate(SyntheticConfig(n_users=150, n_items=80, seed=4))
    write_events(shop.events, tmp_path / "events.jsonl")
    write_items(shop.items.select("item_id", "title"), tmp_path / "items.csv")
    report = _load("quality").main(["--dataset", "events", "--events", str(tmp_path / "events.jsonl"),
                                    "--items", str(tmp_path / "items.csv"), "--protocol", "loo",
                                    "--models", "pop,tfidf", "--out", str(tmp_path / "q.json")])
    assert report["data"]["valid"] == report["data"]["test"]  # one held-out item per user
    assert report["models"]["tfidf"]["recall@20"] > 0 and "recall@5" in report["models"]["pop"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--dataset", "amazon-beauty"], "--dataset amazon-beauty needs --data-dir"),
    (["--dataset", "amazon-beauty", "--data-dir", "x", "--protocol", "time"], "no timestamps: --protocol loo"),
])
def test_quality_benchmark_amazon_beauty_flags(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        _load("quality").main([*flags, "--out", str(tmp_path / "q.json")])


def test_quality_benchmark_refuses_unknown_models(tmp_path):
    with pytest.raises(SystemExit):
        _load("quality").main(["--models", "pop,bert4rec", "--out", str(tmp_path / "q.json")])


def test_quality_benchmark_events_needs_both_files(tmp_path):
    with pytest.raises(SystemExit, match="--events PATH and --items PATH"):
        _load("quality").main(["--dataset", "events", "--events", "x.jsonl", "--out", str(tmp_path / "q.json")])


@pytest.mark.slow
def test_serving_benchmark_writes_direct_and_router_figures(tiny_model, tmp_path):
    """A tiny closed-loop run with wrk (the open loop needs vegeta, built by Go: left to the real run)."""
    out = tmp_path / "serving.json"
    report = _load("serving").main([
        "--model", str(tiny_model[2]), "--concurrency", "4", "--rate", "0", "--duration", "2",
        "--feedback-events", "50", "--batch-rows", "8", "--out", str(out),
    ])
    assert json.loads(out.read_text()) == report
    (level,) = report["levels"]
    for side in ("direct", "router"):
        assert level[side]["qps"] > 0 and level[side]["p99_ms"] >= level[side]["p50_ms"] > 0
        assert level[side]["error_rate"] == 0
    assert report["feedback"] == {**report["feedback"], "sent": 50, "logged": 50}
    assert report["feedback"]["impressions_logged"] > 0
    assert report["router_cpu_us_per_request"] > 0 and report["router_rss_mb"] > 0


def test_kernel_benchmark_writes_both_implementations_per_configuration(tmp_path):
    # No GPU here: --allow-cpu measures the torch reference against torch, so only the shape is checked.
    out = tmp_path / "kernels.json"
    report = _load("kernels").main(
        ["--allow-cpu", "--batches", "1,4", "--items", "3000", "--dims", "16", "--k", "10", "--repeats", "2",
         "--warmup", "1", "--dtype", "float32", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == report
    assert [(r["users"], r["items"], r["d"]) for r in report["retrieval"]] == [(1, 3000, 16), (4, 3000, 16)]
    for row in report["retrieval"]:
        assert row["recops_ms"] > 0 and row["torch_ms"] > 0 and row["agree"] == 1.0  # the same items as torch
    assert all(row["rows"] == row["users"] * 10 for row in report["features"])
    assert set(report["meets_targets"]) == {"retrieval_speedup", "retrieval_roofline_fraction"}


@pytest.mark.slow
def test_distillation_benchmark_compares_students_with_their_teacher(tmp_path):
    """--quick: three tiny models (MiniLM 6 layers vs its first 2) and the serving cost, teacher and student."""
    out = tmp_path / "distillation.json"
    report = _load("distillation").main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=float))
    models = report["models"]
    assert set(models) == {"teacher", "student_distilled", "student_plain"}
    assert models["teacher"]["size"]["backbone_layers"] == 6
    for name in ("student_distilled", "student_plain"):
        assert models[name]["size"]["backbone_layers"] == 2
        assert models[name]["size"]["embedding_dim"] < models["teacher"]["size"]["embedding_dim"]
        for metric in ("recall@20", "ndcg@20"):  # the ratios are computed from this run's own figures
            teacher = models["teacher"][metric]
            expected = models[name][metric] / teacher if teacher else None
            assert report["ratios"][name][metric] == pytest.approx(expected)
    serving = report["serving"]
    for kind in ("request", "recommend"):
        assert set(serving[kind]) == {"batch_1", "batch_8"}
        for batch, per_model in serving[kind].items():
            for stat in ("p50_ms", "p99_ms"):
                assert per_model["teacher"][stat] > 0 and per_model["student_distilled"][stat] > 0
                assert report["ratios"]["latency"][f"{kind}_{batch}_{stat}"] == pytest.approx(
                    per_model["student_distilled"][stat] / per_model["teacher"][stat])
    encoding = serving["item_encoding"]
    assert encoding["teacher"]["items_per_s"] > 0 and encoding["student_distilled"]["items_per_s"] > 0
    recall = report["targets"]["recall_at_20_ratio"]
    assert recall["met"] == (recall["value"] >= 0.95)
    assert report["targets"]["request_latency_p50_ratio"]["met"] == all(
        v <= 0.5 for v in report["targets"]["request_latency_p50_ratio"]["value"].values())
    # The student's training summary carries the teacher's own metrics beside its own.
    assert report["teacher_in_student_summary"]["metrics"]["recall@20"] == models["teacher"]["recall@20"]
