"""The Helm release the tests install, and its operator run as a local process.

kwok runs no containers, so the operator the chart deploys runs here as a process: with the exact
arguments and environment of the chart's Deployment (ports aside) and a token of the chart's
ServiceAccount, so that a verb missing from the chart's RBAC fails the tests that use it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from e2e_tests.recops_fixtures import FAST, REPO

CHART = REPO / "helm" / "recops"
RELEASE, RELEASE_NAMESPACE = "recops", "recops-system"


def helm(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    binary = str(cluster.bin_dir / "helm") if cluster.bin_dir else "helm"
    done = subprocess.run([binary, f"--kubeconfig={cluster.kubeconfig}", *args], capture_output=True, text=True,
                          timeout=180)
    if check and done.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


def chart_objects(cluster) -> list[dict]:
    manifest = helm(cluster, "get", "manifest", RELEASE, "-n", RELEASE_NAMESPACE).stdout
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


class ChartOperator:
    """The chart's operator Deployment, run as a local process with its ServiceAccount's token."""

    def __init__(self, cluster, log: Path) -> None:
        deployment = next(o for o in chart_objects(cluster) if o["kind"] == "Deployment")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        self.args = [a for a in container["args"] if not a.startswith(("--liveness-port", "--metrics-port"))]
        self.env = {e["name"]: e["value"] for e in container["env"] if e["name"] != "HOME"}
        account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        self.kubeconfig = cluster.local.service_account_kubeconfig(RELEASE_NAMESPACE, account)
        self.log = log
        self.process: subprocess.Popen | None = None

    def start(self) -> ChartOperator:
        env = {**os.environ, **self.env, **{k: v for k, v in FAST.items() if "IMAGE" not in k},
               "KUBECONFIG": str(self.kubeconfig)}
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "recops", *self.args, "--liveness-port", "0", "--metrics-port", "0"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def forbidden(self) -> list[str]:
        # kopf logs APIForbiddenError; the kubernetes client's ApiException says "(403) Reason: Forbidden".
        return [line for line in self.log.read_text().splitlines() if "Forbidden" in line]
