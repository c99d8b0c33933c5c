"""The README's "Run it on Kubernetes" commands, run as written against the test cluster.

What the local control plane lacks is supplied around them, and only that: a PersistentVolume for
the README's claim to bind to (there is no storage provisioner), and, because kwok runs no
containers, the operator of the chart the README installs runs as a local process with the chart's
arguments and ServiceAccount (started right after `helm install`, stopped after `helm uninstall`).
Short operator timings are set so that kwok's trainer pod, which writes no metrics, is not waited
for long.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from e2e_tests.chart import ChartOperator
from e2e_tests.recops_fixtures import REPO

SECTION = "## Run it on Kubernetes"


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION):]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_the_readme_installs_with_helm_and_uses_the_examples():
    commands = "\n".join(readme_commands())
    assert "helm install recops helm/recops" in commands and "helm uninstall recops" in commands
    assert "examples/recmodel-synthetic.yaml" in commands and "examples/recexperiment.yaml" in commands
    assert "examples/recmodel-retrain.yaml" in commands and "--from=cronjob/shop-live-retrain" in commands


def test_readme_kubernetes_commands(cluster, apply_crds, tmp_path: Path):
    if cluster.local is None:
        pytest.skip("runs the chart's operator with a ServiceAccount token made by the local control plane")
    volume = {
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "readme-artifacts"},
        "spec": {"capacity": {"storage": "50Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                 "hostPath": {"path": str(tmp_path / "artifacts")},
                 "claimRef": {"namespace": "shop", "name": "recops-artifacts"}},
    }
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(volume))
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "PATH": os.pathsep.join([str(cluster.bin_dir), os.environ["PATH"]]),  # kubectl and helm of the cluster
    }
    outputs: list[str] = []
    operator: ChartOperator | None = None
    try:
        for command in readme_commands():
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
            outputs.append(done.stdout)
            if command.startswith("helm install"):
                operator = ChartOperator(cluster, tmp_path / "operator.log").start()
            if command.startswith("helm uninstall") and operator is not None:
                operator.stop()
        text = "\n".join(outputs)
        header = next(line for line in text.splitlines() if line.startswith("NAME") and "REVISION" in line).split()
        assert header == ["NAME", "PHASE", "REVISION", "RECALL", "ENDPOINT", "AGE"]
        assert any(line.startswith("shop-synthetic") and " Ready " in line for line in text.splitlines()), text
        # The experiment's models (ranker-v1, ranker-v2) do not exist here: it waits, saying for what.
        experiment = cluster.kubectl.json("get", "rexp", "ranker-v2-vs-v1", "-n", "shop")
        assert experiment["status"]["phase"] == "Pending"
        assert "control RecModel 'ranker-v1'" in experiment["status"]["message"]
        assert "Events:" in text  # kubectl describe
        # Continuous learning: the CronJob the operator made (with the chart's RBAC) started a retrain Job.
        job = cluster.kubectl.json("get", "job", "shop-live-retrain-now", "-n", "shop")
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["args"][0] == "retrain" and "--min-new-events" in container["args"]
        assert job["metadata"]["labels"]["recops.dev/retrain-of"] == "shop-live"
        # After the uninstall: the CRDs and the user's resources are still there.
        assert cluster.kubectl.json("get", "rm", "shop-synthetic", "-n", "shop")["status"]["phase"] == "Ready"
        assert cluster.kubectl("get", "deployment", "recops", "-n", "recops-system", check=False).returncode != 0
    finally:
        if operator is not None:
            operator.stop()
        subprocess.run([str(cluster.bin_dir / "helm"), f"--kubeconfig={cluster.kubeconfig}", "uninstall", "recops",
                        "-n", "recops-system"], capture_output=True, check=False)
        cluster.kubectl("delete", "namespace", "shop", "--wait=false", check=False)
        cluster.kubectl("delete", "pv", "readme-artifacts", "--wait=false", check=False)
