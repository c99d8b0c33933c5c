"""Fixtures of the ``real_node`` tests: a real kubelet + containerd node in the local cluster, and our images on it.

One node and one build of each image serve the whole session. The node joins the local control plane
of ``cluster`` (the ``conftest`` fixture), is tainted, and only namespaces from ``real_namespace``
(annotated for the apiserver's PodNodeSelector and PodTolerationRestriction) place pods on it, so the
kwok tests never see it. Images are built from the repository's Dockerfiles by
``images/build-local.sh`` (cached by content hash) and imported into the node's containerd; the
pods never reach a registry. Under ``RECOPS_REQUIRE_CLUSTER=1`` a missing tool or a failed build
fails the tests; elsewhere they skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from e2e_tests.localcluster import ClusterAccess, ClusterError
from e2e_tests.prerequisites import built_or_unavailable, unavailable, uncaptured
from e2e_tests.realnode import NAMESPACE_ANNOTATIONS, RealNode, binary_image, build_node_binaries

REPO = Path(__file__).resolve().parents[1]
BUILD_IMAGES = REPO / "images" / "build-local.sh"
# What the node and the image build run, besides the Go-built binaries (make system-deps installs them).
NODE_TOOLS = ("buildah", "mmdebstrap", "runc", "socat", "iptables", "nsenter")
REGISTRY = "ghcr.io/recops"


@dataclass
class NodeImages:
    """The repository's images, each built once (``images/build-local.sh``) and imported into the node."""

    node: RealNode
    config: pytest.Config
    version: str
    seconds: dict[str, float] = field(default_factory=dict)
    _refs: dict[str, str] = field(default_factory=dict)
    _archives: dict[str, Path] = field(default_factory=dict)

    def ensure(self, name: str) -> str:
        """The image reference of ``operator``, ``trainer`` or ``triton``, present on the node."""
        if name in self._refs:
            return self._refs[name]
        started = time.monotonic()
        with uncaptured(self.config):
            print(f"\nbuilding the {name} image (images/build-local.sh; cached by content hash)", file=sys.stderr)
            # Progress on stderr goes to the terminal; the archive's path is the last line of stdout.
            done = subprocess.run(["bash", str(BUILD_IMAGES), name], stdout=subprocess.PIPE, text=True,
                                  timeout=3600, check=False)
        if done.returncode != 0 or not done.stdout.strip():
            pytest.fail(f"images/build-local.sh {name} failed (exit {done.returncode}); its log is above",
                        pytrace=False)
        archive = Path(done.stdout.strip().splitlines()[-1])
        built = time.monotonic()
        self.node.import_image(archive)
        self.seconds[f"{name} build"] = built - started
        self.seconds[f"{name} import"] = time.monotonic() - built
        self._refs[name] = f"{REGISTRY}/{name}:{self.version}"
        self._archives[name] = archive
        return self._refs[name]

    def prometheus(self) -> str:
        """Debian's Prometheus (the binary the host tests run) on the operator image, present on the node.

        No registry serves prom/prometheus here; the binary links only libc, which the operator image has.
        """
        if "prometheus" in self._refs:
            return self._refs["prometheus"]
        self.ensure("operator")
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("the in-cluster Prometheus needs Debian's prometheus (make system-deps)", pytrace=False)
        started = time.monotonic()
        ref = f"{REGISTRY}/e2e-prometheus:{self.version}"
        archive = binary_image(Path(binary), ref, self.node.work_dir / "prometheus.oci.tar",
                               base=f"oci-archive:{self._archives['operator']}")
        self.node.import_image(archive)
        self.seconds["prometheus image"] = time.monotonic() - started
        self._refs["prometheus"] = ref
        return ref


@pytest.fixture(scope="session")
def real_node(cluster: ClusterAccess, request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    """A real node (kubelet, containerd, runc, CNI, kube-proxy, CoreDNS) in the local cluster, for the session."""
    if cluster.local is None:
        unavailable("the real node joins the local control plane; RECOPS_E2E_KUBECONFIG/KUBECONFIG name another")
    missing = [tool for tool in NODE_TOOLS if shutil.which(tool) is None]
    if missing:
        unavailable(f"the real node needs {', '.join(missing)} (make system-deps installs them)")
    if os.geteuid() != 0:
        unavailable("the real node needs root (network namespaces, cgroups, mounts)")
    node_bin = built_or_unavailable(request.config, build_node_binaries, "building the node's binaries failed")
    problem = ""
    node = RealNode(cluster.local, node_bin, tmp_path_factory.mktemp("real-node"))
    try:
        node.start()
    except ClusterError as exc:
        problem = str(exc)
    if problem:
        pytest.fail(f"the real node did not start (logs in {node.work_dir / 'logs'}):\n{problem}", pytrace=False)
    with uncaptured(request.config):
        timings = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in node.startup_seconds.items())
        print(f"\nreal node ready ({timings}); work dir {node.work_dir}", file=sys.stderr)
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def node_images(real_node: RealNode, request: pytest.FixtureRequest) -> Iterator[NodeImages]:
    version = next(line.split('"')[1] for line in (REPO / "src" / "recops" / "__init__.py").read_text().splitlines()
                   if line.startswith("__version__"))
    images = NodeImages(real_node, request.config, version)
    yield images
    if images.seconds:
        with uncaptured(request.config):
            print("\nimages: " + ", ".join(f"{k} {v:.1f}s" for k, v in images.seconds.items()), file=sys.stderr)


def annotate_for_real_node(cluster: ClusterAccess, name: str) -> None:
    """Create namespace ``name`` so that every pod in it is scheduled onto the real node."""
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "annotations": NAMESPACE_ANNOTATIONS}}))


@contextlib.contextmanager
def _fresh_namespace(cluster: ClusterAccess) -> Iterator[str]:
    name = f"real-{uuid.uuid4().hex[:8]}"
    annotate_for_real_node(cluster, name)
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def real_namespace(cluster: ClusterAccess, real_node: RealNode) -> Iterator[str]:
    """A fresh namespace whose pods run on the real node, deleted afterwards."""
    with _fresh_namespace(cluster) as name:
        yield name


@pytest.fixture(scope="module")
def real_module_namespace(cluster: ClusterAccess, real_node: RealNode) -> Iterator[str]:
    """As ``real_namespace``, shared by a module's tests (a chart and models they build on)."""
    with _fresh_namespace(cluster) as name:
        yield name
