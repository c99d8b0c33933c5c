"""Fixtures for the recops end-to-end tests: the CRDs installed, an artifact volume, the operator.

The operator runs as a real ``recops operator`` process (kopf) against the cluster; tests kill and
restart it. kwok runs no containers, so what a container would do (the trainer's termination
message, the router serving) the tests do themselves, and say so where they do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e_tests.localcluster import ClusterAccess

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO / "crds"
FAST = {
    # Short timings so a lifecycle takes seconds: look at children every second, wait briefly for
    # metrics, and treat a router config as live two seconds after it is written (the tests' router
    # reloads within one).
    "RECOPS_RECONCILE_INTERVAL_SECONDS": "1",
    "RECOPS_METRICS_GRACE_SECONDS": "30",
    "RECOPS_ROUTER_SETTLE_SECONDS": "2",
    "RECOPS_TRAINER_IMAGE": "ghcr.io/recops/trainer:e2e",
    "RECOPS_TRITON_IMAGE": "ghcr.io/recops/triton:e2e",
    "RECOPS_ROUTER_IMAGE": "ghcr.io/recops/operator:e2e",
}


MODEL = {
    "apiVersion": "recops.dev/v1alpha1",
    "kind": "RecModel",
    "metadata": {"name": "ranker"},
    "spec": {
        "data": {"source": "synthetic", "synthetic": {"users": 500, "items": 300}},
        "backbone": {"name": "builtin:tiny-qwen2"},
        "training": {"epochs": 3, "resources": {"cpu": "2", "memory": "4Gi", "gpu": 1}},
        "serving": {"replicas": 1, "resources": {"cpu": "1", "memory": "2Gi"}},
    },
}
"""The RecModel the operator tests apply (kwok runs its pods, so its size does not matter)."""
METRICS = {"recall@10": 0.2, "recall@20": 0.31, "ndcg@10": 0.11, "train_seconds": 42.0}
"""What the fake trainer reports (the tests write it where the kubelet would)."""


def get(cluster: ClusterAccess, kind: str, name: str, namespace: str) -> dict:
    return cluster.kubectl.json("get", kind, name, "-n", namespace)


def model_status(cluster: ClusterAccess, namespace: str, name: str = "ranker") -> dict:
    return get(cluster, "recmodel", name, namespace).get("status") or {}


def write_termination_message(cluster: ClusterAccess, namespace: str, job: str, metrics: dict,
                              message: dict | None = None) -> None:
    """What the kubelet does when the trainer exits: copy /dev/termination-log into the pod status
    (``{"metrics": metrics}``, as ``recops train`` writes it, or ``message`` as given)."""
    pods = cluster.kubectl.json("get", "pods", "-n", namespace, "-l", f"batch.kubernetes.io/job-name={job}")["items"]
    assert pods, f"no pod for Job {job}"
    patch = [
        {
            "op": "add",
            "path": "/status/containerStatuses/0/state/terminated/message",
            "value": json.dumps({"metrics": metrics} if message is None else message),
        }
    ]
    cluster.kubectl(
        "patch",
        "pod",
        pods[0]["metadata"]["name"],
        "-n",
        namespace,
        "--subresource=status",
        "--type=json",
        "-p",
        json.dumps(patch),
    )


def patch_spec(cluster: ClusterAccess, namespace: str, name: str, change: dict, kind: str = "rm") -> None:
    """``kubectl patch --type=merge`` of a resource's spec, as a user changes it."""
    cluster.kubectl("patch", kind, name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": change}))


def job_succeeded(cluster: ClusterAccess, namespace: str, job: str) -> bool:
    status = get(cluster, "job", job, namespace).get("status") or {}
    return any(c["type"] == "Complete" and c["status"] == "True" for c in status.get("conditions", []))


def train_to_ready(cluster: ClusterAccess, namespace: str, name: str = "ranker", metrics: dict | None = None) -> dict:
    """Drive an applied RecModel to Ready (kwok runs the pods; the test writes the trainer's message)."""
    job = wait_for(lambda: model_status(cluster, namespace, name).get("trainingJob"), "the Job in the status")
    wait_for(lambda: job_succeeded(cluster, namespace, job), f"Job {job} to succeed (kwok completes its pod)")
    write_termination_message(cluster, namespace, job, METRICS if metrics is None else metrics)
    return wait_for(
        lambda: (s := model_status(cluster, namespace, name)).get("phase") == "Ready" and s,
        f"RecModel {name} to be Ready",
        timeout=90,
    )


@pytest.fixture(scope="session")
def apply_crds(cluster: ClusterAccess) -> None:
    """The committed CRDs, applied and Established."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
    for path in sorted(CRDS.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            name = document["metadata"]["name"]
            cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")


def bind_artifact_claim(cluster: ClusterAccess, namespace: str, folder: Path) -> str:
    """The ``recops-artifacts`` claim of ``namespace``, bound to a hostPath volume on ``folder``; returns the
    volume's name (the caller deletes it)."""
    volume = f"{namespace}-artifacts"
    manifests = [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteMany"],
                "storageClassName": volume,
                "hostPath": {"path": str(folder)},
                "persistentVolumeReclaimPolicy": "Delete",
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "recops-artifacts", "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": volume,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    ]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(manifests))
    wait_for(
        lambda: (
            cluster.kubectl.json("get", "pvc", "recops-artifacts", "-n", namespace)["status"].get("phase") == "Bound"
        ),
        "the artifact claim to be bound",
        timeout=60,
    )
    return volume


@pytest.fixture
def artifacts(cluster: ClusterAccess, namespace: str, tmp_path: Path) -> Iterator[str]:
    """The ``recops-artifacts`` claim the operator's pods mount, bound to a hostPath volume."""
    volume = bind_artifact_claim(cluster, namespace, tmp_path / "artifacts")
    yield "recops-artifacts"
    cluster.kubectl("delete", "pv", volume, "--wait=false", check=False)


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 60, interval: float = 0.3) -> Any:
    """Poll until ``predicate()`` is truthy; returns its value. Fails naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (KeyError, IndexError, TypeError, subprocess.CalledProcessError) as error:  # not there yet
            last_error, value = error, None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last_error!r})" if last_error else "")
    )


class OperatorProcess:
    """``recops operator`` as a child process: started, killed (SIGKILL, as a node loss would) and restarted."""

    def __init__(self, kubeconfig: Path, namespace: str, log: Path, env: dict[str, str] | None = None,
                 peering_priority: int | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log = log
        # None: --standalone (one replica); a number: kopf peering with this priority.
        self.peering = [] if peering_priority is None else ["--no-standalone", "--priority", str(peering_priority)]
        self.env = {**os.environ, **FAST, **(env or {}), "KUBECONFIG": str(kubeconfig)}
        self.process: subprocess.Popen | None = None
        self.starts = 0
        from recops.serving.processes import free_port

        self.metrics_port = free_port()

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> OperatorProcess:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.starts += 1
        with self.log.open("a") as log:
            log.write(f"\n===== start {self.starts} =====\n")
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "recops", "operator", "--namespace", self.namespace, "--liveness-port", "0",
                 "--metrics-port", str(self.metrics_port), *(self.peering or ["--standalone"])],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        return self

    def kill(self) -> None:
        """SIGKILL: no clean-up, no final patch (the worst moment for state to be lost)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"the operator exited:\n{self.tail()}")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


@pytest.fixture
def operator(cluster: ClusterAccess, apply_crds: None, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    """A running operator watching the test's namespace."""
    process = OperatorProcess(cluster.kubeconfig, namespace, tmp_path / "operator.log").start()
    try:
        yield process
    finally:
        process.stop()
