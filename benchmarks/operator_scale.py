"""Operator scale benchmark: how fast RecModels get their training Job, and what the operator costs.

    python benchmarks/operator_scale.py --models 100 --out results/operator.json

Against the local control plane (``e2e_tests/cluster/build.sh``, cached; or ``--kubeconfig``), a
real ``recops operator`` process watches a fresh namespace; ``--models`` RecModels are created in
a burst from a thread while a watch records when each one's Job appears. Reported: p50/p99/max
seconds from the create call returning to the Job's ADDED event, the operator's peak and final
RSS (its process tree) and CPU seconds. Baselines, measured in the same run: a minimal kopf
operator whose only handler creates the same ConfigMap and Job (the framework's floor: the ratio
is what recops's reconciler, status and events cost), and Jobs created directly through the API
(the watch's own delay).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL_SPEC = {"data": {"source": "synthetic"}, "backbone": {"name": "builtin:tiny-qwen2"}}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(latencies: list[float]) -> dict[str, float]:
    return {"n": len(latencies), "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99),
            "max_s": max(latencies), "mean_s": statistics.fmean(latencies)}


def watch_jobs(api: Any, namespace: str, seen: dict[str, float], expected: int, stop: threading.Event,
               key: str) -> None:
    """Record the monotonic time each Job with label ``key`` is first seen (ADDED)."""
    from kubernetes import client, watch

    batch = client.BatchV1Api(api)
    while not stop.is_set() and len(seen) < expected:
        stream = watch.Watch()
        for event in stream.stream(batch.list_namespaced_job, namespace, timeout_seconds=5,
                                   label_selector=key):
            name = event["object"].metadata.labels.get(key)
            if name and name not in seen:
                seen[name] = time.monotonic()
            if len(seen) >= expected or stop.is_set():
                stream.stop()
                break


def burst(create: Any, names: list[str], started: dict[str, float]) -> None:
    for name in names:
        create(name)
        started[name] = time.monotonic()


def measure(api: Any, namespace: str, names: list[str], create: Any, key: str, timeout: float) -> list[float]:
    seen: dict[str, float] = {}
    started: dict[str, float] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=watch_jobs, args=(api, namespace, seen, len(names), stop, key), daemon=True)
    watcher.start()
    time.sleep(1.0)  # the watch is open before the first create
    burst(create, names, started)
    deadline = time.monotonic() + timeout
    while len(seen) < len(names) and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    missing = [name for name in names if name not in seen]
    if missing:
        raise SystemExit(f"{len(missing)} of {len(names)} Jobs never appeared within {timeout:.0f}s: {missing[:5]}")
    return [max(0.0, seen[name] - started[name]) for name in names]


def install_crds(api: Any, client: Any) -> None:
    """The committed CRDs, created (or left as they are) and Established."""
    extensions = client.ApiextensionsV1Api(api)
    paths = sorted((REPO / "crds").glob("*.yaml"))
    for body in (document for path in paths for document in yaml.safe_load_all(path.read_text())):
        try:
            extensions.create_custom_resource_definition(body)
        except client.ApiException as error:
            if error.status != 409:
                raise
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            conditions = extensions.read_custom_resource_definition(body["metadata"]["name"]).status.conditions or []
            if any(c.type == "Established" and c.status == "True" for c in conditions):
                break
            time.sleep(0.2)


MINIMAL_OPERATOR = """
import kopf
from kubernetes import client, config

config.load_kube_config()
CORE, BATCH = client.CoreV1Api(), client.BatchV1Api()


@kopf.on.create("recops.dev", "v1alpha1", "recmodels")
def create(name, namespace, **_):
    CORE.create_namespaced_config_map(namespace, {"metadata": {"name": f"{name}-train"}, "data": {"spec": "x"}})
    BATCH.create_namespaced_job(namespace, {
        "metadata": {"name": f"{name}-train", "labels": {"bench/kopf": name}},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}},
    })
