"""Fixtures for the end-to-end tests: a Kubernetes cluster to run them against.

``cluster`` is, in order of preference:

1. the real cluster that ``RECOPS_E2E_KUBECONFIG`` (or else ``KUBECONFIG``) points at;
2. a local control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok)
   built from Go modules by ``cluster/build.sh`` (cached; the first build takes many minutes) and
   started on 127.0.0.1 for this session.

Without Go (or when the build fails) the tests skip, or fail under ``RECOPS_REQUIRE_CLUSTER=1``
as CI sets it, so that a missing toolchain never passes unnoticed there.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e_tests.ab import stack  # noqa: F401  (fixtures of the recops tests)
from e2e_tests.localcluster import ClusterAccess, ClusterError, Kubectl, LocalCluster, ensure_binaries
from e2e_tests.prerequisites import built_or_unavailable, unavailable, uncaptured
from e2e_tests.realnode_fixtures import node_images, real_module_namespace, real_namespace, real_node  # noqa: F401
from e2e_tests.recops_fixtures import apply_crds, artifacts, operator  # noqa: F401


def _external_cluster(kubeconfig_env: str, config: pytest.Config) -> ClusterAccess:
    if os.pathsep in kubeconfig_env:
        unavailable(f"KUBECONFIG lists several files ({kubeconfig_env}); set RECOPS_E2E_KUBECONFIG to one")
    kubeconfig = Path(kubeconfig_env).expanduser()
    if not kubeconfig.is_file():
        unavailable(f"the kubeconfig {kubeconfig} does not exist")
    kubectl = shutil.which("kubectl")
    bin_dir: Path | None = None
    if kubectl is None:
        # No kubectl on this machine: the local build provides one (instantly once cached).
        bin_dir = built_or_unavailable(config, ensure_binaries, "kubectl is not on PATH and building it failed")
        kubectl = str(bin_dir / "kubectl")
    return ClusterAccess(kubeconfig=kubeconfig, kubectl=Kubectl(kubeconfig, kubectl), bin_dir=bin_dir)


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterAccess]:
    """A Kubernetes cluster for the session: a real one from the environment, or a local one."""
    external = os.environ.get("RECOPS_E2E_KUBECONFIG") or os.environ.get("KUBECONFIG")
    if external:
        yield _external_cluster(external, request.config)
        return

    bin_dir = built_or_unavailable(
        request.config, ensure_binaries,
        "building the local control plane failed; it needs Go >= 1.26 on PATH and the Go module proxy "
        "(or set KUBECONFIG to a cluster)")
    # The failure is raised outside the `except` block, so that its report does not chain the
    # ClusterError's traceback: its message says all there is.
    problem = ""
    local = LocalCluster(bin_dir, tmp_path_factory.mktemp("cluster"))
    try:
        local.start()
    except ClusterError as exc:
        problem = str(exc)
    if problem:
        # The binaries are there, so a cluster that does not come up is a bug, not a missing tool.
        pytest.fail(f"the local cluster did not start (logs in {local.work_dir / 'logs'}):\n{problem}", pytrace=False)
    timings = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in local.startup_seconds.items())
    with uncaptured(request.config):
        print(f"\nlocal cluster at {local.server} ready ({timings}); work dir {local.work_dir}", file=sys.stderr)
    try:
        yield ClusterAccess(kubeconfig=local.kubeconfig, kubectl=local.kubectl, bin_dir=bin_dir, local=local)
    finally:
        local.stop()


@pytest.fixture
def namespace(cluster: ClusterAccess) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards (without waiting for it to go)."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
