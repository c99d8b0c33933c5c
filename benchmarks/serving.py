"""Serving benchmark: Triton direct vs through the router, closed loop and at a fixed rate.

    python benchmarks/serving.py --concurrency 50,200,1000 --rate 1000 --duration 30 --out results/serving.json

Starts a real Triton (nvidia-pytriton's tritonserver) with the repository of a tiny exported
model (trained here unless ``--model`` names one) and the router (``recops serve router``, a
separate process, two arms 50/50 on that Triton), then drives both from compiled load
generators in their own processes (see ``loadgen.py``): wrk for closed-loop saturation at
each concurrency, vegeta for an open loop at ``--rate``. Reports qps, p50/p99 and error rate
for each, the router's CPU time per request and its peak RSS, and feedback events accepted
versus found in the feedback log after the router's clean shutdown. All on one machine:
the figures are ratios against Triton direct, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import Target, run_vegeta, run_wrk
from recops.serving.router.process import RouterProcess

TINY_SPEC = {
    "data": {"source": "synthetic", "synthetic": {"users": 300, "items": 200, "days": 10, "seed": 4}},
    "backbone": {"name": "builtin:tiny-qwen2", "maxSeqLength": 16},
    "lora": {"r": 4, "alpha": 8},
    "training": {"epochs": 1, "batchSize": 128, "embeddingDim": 32, "textItemsPerStep": 8},
    "serving": {"maxBatchSize": 64, "maxQueueDelayMicroseconds": 1000},
}
K = 10


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def train_tiny_model(folder: Path) -> Path:
    """A tiny two-tower model, trained for one epoch and exported (seconds on CPU)."""
    from recops.api.recmodel import RecModelSpec
    from recops.data.prepare import prepare
    from recops.training.export import export_model
    from recops.training.trainer import train

    spec = RecModelSpec.model_validate(TINY_SPEC)
    data = prepare(spec.data)
    result = train(spec, data, folder / "checkpoints")
    return export_model(result.model, spec, data, folder / "model")


def request_bodies(item_ids: list[str], users: int = 200) -> tuple[list[str], list[str]]:
    """The same simulated users as KServe-v2 bodies (Triton direct) and router bodies."""
    direct, routed = [], []
    for user in range(users):
        start = (user * 7) % max(len(item_ids) - 8, 1)
        history = item_ids[start : start + 1 + user % 8]
        direct.append(json.dumps({"inputs": [
            {"name": "USER_ID", "shape": [1, 1], "datatype": "BYTES", "data": [f"U{user}"]},
            {"name": "HISTORY", "shape": [1, len(history)], "datatype": "BYTES", "data": history},
            {"name": "K", "shape": [1, 1], "datatype": "INT32", "data": [K]},
        ]}))
        routed.append(json.dumps({"user_id": f"U{user}", "history": history, "k": K}))
    return direct, routed


def send_feedback(url: str, item_ids: list[str], events: int, concurrency: int = 50) -> int:
    """Send ``events`` clicks/likes/purchases one request each; returns how many the router accepted."""
    import httpx

    kinds = ["click", "like", "cart", "purchase"]

    async def run() -> int:
        accepted = 0
        semaphore = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def one(i: int) -> None:
                nonlocal accepted
                event = {"user_id": f"U{i % 200}", "item_id": item_ids[i % len(item_ids)], "event": kinds[i % 4]}
                if event["event"] == "purchase":
                    event["value"] = 10.0 + i % 7
                async with semaphore:
                    response = await client.post("/v1/feedback", json=event)
                accepted += response.status_code == 202

            await asyncio.gather(*(one(i) for i in range(events)))
        return accepted

    return asyncio.run(run())


def logged_events(folder: Path) -> dict[str, int]:
    """Events per type in every feedback log file under ``folder`` (rotated ones included)."""
    counts: dict[str, int] = {}
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                event = json.loads(line)["event"]
                counts[event] = counts.get(event, 0) + 1
    return counts


def closed_loop(target: Target, concurrency: int, duration: float, router: RouterProcess | None) -> dict:
    stop = threading.Event()
    sampler = None
    if router is not None:
        sampler = threading.Thread(target=router.sample_rss, args=(stop,), daemon=True)
        sampler.start()
        cpu_before = router.cpu_seconds()
    result = run_wrk(target, concurrency, duration)
    if router is not None:
        result["router_cpu_s"] = router.cpu_seconds() - cpu_before
        stop.set()
        sampler.join()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="50,200,1000", help="Comma-separated wrk connection counts.")
    parser.add_argument("--rate", type=int, default=1000, help="Open-loop requests per second (vegeta; 0: skip).")
    parser.add_argument("--duration", type=float, default=30, help="Seconds per measurement.")
    parser.add_argument("--model", type=Path, help="Exported model directory (default: train a tiny one).")
    parser.add_argument("--batch-rows", type=int, default=32, help="Router → Triton micro-batching rows (1: off).")
    parser.add_argument("--feedback-events", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=Path("results/serving.json"))
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1:
        parser.error("--concurrency: give positive integers, e.g. 50,200,1000")

    from recops.serving.repository import build_repository
    from recops.serving.router.process import RouterProcessError
    from recops.serving.triton_server import TritonServer, free_port

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="recops-bench-") as scratch, ExitStack() as stack:
        work = Path(scratch)
        if args.model is None:
            log("training a tiny model")
            model_dir = train_tiny_model(work)
        else:
            model_dir = args.model
        repo = build_repository(model_dir, work / "repo")
        triton = stack.enter_context(TritonServer(repo))
        log(f"triton ready on {triton.http_url} (http) / {triton.grpc_url} (grpc)")
        import polars as pl

        item_ids = pl.read_parquet(model_dir / "items.parquet")["item_id"].to_list()
        upstream = {"url": triton.grpc_url, "batchRows": args.batch_rows, "timeoutSeconds": 10}
        config = {
            "experiment": "bench",
            "salt": "bench",
            "arms": [{"name": "treatment", "weightBp": 5000, "triton": upstream},
                     {"name": "control", "weightBp": 5000, "triton": upstream}],
            "limits": {"maxK": 100, "maxInFlight": 100_000, "upstreamTimeoutSeconds": 10},
            "feedback": {"path": str(work / "feedback" / "feedback.jsonl"), "fsync": "interval"},
        }
        (work / "router.yaml").write_text(yaml.safe_dump(config))
        router = RouterProcess(work / "router.yaml", free_port(), work / "router.log")
        stack.callback(router.stop)
        try:
            router.wait_ready()
        except RouterProcessError as error:
            raise SystemExit(str(error)) from None
        log(f"router ready on {router.url}")
        direct_bodies, router_bodies = request_bodies(item_ids)
        direct = Target(f"http://{triton.http_url}/v2/models/recops_ensemble/infer", direct_bodies)
        routed = Target(f"{router.url}/v1/recommend", router_bodies)
        warm_up = min(3.0, args.duration)
        run_wrk(direct, 50, warm_up)  # warm-up: python stubs, torch, connection pools
        run_wrk(routed, 50, warm_up)

        report_levels, router_cpu, router_requests = [], 0.0, 0
        for concurrency in levels:
            log(f"closed loop at {concurrency} connections: direct")
            d = closed_loop(direct, concurrency, args.duration, None)
            log(f"  direct {d['qps']:.0f} qps p50 {d['p50_ms']:.1f} ms p99 {d['p99_ms']:.1f} ms; router")
            r = closed_loop(routed, concurrency, args.duration, router)
            log(f"  router {r['qps']:.0f} qps p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms")
            router_cpu += r.pop("router_cpu_s")
            router_requests += r["requests"]
            report_levels.append({"concurrency": concurrency, "direct": d, "router": r})
        fixed = None
        if args.rate > 0:
            log(f"open loop at {args.rate} req/s")
            fixed = {"rps": args.rate, "direct": run_vegeta(direct, args.rate, args.duration),
                     "router": run_vegeta(routed, args.rate, args.duration)}
        log(f"sending {args.feedback_events} feedback events")
        accepted = send_feedback(router.url, item_ids, args.feedback_events)
        rss = router.peak_rss_mb
        exit_code = router.stop()
        logged = logged_events(work / "feedback")
        report = {
            "levels": report_levels,
            "fixed_rate": fixed,
            "router_cpu_us_per_request": 1e6 * router_cpu / max(router_requests, 1),
            "router_rss_mb": rss,
            "feedback": {"sent": accepted, "logged": sum(n for e, n in logged.items() if e != "impression"),
                         "impressions_logged": logged.get("impression", 0), "router_exit_code": exit_code},
            "batch_rows": args.batch_rows,
            "duration_s": args.duration,
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "seconds": time.perf_counter() - started,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_summary(report)
    log(f"wrote {args.out}")
    return report


def print_summary(report: dict) -> None:
    print(f"{'conc':>6} {'direct qps':>11} {'router qps':>11} {'ratio':>6} {'d p99':>8} {'r p99':>8} {'r err':>7}")
    for level in report["levels"]:
        d, r = level["direct"], level["router"]
        print(f"{level['concurrency']:>6} {d['qps']:>11.0f} {r['qps']:>11.0f} {r['qps'] / d['qps']:>6.2f} "
              f"{d['p99_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['error_rate']:>7.4f}")
    fixed = report["fixed_rate"]
    if fixed:
        d, r = fixed["direct"], fixed["router"]
        print(f"at {fixed['rps']} req/s: direct p50 {d['p50_ms']:.2f} / p99 {d['p99_ms']:.2f} ms,"
              f" router p50 {r['p50_ms']:.2f} / p99 {r['p99_ms']:.2f} ms")
    print(f"router: {report['router_cpu_us_per_request']:.0f} µs CPU per request, peak RSS "
          f"{report['router_rss_mb']:.0f} MB; feedback sent {report['feedback']['sent']}, "
          f"logged {report['feedback']['logged']}")


if __name__ == "__main__":
    main()
