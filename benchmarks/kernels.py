"""Kernel benchmark: recops' CUDA kernels against plain torch, in the same run, on one GPU.

    python benchmarks/kernels.py --out results/kernels.json

For B in {1, 8, 64} users, N in {1 M, 10 M} items and d in {128, 768} (float16 by default):

- retrieval: ``recops.kernels.retrieve_topk`` (fused scores + top-k, the B x N scores never written)
  against torch's ``topk(users @ items.T * scale + bias)``: median milliseconds, the speed-up, and
  the achieved memory bandwidth (the index and bias read once, over the time) as a fraction of the
  GPU's roofline (its theoretical peak from the memory clock and bus width; a device-to-device copy is
  measured too, as the bandwidth reachable in practice);
- features: ``recops.kernels.head_features`` for the B x k retrieved pairs against torch's
  ``cat([u[rows], v[rows], u[rows] * v[rows]])``: milliseconds, speed-up and bandwidth.

Each configuration also records whether both returned the same items (``agree``: the fraction of
recops' top-k found in torch's). Targets from the kernels issue: retrieval >= 2x torch and >= 70% of
the roofline. Without a GPU the script stops, unless ``--allow-cpu`` (the torch reference against torch
at the sizes given: a smoke test of the script, not a measurement of the kernels).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from recops import kernels  # noqa: E402  (after the path, for a checkout without install)
from recops.kernels import cuda  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TARGET_SPEEDUP = 2.0
TARGET_ROOFLINE = 0.7


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def integers(text: str) -> list[int]:
    return [int(float(value)) for value in text.split(",")]


def timed(run: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``run`` (CUDA events on a GPU, wall clock on a CPU)."""
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            run()
            samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def peak_bandwidth_gbps(device: torch.device) -> float | None:
    """Theoretical memory bandwidth: memory clock (kHz) x 2 (double data rate) x bus width (bits) / 8."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8 / 1e9


def copy_bandwidth_gbps(device: torch.device, warmup: int, repeats: int) -> float:
    """What a plain device-to-device copy of 2 GiB reaches (bytes read + written over the time)."""
    size = 2 << 30 if device.type == "cuda" else 64 << 20
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    milliseconds = timed(lambda: target.copy_(source), device, warmup, repeats)
    return 2 * size / (milliseconds / 1000) / 1e9


def torch_retrieval(users, items, bias, scale, k):
    """What one writes without the kernel: the B x N scores, then top-k."""
    return torch.topk((users @ items.T).float() * scale + bias, k, dim=1)


def torch_features(users, items, user_rows, item_rows):
    u, v = users[user_rows], items[item_rows]
    return torch.cat([u, v, u * v], dim=1)


def measure(n_users: int, n_items: int, d: int, args: argparse.Namespace, device: torch.device,
            peak: float | None) -> tuple[dict, dict]:
    dtype = DTYPES[args.dtype]
    generator = torch.Generator(device=device).manual_seed(0)
    items = torch.randn(n_items, d, device=device, dtype=dtype, generator=generator)
    users = torch.randn(n_users, d, device=device, dtype=dtype, generator=generator)
    bias = torch.randn(n_items, device=device, generator=generator)
    scale, k = 1.0 / 0.07, args.k

    recops_ms = timed(lambda: kernels.retrieve_topk(users, items, k, bias=bias, scale=scale), device,
                      args.warmup, args.repeats)
    torch_ms = timed(lambda: torch_retrieval(users, items, bias, scale, k), device, args.warmup, args.repeats)
    ours = kernels.retrieve_topk(users, items, k, bias=bias, scale=scale)[1]
    theirs = torch_retrieval(users, items, bias, scale, k).indices
    agree = sum(len(set(a) & set(b)) for a, b in zip(ours.tolist(), theirs.tolist(), strict=True)) / ours.numel()
    index_bytes = n_items * (d * items.element_size() + 4)  # the index and the bias, read once
    retrieval = {
        "users": n_users, "items": n_items, "d": d, "k": k,
        "recops_ms": recops_ms, "torch_ms": torch_ms, "speedup": torch_ms / recops_ms,
        "achieved_gbps": index_bytes / (recops_ms / 1000) / 1e9,
        "torch_achieved_gbps": index_bytes / (torch_ms / 1000) / 1e9,
        "agree": agree,
    }
    if peak is not None:
        retrieval["roofline_fraction"] = retrieval["achieved_gbps"] / peak

    user_rows = torch.arange(n_users, device=device).repeat_interleave(k)
    item_rows = theirs.reshape(-1).contiguous()
    features_ms = timed(lambda: kernels.head_features(users, items, user_rows, item_rows), device,
                        args.warmup, args.repeats)
    torch_features_ms = timed(lambda: torch_features(users, items, user_rows, item_rows), device,
                              args.warmup, args.repeats)
    rows = n_users * k
    moved = rows * d * items.element_size() * (2 + 3) + 2 * rows * 8  # gather u and v, write 3 d, the indices
    features = {
        "users": n_users, "items": n_items, "d": d, "rows": rows,
        "recops_ms": features_ms, "torch_ms": torch_features_ms, "speedup": torch_features_ms / features_ms,
        "achieved_gbps": moved / (features_ms / 1000) / 1e9,
    }
    return retrieval, features


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "kernels.json")
    parser.add_argument("--batches", type=integers, default=[1, 8, 64], help="users per call (default 1,8,64)")
    parser.add_argument("--items", type=integers, default=[1_000_000, 10_000_000], help="index sizes (1e6,1e7)")
    parser.add_argument("--dims", type=integers, default=[128, 768], help="embedding widths (default 128,768)")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU (the torch reference) when no GPU")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.allow_cpu:
        parser.exit(2, "no CUDA GPU: this benchmark measures the CUDA kernels (--allow-cpu runs the reference)\n")
    if device.type == "cuda" and kernels.backend(device) != "cuda":
        parser.exit(2, f"the CUDA kernels are not available: {cuda.why_unavailable()}\n")
    peak = peak_bandwidth_gbps(device)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "kernels": cuda.describe() if device.type == "cuda" else "torch reference (CPU)",
        "dtype": args.dtype,
        "k": args.k,
        "peak_gbps": peak,
        "copy_gbps": copy_bandwidth_gbps(device, args.warmup, args.repeats),
        "targets": {"retrieval_speedup": TARGET_SPEEDUP, "retrieval_roofline_fraction": TARGET_ROOFLINE},
        "retrieval": [],
        "features": [],
    }
    log(f"{report['device']}: {report['kernels']}; peak {peak or 0:.0f} GB/s, copy {report['copy_gbps']:.0f} GB/s")
    for n_items in args.items:
        for d in args.dims:
            for n_users in args.batches:
                retrieval, features = measure(n_users, n_items, d, args, device, peak)
                report["retrieval"].append(retrieval)
                report["features"].append(features)
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # the last configuration's index is freed: room for the next
                log(f"B={n_users:<3} N={n_items:<9,} d={d:<4} retrieval {retrieval['recops_ms']:8.3f} ms "
                    f"(torch {retrieval['torch_ms']:8.3f}, x{retrieval['speedup']:.2f}, "
                    f"{retrieval['achieved_gbps']:.0f} GB/s, agree {retrieval['agree']:.3f}); features "
                    f"{features['recops_ms']:.3f} ms (torch {features['torch_ms']:.3f}, x{features['speedup']:.2f})")
    retrievals = report["retrieval"]
    report["meets_targets"] = {
        "retrieval_speedup": all(r["speedup"] >= TARGET_SPEEDUP for r in retrievals),
        "retrieval_roofline_fraction": peak is not None
        and all(r["roofline_fraction"] >= TARGET_ROOFLINE for r in retrievals),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
