"""A real Kubernetes control plane on 127.0.0.1 for end-to-end tests, with kwok for fake nodes.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler are the real programs, built from
their Go modules by ``cluster/build.sh`` (:func:`ensure_binaries`); kwok plays the kubelet for fake
nodes, so pods are scheduled, turn Running and Ready, and Jobs' pods complete, without containers.

    bin_dir = ensure_binaries()
    with LocalCluster(bin_dir, work_dir) as cluster:
        cluster.kubectl("get", "nodes")

Every process listens on loopback ports picked at start, logs to a file in the work dir, and dies
with the process that started it (``die_with_parent``), so a killed test run leaves nothing behind.
"""

from __future__ import annotations

import collections
import json
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

from recops.serving.processes import die_with_parent, free_port

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "cluster" / "build.sh"
STAGES_FILE = HERE / "cluster" / "kwok-stages.yaml"

ADMIN_USER = "admin"
FAKE_NODE = "kwok-node-0"
# What the fake node offers: enough for the operator's workloads, including GPU requests, which
# only need the extended resource to be advertised for the scheduler to place them.
FAKE_NODE_CAPACITY = {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "8"}

T = TypeVar("T")


class ClusterError(RuntimeError):
    """The local cluster could not be built, started or reached."""


class KubectlError(subprocess.CalledProcessError):
    """A kubectl command failed; unlike its base class, its message carries kubectl's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr or ''}".rstrip()


def ensure_binaries(script: Path = BUILD_SCRIPT, *, stream: IO[str] | None = None) -> Path:
    """Build (or find cached) the cluster binaries with ``build.sh`` and return their bin dir.

    The script's progress goes to ``stream`` (stderr by default) line by line as it comes, since a
    cold build takes many minutes; a warm start returns in well under a second.
    Raises :class:`ClusterError` with the script's last lines when it fails (no Go, a module
    missing from the proxy, a compile error).
    """
    out = stream if stream is not None else sys.stderr
    tail: collections.deque[str] = collections.deque(maxlen=25)
    with subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None and proc.stdout is not None
        for line in proc.stderr:
            out.write(line)
            out.flush()
            tail.append(line)
        stdout = proc.stdout.read()
        returncode = proc.wait()
    lines = stdout.strip().splitlines()
    if returncode != 0 or not lines:
        raise ClusterError(f"{script} failed (exit {returncode}):\n{''.join(tail).rstrip()}")
    bin_dir = Path(lines[-1])
    if not (bin_dir / "kube-apiserver").is_file():
        raise ClusterError(f"{script} printed {bin_dir}, which holds no kube-apiserver")
    return bin_dir


def wait_until(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.2,
    on_timeout: Callable[[], str] | None = None,
) -> T:
    """Call ``probe`` until it returns something other than None (or False) and return that.

    ``on_timeout`` adds context (a log tail, the last state seen) to the error raised at the end.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            detail = on_timeout() if on_timeout is not None else ""
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}\n{detail}".rstrip())
        time.sleep(interval)


def write_kubeconfig(path: Path, *, server: str, ca_file: Path, token: str, user: str, namespace: str = "") -> Path:
    """A kubeconfig for one bearer-token user; kubectl, kopf and the kubernetes client all read it."""
    context: dict[str, str] = {"cluster": "local", "user": user}
    if namespace:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority": str(ca_file)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": context}],
        "current-context": user,
    }
    # JSON is YAML, and writing it needs no YAML library.
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, json.dumps(config, indent=2) + "\n")
    return path


def _write_private(path: Path, text: str) -> None:
    """Write a file that holds a credential, readable by its owner only from the first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as sink:
        sink.write(text)


@dataclass
class Kubectl:
    """kubectl bound to one kubeconfig: what tests use to talk to the cluster, local or real."""

    kubeconfig: Path
    executable: str = "kubectl"

    def __call__(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``kubectl --kubeconfig=... ARGS``; with ``check`` a failure raises :class:`KubectlError`."""
        cmd = [self.executable, f"--kubeconfig={self.kubeconfig}", *args]
        done = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise KubectlError(done.returncode, cmd, done.stdout, done.stderr)
        return done

    def json(self, *args: str) -> Any:
        """``kubectl ARGS -o json``, parsed."""
        return json.loads(self(*args, "-o", "json").stdout)