"""


def measure_operator(command: list[str], label: str, api: Any, custom: Any, namespace: str, names: list[str],
                     job_label: str, kubeconfig: Path, tmp: Path, timeout: float) -> dict[str, float]:
    """Start an operator process, create the RecModels in a burst, time their Jobs, sample its RSS."""
    log(f"starting {label}")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    with (tmp / f"{label.replace(' ', '-')}.log").open("w") as operator_log:
        operator = subprocess.Popen(command, stdout=operator_log, stderr=subprocess.STDOUT, env=env)
        process = psutil.Process(operator.pid)
        peak = {"rss": 0}
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.2):
                peak["rss"] = max(peak["rss"], tree_rss(process))

        threading.Thread(target=sample, daemon=True).start()
        try:
            time.sleep(5)  # kopf's start-up: watches established
            idle_rss = tree_rss(process)

            def create_model(name: str) -> None:
                custom.create_namespaced_custom_object("recops.dev", "v1alpha1", namespace, "recmodels", {
                    "apiVersion": "recops.dev/v1alpha1", "kind": "RecModel", "metadata": {"name": name},
                    "spec": MODEL_SPEC,
                })

            log(f"{label}: {len(names)} RecModels created in a burst")
            cpu_before = sum(process.cpu_times()[:2])
            latencies = measure(api, namespace, names, create_model, job_label, timeout)
            time.sleep(3)
            cpu = sum(process.cpu_times()[:2]) - cpu_before
            final_rss = tree_rss(process)
        finally:
            sampling.set()
            operator.terminate()
            operator.wait(timeout=30)
    result = {**summary(latencies), "rss_idle_mb": idle_rss / 2**20, "rss_peak_mb": peak["rss"] / 2**20,
              "rss_final_mb": final_rss / 2**20, "cpu_seconds": cpu}
    log(f"{label}: p50 {result['p50_s']:.3f}s p99 {result['p99_s']:.3f}s, RSS peak {result['rss_peak_mb']:.0f} MB")
    return result


def tree_rss(process: psutil.Process) -> int:
    try:
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "operator.json")
    parser.add_argument("--kubeconfig", type=Path, help="A cluster to use instead of the local control plane.")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    if args.models < 1:
        parser.error("--models must be at least 1")

    from e2e_tests.localcluster import LocalCluster, ensure_binaries
    from kubernetes import client, config

    with tempfile.TemporaryDirectory(prefix="recops-operator-bench-") as tmp:
        local = None
        kubeconfig = args.kubeconfig
        if kubeconfig is None:
            log("starting the local control plane")
            local = LocalCluster(ensure_binaries(), Path(tmp) / "cluster").start()
            kubeconfig = local.kubeconfig
        try:
            return run(args, kubeconfig, Path(tmp), client, config)
        finally:
            if local is not None:
                local.stop()


def run(args: argparse.Namespace, kubeconfig: Path, tmp: Path, client: Any, config: Any) -> dict[str, Any]:
    api = config.new_client_from_config(str(kubeconfig))
    core, custom, batch = client.CoreV1Api(api), client.CustomObjectsApi(api), client.BatchV1Api(api)
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": namespace}})
    install_crds(api, client)

    # Baseline: Jobs created directly, the API round trip any controller's create rides on.
    def create_job(name: str) -> None:
        batch.create_namespaced_job(namespace, {
            "metadata": {"name": f"direct-{name}", "labels": {"bench/direct": name}},
            "spec": {"template": {"spec": {"restartPolicy": "Never",
                                           "containers": [{"name": "c", "image": "busybox"}]}}},
        })

    names = [f"m{i:04d}" for i in range(args.models)]
    log(f"baseline: {args.models} Jobs created directly")
    direct = measure(api, namespace, names, create_job, "bench/direct", args.timeout)

    recops = measure_operator(
        [sys.executable, "-m", "recops", "operator", "--standalone", "--namespace", namespace, "--liveness-port", "0",
         "--metrics-port", "0"],
        "recops operator", api, custom, namespace, names, "recops.dev/recmodel", kubeconfig, tmp, args.timeout,
    )
    # The framework's floor: kopf with one create handler that makes the same ConfigMap and Job.
    floor_namespace = f"{namespace}-kopf"
    core.create_namespace({"metadata": {"name": floor_namespace}})
    script = tmp / "minimal_operator.py"
    script.write_text(MINIMAL_OPERATOR)
    minimal = measure_operator(
        [sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", floor_namespace, str(script)],
        "minimal kopf operator", api, custom, floor_namespace, names, "bench/kopf", kubeconfig, tmp, args.timeout,
    )
    for name in (namespace, floor_namespace):
        core.delete_namespace(name)

    report = {
        "models": args.models,
        "operator": recops,
        "minimal_kopf_operator": minimal,
        "direct_api": summary(direct),
        "ratio_p50_recops_over_minimal_kopf": recops["p50_s"] / max(minimal["p50_s"], 1e-6),
        "ratio_p99_recops_over_minimal_kopf": recops["p99_s"] / max(minimal["p99_s"], 1e-6),
        "targets": {"p99_s": 2.0, "rss_mb": 200.0},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"written to {args.out}")
    return report


if __name__ == "__main__":
    main()
