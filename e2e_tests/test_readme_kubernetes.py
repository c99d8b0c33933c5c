"""The README's "Run it on Kubernetes" commands, run as written against the test cluster.

Two things are added around them, because the local control plane is not a full cluster: a
PersistentVolume for the README's claim to bind to (there is no storage provisioner), and short
operator timings in the environment (kwok's trainer pod writes no metrics; the operator waits
``RECOPS_METRICS_GRACE_SECONDS`` for them before deploying without).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml

from e2e_tests.recops_fixtures import REPO

SECTION = "## Run it on Kubernetes"


def readme_commands() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION):]
    return re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)


def test_the_readme_block_is_what_this_test_runs():
    commands = readme_commands()
    assert "kubectl apply --server-side -f crds/" in commands
    assert "recops operator --namespace shop" in commands
    assert "examples/recmodel-synthetic.yaml" in commands and "examples/recexperiment.yaml" in commands


def test_readme_kubernetes_commands(cluster, tmp_path: Path):
    volume = {
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "readme-artifacts"},
        "spec": {"capacity": {"storage": "50Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                 "hostPath": {"path": str(tmp_path / "artifacts")},
                 "claimRef": {"namespace": "shop", "name": "recops-artifacts"}},
    }
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(volume))
    script = tmp_path / "readme.sh"
    # The backgrounded operator is stopped when the script ends, as a user's Ctrl-C would.
    script.write_text("set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true; wait' EXIT\n" + readme_commands())
    kubectl_dir = str(Path(cluster.kubectl.executable).parent) if os.sep in cluster.kubectl.executable else ""
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "PATH": os.pathsep.join(p for p in (kubectl_dir, os.environ["PATH"]) if p),
        "RECOPS_METRICS_GRACE_SECONDS": "2",
        "RECOPS_RECONCILE_INTERVAL_SECONDS": "1",
    }
    try:
        done = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        models = done.stdout.split("\n")
        header = next(line for line in models if line.startswith("NAME") and "REVISION" in line).split()
        assert header == ["NAME", "PHASE", "REVISION", "RECALL", "ENDPOINT", "AGE"]
        assert any(line.startswith("shop-synthetic") and " Ready " in line for line in models), done.stdout
        # The experiment's models (ranker-v1, ranker-v2) do not exist here: it waits, saying for what.
        experiment = cluster.kubectl.json("get", "rexp", "ranker-v2-vs-v1", "-n", "shop")
        assert experiment["status"]["phase"] == "Pending"
        assert "control RecModel 'ranker-v1'" in experiment["status"]["message"]
        assert "Events:" in done.stdout  # kubectl describe
    finally:
        cluster.kubectl("delete", "namespace", "shop", "--wait=false", check=False)
        cluster.kubectl("delete", "pv", "readme-artifacts", "--wait=false", check=False)