@dataclass
class ClusterAccess:
    """What a test needs to use a cluster, whether started here or a real one from KUBECONFIG."""

    kubeconfig: Path
    kubectl: Kubectl
    # The local build's binaries (kubectl, helm, ...); None for a real cluster.
    bin_dir: Path | None = None
    # The cluster started for the tests; None for a real cluster.
    local: LocalCluster | None = None


@dataclass
class _Process:
    """One control-plane program: its process and the file it logs to."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"(no log at {self.log})"
        return f"--- last lines of {self.log} ---\n" + "\n".join(text)

    def check_alive(self) -> None:
        """Fail at once, with its log, when the program has exited instead of waiting out a timeout."""
        code = self.popen.poll()
        if code is not None:
            raise ClusterError(f"{self.name} exited with code {code}\n{self.tail()}")


@dataclass
class LocalCluster:
    """etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok on 127.0.0.1.

    ``start()`` (or entering the context manager) brings everything up and returns once a fake
    node is Ready and the ``default`` namespace has its ServiceAccount; ``stop()`` ends it all.
    The work dir receives the certificates, keys, data, logs and ``kubeconfig``.
    """

    bin_dir: Path
    work_dir: Path
    stages_file: Path = STAGES_FILE
    node_name: str = FAKE_NODE
    node_capacity: dict[str, str] = field(default_factory=lambda: dict(FAKE_NODE_CAPACITY))
    start_timeout: float = 60.0
    stop_timeout: float = 15.0

    # Known once started.
    kubeconfig: Path = field(init=False)
    server: str = field(init=False, default="")
    ca_file: Path = field(init=False)
    token: str = field(init=False, default="")
    startup_seconds: dict[str, float] = field(init=False, default_factory=dict)
    _processes: list[_Process] = field(init=False, default_factory=list)
    _etcd_url: str = field(init=False, default="")
    _kwok: _Process | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.bin_dir = Path(self.bin_dir)
        self.work_dir = Path(self.work_dir)
        self.kubeconfig = self.work_dir / "kubeconfig"
        self.ca_file = self.work_dir / "certs" / "ca.crt"

    # --- public ---------------------------------------------------------------------------------

    @property
    def kubectl(self) -> Kubectl:
        """The matching kubectl with the admin kubeconfig."""
        return Kubectl(self.kubeconfig, str(self.bin_dir / "kubectl"))

    def start(self) -> LocalCluster:
        """Start every program in order and wait until the cluster can run pods; stop all on failure."""
        if self._processes:
            raise ClusterError("this LocalCluster is already started")
        missing = [b for b in self._binaries() if not (self.bin_dir / b).is_file()]
        if missing:
            raise ClusterError(f"{self.bin_dir} lacks {', '.join(missing)}: run {BUILD_SCRIPT}")
        if shutil.which("openssl") is None:
            raise ClusterError("openssl is needed to make the service-account key (apt-get install openssl)")
        started = time.monotonic()
        try:
            self._start_etcd()
            self._start_apiserver()
            self._start_controllers()
            self._create_node()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds["total"] = time.monotonic() - started
        return self

    def stop(self) -> None:
        """SIGTERM every program, clients before servers, then SIGKILL what outlives ``stop_timeout``.

        Idempotent: a second call, or one after a failed start, finds nothing left to stop.
        """
        # kwok and the controllers first, so they do not log a storm of errors about a vanished
        # apiserver; the apiserver before etcd, which it needs to shut down cleanly.
        running = [p for p in reversed(self._processes) if p.popen.poll() is None]
        self._processes.clear()
        groups = [[p for p in running if p.name not in ("kube-apiserver", "etcd")]]
        groups += [[p for p in running if p.name == name] for name in ("kube-apiserver", "etcd")]
        for group in groups:
            for proc in group:
                proc.popen.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout
            for proc in group:
                try:
                    proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.popen.kill()
                    proc.popen.wait()

    def logs(self) -> dict[str, Path]:
        """Each program's log file, by program name."""
        return {name: self.work_dir / "logs" / f"{name}.log" for name in self._binaries() if name != "kubectl"}

    def service_account_kubeconfig(
        self, namespace: str, name: str, path: Path | None = None, *, duration: str = "2h"
    ) -> Path:
        """A kubeconfig that acts as ServiceAccount ``namespace/name`` (created if missing).

        For running a program (the operator) with only the permissions its RBAC grants: the token
        comes from the TokenRequest API, as a pod's projected token would.
        """
        kubectl = self.kubectl
        if kubectl("get", "serviceaccount", name, "-n", namespace, check=False).returncode != 0:
            kubectl("create", "serviceaccount", name, "-n", namespace)
        token = kubectl("create", "token", name, "-n", namespace, f"--duration={duration}").stdout.strip()
        target = path if path is not None else self.work_dir / f"kubeconfig-{namespace}-{name}"
        return write_kubeconfig(
            target,
            server=self.server,
            ca_file=self.ca_file,
            token=token,
            user=f"system:serviceaccount:{namespace}:{name}",
            namespace=namespace,
        )

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- the programs ---------------------------------------------------------------------------

    @staticmethod
    def _binaries() -> Sequence[str]:
        return ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kubectl")

    def _spawn(self, name: str, args: Sequence[str]) -> _Process:
        log = self.work_dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as sink:
            # The child keeps its own copy of the file descriptor; ours closes with the block.
            popen = subprocess.Popen(
                [str(self.bin_dir / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
                preexec_fn=die_with_parent,
            )
        proc = _Process(name, popen, log)
        self._processes.append(proc)
        return proc

    def _wait_ready(self, proc: _Process, probe: Callable[[], bool], started: float) -> None:
        def alive_and_ready() -> bool:
            proc.check_alive()
            return probe()

        wait_until(alive_and_ready, timeout=self.start_timeout, what=f"{proc.name} to be ready", on_timeout=proc.tail)
        self.startup_seconds[proc.name] = time.monotonic() - started

    def _start_etcd(self) -> None:
        started = time.monotonic()
        client, peer = _free_ports(2)
        client_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
        proc = self._spawn(
            "etcd",
            [
                "--name=default",
                f"--data-dir={self.work_dir / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                # A peer port even for one member; the default (2380) may be taken on a shared machine.
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                # Test data is thrown away: skipping fsync makes every write far faster.
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )
        self._etcd_url = client_url
        self._wait_ready(proc, lambda: _http_ok(f"{client_url}/health", expect='"health":"true"'), started)

    def _start_apiserver(self) -> None:
        started = time.monotonic()
        certs = self.work_dir / "certs"
        certs.mkdir(parents=True, exist_ok=True)
        # One RSA key signs and verifies service-account tokens (the controller-manager signs the
        # legacy ones with it too); kube-apiserver cannot generate it, so openssl does.
        sa_key = certs / "service-account.key"
        if not sa_key.exists():
            subprocess.run(
                ["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True, timeout=60
            )
        self.token = secrets.token_hex(24)
        tokens = certs / "tokens.csv"
        _write_private(tokens, f"{self.token},{ADMIN_USER},{ADMIN_USER}-uid,system:masters\n")
        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        proc = self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={self._etcd_url}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                # Without an advertise address it looks for a default route ("no default routes
                # found"), which a sandbox may not have; a loopback address in turn needs the
                # `none` endpoint reconciler, since the `kubernetes` Service cannot point at it.
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",
                # It writes a self-signed serving cert for 127.0.0.1 here, followed by its CA.
                f"--cert-dir={certs}",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={sa_key}",
                f"--service-account-signing-key-file={sa_key}",
                f"--token-auth-file={tokens}",
                "--authorization-mode=RBAC",
                # Namespaces of the real-node tests send their pods there (e2e_tests/realnode.py).
                "--enable-admission-plugins=PodNodeSelector,PodTolerationRestriction",
                "--allow-privileged=true",
                # A real node (e2e_tests/realnode.py) is reached at its InternalIP: its hostname resolves nowhere.
                "--kubelet-preferred-address-types=InternalIP",
            ],
        )
        context = _tls_context(certs / "apiserver.crt", self.ca_file)
        self._wait_ready(proc, lambda: _http_ok(f"{self.server}/readyz", token=self.token, context=context()), started)
        write_kubeconfig(self.kubeconfig, server=self.server, ca_file=self.ca_file, token=self.token, user=ADMIN_USER)

    def _start_controllers(self) -> None:
        started = time.monotonic()
        kubeconfig = str(self.kubeconfig)
        # The controller-manager and the scheduler serve /healthz over TLS with a self-signed
        # certificate of their own: readiness probes skip verification on these loopback ports.
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        delegated = [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            # The apiserver has no client CA, so it publishes no extension-apiserver-authentication
            # ConfigMap; looking it up would log an error every few seconds for nothing.
            "--authentication-skip-lookup=true",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
        ]
        kcm_port, scheduler_port = _free_ports(2)
        # The controller-manager removes the not-ready taint from new nodes and runs the Job,
        # Deployment/ReplicaSet, garbage-collector, namespace and ServiceAccount controllers.
        kcm = self._spawn(
            "kube-controller-manager",
            [
                *delegated,
                f"--secure-port={kcm_port}",
                "--controllers=*",
                f"--service-account-private-key-file={self.work_dir / 'certs' / 'service-account.key'}",
                f"--root-ca-file={self.ca_file}",
            ],
        )
        scheduler = self._spawn("kube-scheduler", [*delegated, f"--secure-port={scheduler_port}"])
        kwok = self._spawn(
            "kwok",
            [
                f"--kubeconfig={kubeconfig}",
                f"--config={self.stages_file}",
                # Only the fake nodes: a real kubelet registered beside them reports its own status.
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                "--node-lease-duration-seconds=40",
            ],
        )
        self._wait_ready(kcm, lambda: _http_ok(f"https://127.0.0.1:{kcm_port}/healthz", context=insecure), started)
        self._wait_ready(
            scheduler, lambda: _http_ok(f"https://127.0.0.1:{scheduler_port}/healthz", context=insecure), started
        )
        # kwok serves no health endpoint unless asked to; the node turning Ready proves it works.
        self._kwok = kwok

    def _create_node(self) -> None:
        started = time.monotonic()
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "annotations": {"kwok.x-k8s.io/node": "fake"},
                "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                },
            },
            "spec": {},
            "status": {"capacity": self.node_capacity, "allocatable": self.node_capacity},
        }
        kubectl = self.kubectl
        kubectl("apply", "-f", "-", input=json.dumps(node))
        kwok = self._kwok
        assert kwok is not None, "kwok starts before the node is created"
        last: dict[str, Any] = {}

        def schedulable() -> bool:
            kwok.check_alive()
            found = kubectl("get", "node", self.node_name, "-o", "json", check=False)
            if found.returncode != 0:
                return False
            last.update(json.loads(found.stdout))
            ready = any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in last.get("status", {}).get("conditions", [])
            )
            # The node controller taints a new node not-ready until it has seen it Ready; the
            # scheduler places nothing there before the taint is gone.
            return ready and not last.get("spec", {}).get("taints")

        def describe() -> str:
            return (
                f"last node seen: status.conditions={last.get('status', {}).get('conditions')} "
                f"spec.taints={last.get('spec', {}).get('taints')}\n{kwok.tail(20)}"
            )

        wait_until(
            schedulable, timeout=self.start_timeout, what=f"node {self.node_name} to be Ready", on_timeout=describe
        )
        # Pods in a namespace are refused until its `default` ServiceAccount exists.
        wait_until(
            lambda: kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0,
            timeout=self.start_timeout,
            what="the default ServiceAccount",
        )
        self.startup_seconds["node"] = time.monotonic() - started


def _free_ports(count: int) -> list[int]:
    """Distinct free ports for programs started together (free_port alone may repeat one)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _tls_context(serving_cert: Path, ca_file: Path) -> Callable[[], ssl.SSLContext | None]:
    """A context that trusts the apiserver's own CA, once it has written its certificate.

    The self-signed ``apiserver.crt`` in ``--cert-dir`` holds the serving certificate followed by
    the CA that signed it. Only the CA goes to ``ca_file``: the controller-manager publishes its
    ``--root-ca-file`` as a ClusterTrustBundle, which refuses a certificate without the CA bit
    ("entry 0 does not have the CA bit set"), and pods see it as their ``ca.crt``.
    Returns None until the file is complete.
    """
    cached: list[ssl.SSLContext] = []

    def get() -> ssl.SSLContext | None:
        if cached:
            return cached[0]
        try:
            pem = serving_cert.read_text()
        except OSError:
            return None
        blocks = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?", pem, flags=re.DOTALL)
        if len(blocks) < 2:
            return None  # not written yet, or caught half-written
        ca_file.write_text(blocks[-1])
        cached.append(ssl.create_default_context(cafile=str(ca_file)))
        return cached[0]

    return get


def _http_ok(url: str, *, token: str = "", context: ssl.SSLContext | None = None, expect: str = "") -> bool:
    """True when GET ``url`` answers 200 (and its body contains ``expect``)."""
    if url.startswith("https:") and context is None:
        return False
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return bool(response.status == 200 and expect in response.read().decode(errors="replace"))
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False
