"""A real Kubernetes node beside kwok's fake one: kubelet + containerd 2.x + runc + CNI, in a network namespace.

The ``real_node`` tests start it (``e2e_tests/realnode_fixtures.py``); ``python -m e2e_tests.realnode DIR
[ARCHIVE...]`` starts a control plane with one, the archives imported, to poke at with kubectl.
What it does, and why, each step a method of :class:`RealNode`:

1. ``_network``: a network namespace ``recops-node`` and a veth pair, host 10.250.0.1 / node 10.250.0.2.
   containerd, kubelet and every pod live in that namespace, so their bridge (cni0, 10.244.0.0/24) and
   addresses exist only there. The host gets routes to the pod and service ranges through the node and
   nothing else: the namespace has no default route, nothing is masqueraded.
2. ``_apiserver_forward``: the control plane listens on 127.0.0.1 only; socat forwards the node's
   view of it (10.250.0.1:6443) there. TLS names ``kubernetes.default.svc``, which the apiserver's
   self-signed certificate carries.
3. ``_cgroup_root``: the kubelet's pods go under ``/recops-node`` in every cgroup v1 hierarchy. Its
   ``cpuset.cpus`` and ``cpuset.mems`` are copied from the root, since an empty cpuset refuses tasks.
4. ``_containerd``: CRI with ``restrict_oom_score_adj``: this machine's root lacks CAP_SYS_RESOURCE,
   so runc fails ("failed to update /proc/self/oom_score_adj: Permission denied", reported only as
   "can't get final child's PID from pipe: EOF") when asked for the pause container's -998.
5. ``_kubelet``: ``failCgroupV1: false`` (1.35+ refuse cgroup v1 otherwise), cgroupfs driver,
   started with ``nsenter --net`` and never ``ip netns exec``, which remounts /sys and hides the cgroup
   mounts ("failed to find cgroup mounts").

A run killed before its teardown (a timeout's SIGKILL, a session's end) leaves the namespace, the veth,
the pods' processes and cgroups and the kubelet's mounts behind, and the next ``ip netns add`` would fail
("File exists"). So ``start()`` first reaps whatever a previous node left (:func:`reap_node`; the previous
work dir is read from ``STATE_FILE``), and the node's own programs die with the process that started them.

Images are imported into containerd's ``k8s.io`` namespace (``import_image``); pods use
``imagePullPolicy: Never`` or ``IfNotPresent`` and never reach a registry.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from e2e_tests.localcluster import ClusterError, LocalCluster, _Process, wait_until
from recops.serving.processes import die_with_parent

HERE = Path(__file__).resolve().parent
BUILD_NODE_SCRIPT = HERE / "cluster" / "build-node.sh"

NETNS = "recops-node"
HOST_IP, NODE_IP = "10.250.0.1", "10.250.0.2"
POD_CIDR, SERVICE_CIDR, CLUSTER_DNS = "10.244.0.0/24", "10.96.0.0/16", "10.96.0.10"
APISERVER_PORT = 6443
CGROUP_ROOT = "recops-node"
VETH_HOST, VETH_NODE = "rn-host", "rn-node"
# The running node's work dir, for the next start to reap it when this run is killed before its teardown.
STATE_FILE = Path("/run/recops-node.work-dir")
CGROUP_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "systemd")
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
COREDNS_IMAGE = "registry.k8s.io/coredns/coredns:v1.15.0"
NODE_NAME = "real-node-0"
# The real node is tainted, so that the kwok tests' pods (whose images it does not have) stay off it; the
# real-node tests' namespaces carry the annotations below (the apiserver's PodNodeSelector and
# PodTolerationRestriction admission plugins), so that every pod in them lands on it.
NODE_LABEL = "recops.dev/node=real"
NODE_TAINT = "recops.dev/real-node"
NAMESPACE_ANNOTATIONS = {
    "scheduler.alpha.kubernetes.io/node-selector": NODE_LABEL,
    "scheduler.alpha.kubernetes.io/defaultTolerations": json.dumps(
        [{"key": NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"}]),
}


@dataclass
class RealNode:
    """One real node, registered with ``cluster``; ``start()`` returns once it is Ready."""

    cluster: LocalCluster
    node_bin: Path
    work_dir: Path
    runc: str = "/usr/sbin/runc"
    start_timeout: float = 60.0
    startup_seconds: dict[str, float] = field(init=False, default_factory=dict)
    _processes: list[_Process] = field(init=False, default_factory=list)

    @property
    def socket(self) -> Path:
        return self.work_dir / "containerd.sock"

    def start(self) -> RealNode:
        started = time.monotonic()
        previous = Path(STATE_FILE.read_text().strip()) if STATE_FILE.exists() else None
        reap_node(NETNS, VETH_HOST, CGROUP_ROOT, previous, listener=f"bind={HOST_IP}")
        STATE_FILE.write_text(str(self.work_dir))
        try:
            self._network()
            self._apiserver_forward()
            self._cgroup_root()
            self._containerd()
            self._pause_image()
            self._kubelet()
            self._kube_proxy()
            self._cluster_dns()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds["total"] = time.monotonic() - started
        return self

    def import_image(self, archive: Path) -> None:
        """Import an OCI archive (``buildah push IMG oci-archive:F:NAME``) for the kubelet's CRI."""
        self.ctr("images", "import", str(archive))

    def ctr(self, *args: str) -> str:
        done = subprocess.run([str(self.node_bin / "ctr"), "--address", str(self.socket), "-n", "k8s.io", *args],
                              capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise ClusterError(f"ctr {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout

    def stop(self) -> None:
        """Kill the pods' processes, the kubelet and containerd; unmount, remove cgroups and the namespace."""
        for proc in reversed(self._processes):
            _end(proc, timeout=10)
        self._processes.clear()
        reap_node(NETNS, VETH_HOST, CGROUP_ROOT, self.work_dir, listener=f"bind={HOST_IP}")
        STATE_FILE.unlink(missing_ok=True)

    # --- the steps --------------------------------------------------------------------------------

    def _network(self) -> None:
        for command in (
            f"ip netns add {NETNS}",
            f"ip link add {VETH_HOST} type veth peer name {VETH_NODE}",
            f"ip link set {VETH_NODE} netns {NETNS}",
            f"ip addr add {HOST_IP}/30 dev {VETH_HOST}",
            f"ip link set {VETH_HOST} up",
            f"ip -n {NETNS} addr add {NODE_IP}/30 dev {VETH_NODE}",
            f"ip -n {NETNS} link set {VETH_NODE} up",
            f"ip -n {NETNS} link set lo up",
            f"ip netns exec {NETNS} sysctl -qw net.ipv4.ip_forward=1",
            f"ip route add {POD_CIDR} via {NODE_IP}",
            f"ip route add {SERVICE_CIDR} via {NODE_IP}",
        ):
            done = subprocess.run(command.split(), capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise ClusterError(f"{command}: {done.stderr.strip()}")

    def _apiserver_forward(self) -> None:
        port = self.cluster.server.rsplit(":", 1)[1]
        self._spawn("socat", ["socat", f"TCP-LISTEN:{APISERVER_PORT},bind={HOST_IP},fork,reuseaddr",
                              f"TCP:127.0.0.1:{port}"], in_netns=False)

    def _cgroup_root(self) -> None:
        for controller in CGROUP_CONTROLLERS:
            (Path("/sys/fs/cgroup") / controller / CGROUP_ROOT).mkdir(exist_ok=True)
        cpuset = Path("/sys/fs/cgroup/cpuset")
        for name in ("cpuset.cpus", "cpuset.mems"):
            (cpuset / CGROUP_ROOT / name).write_text((cpuset / name).read_text())

    def _containerd(self) -> None:
        started = time.monotonic()
        cni = self.work_dir / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        (cni / "net.d" / "10-recops.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "recops", "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]], "routes": [{"dst": "0.0.0.0/0"}],
                          "dataDir": str(cni / "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ]}))
        config = self.work_dir / "containerd.toml"
        config.write_text(f"""version = 3
root = "{self.work_dir}/containerd/root"
state = "{self.work_dir}/containerd/state"
[grpc]
  address = "{self.socket}"
[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{self.node_bin}"]
    conf_dir = "{cni / 'net.d'}"
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      BinaryName = "{self.runc}"
      SystemdCgroup = false
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "{PAUSE_IMAGE}"
""")
        proc = self._spawn("containerd", [str(self.node_bin / "containerd"), "--config", str(config)])
        wait_until(lambda: proc.check_alive() or self.socket.exists(), timeout=self.start_timeout,
                   what="containerd's socket", on_timeout=proc.tail)
        self.startup_seconds["containerd"] = time.monotonic() - started

    def _pause_image(self) -> None:
        """The sandbox image, from the pause binary alone (no registry to pull it from)."""
        self.import_image(self._binary_image("pause", PAUSE_IMAGE, "--user", "65535:65535"))

    def _kubelet(self) -> None:
        started = time.monotonic()
        kubeconfig = self.work_dir / "kubelet.kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "local", "cluster": {
                "server": f"https://{HOST_IP}:{APISERVER_PORT}", "certificate-authority": str(self.cluster.ca_file),
                "tls-server-name": "kubernetes.default.svc"}}],
            "users": [{"name": "kubelet", "user": {"token": self.cluster.token}}],
            "contexts": [{"name": "kubelet", "context": {"cluster": "local", "user": "kubelet"}}],
            "current-context": "kubelet"}))
        config = self.work_dir / "kubelet.yaml"
        config.write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{CGROUP_ROOT}",
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            # Reached only from the host, through the veth: the apiserver's log and exec calls need no client cert.
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "address": NODE_IP, "readOnlyPort": 0, "failSwapOn": False,
            "clusterDNS": [CLUSTER_DNS], "clusterDomain": "cluster.local", "serializeImagePulls": False,
            "podLogsDir": str(self.work_dir / "pod-logs"),
            # The node shares the host's disk, which CI fills to well under the kubelet's default 15% free:
            # its DiskPressure taint would then keep every pod off the node, and image GC would delete the
            # images imported for the tests (there is no registry to pull them back from).
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "2Gi", "imagefs.available": "2Gi"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            # Mounted ConfigMaps (the router's weights) are refreshed on the pod sync: 10 s rather than the
            # default 1 min, so that the tests' rollouts can settle in 25 s instead of the chart's 90.
            "syncFrequency": "10s"}))
        proc = self._spawn("kubelet", [
            str(self.cluster.bin_dir / "kubelet"), f"--config={config}", f"--kubeconfig={kubeconfig}",
            f"--node-ip={NODE_IP}", f"--hostname-override={NODE_NAME}", f"--root-dir={self.work_dir / 'kubelet'}",
            f"--node-labels={NODE_LABEL}", f"--register-with-taints={NODE_TAINT}=true:NoSchedule"])
        self._wait_node_ready(proc)
        self.startup_seconds["kubelet"] = time.monotonic() - started

    def restart(self, *names: str) -> dict[str, float]:
        """Stop the node's programs ``names`` (SIGTERM, as systemd would) and start them again with the same
        command lines, in order, each back before the next: what an upgrade or a crash-loop does to a node.
        The pods' containers keep running under their shims meanwhile. Returns the seconds each took."""
        took = {}
        for name in names:
            started = time.monotonic()
            (old,) = [proc for proc in self._processes if proc.name == name]
            _end(old, timeout=30)
            self._processes.remove(old)
            self._wait_back(self._spawn(name, list(map(str, old.popen.args)), in_netns=False))  # args hold nsenter
            took[name] = round(time.monotonic() - started, 1)
        return took

    def _wait_back(self, proc: _Process) -> None:
        if proc.name == "containerd":
            wait_until(lambda: proc.check_alive() or self._containerd_answers(), timeout=self.start_timeout,
                       what="containerd to answer again", on_timeout=proc.tail)
        elif proc.name == "kubelet":
            # The node object still says Ready from before the restart: ask the new kubelet itself first.
            wait_until(lambda: proc.check_alive() or self._kubelet_healthy(), timeout=self.start_timeout,
                       what="the kubelet's /healthz", on_timeout=proc.tail)
            self._wait_node_ready(proc)

    def _containerd_answers(self) -> bool:
        try:
            self.ctr("version")
        except ClusterError:
            return False
        return True

    def _kubelet_healthy(self) -> bool:
        probe = "import urllib.request; urllib.request.urlopen('http://127.0.0.1:10248/healthz', timeout=2)"
        return subprocess.run(["nsenter", f"--net=/var/run/netns/{NETNS}", sys.executable, "-c", probe],
                              capture_output=True, check=False).returncode == 0

    def _wait_node_ready(self, proc: _Process) -> None:
        last_seen: dict[str, object] = {}

        def ready() -> bool:
            """Ready, and no taint but ours: a pressure taint would keep the tests' pods off the node."""
            proc.check_alive()
            found = self.cluster.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
            if found.returncode != 0:
                return False
            node = json.loads(found.stdout)
            conditions = node["status"].get("conditions", [])
            taints = [t["key"] for t in node["spec"].get("taints", [])]
            last_seen.update(taints=taints, conditions={c["type"]: c["status"] for c in conditions})
            return (any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
                    and taints == [NODE_TAINT])

        wait_until(ready, timeout=self.start_timeout, what=f"node {NODE_NAME} to be Ready and untainted but for "
                   f"{NODE_TAINT}", on_timeout=lambda: f"last seen: {last_seen}\n{proc.tail()}")

    def _kube_proxy(self) -> None:
        """Services in iptables mode, inside the node's namespace; ``kubernetes`` points at the forward."""
        started = time.monotonic()
        config = self.work_dir / "kube-proxy.yaml"
        config.write_text(json.dumps({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.work_dir / "kubelet.kubeconfig")},
            "mode": "iptables", "clusterCIDR": POD_CIDR, "hostnameOverride": NODE_NAME,
            # Zero leaves the conntrack sysctls alone: they are the host's, not the namespace's.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        }))
        proc = self._spawn("kube-proxy", [str(self.cluster.bin_dir / "kube-proxy"), f"--config={config}"])
        # The apiserver (endpoint reconciler `none`) publishes no endpoints for its own Service.
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "kubernetes", "namespace": "default", "labels": {
                "kubernetes.io/service-name": "kubernetes", "endpointslice.kubernetes.io/managed-by": "recops-e2e"}},
            "addressType": "IPv4", "endpoints": [{"addresses": [HOST_IP], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": APISERVER_PORT, "protocol": "TCP"}]}))

        def programmed() -> bool:
            proc.check_alive()
            rules = subprocess.run(["nsenter", f"--net=/var/run/netns/{NETNS}", "iptables-save", "-t", "nat"],
                                   capture_output=True, text=True, check=False).stdout
            return f"{HOST_IP}:{APISERVER_PORT}" in rules

        wait_until(programmed, timeout=self.start_timeout, what="kube-proxy's rules for the kubernetes Service",
                   on_timeout=proc.tail)
        self.startup_seconds["kube-proxy"] = time.monotonic() - started

    def _cluster_dns(self) -> None:
        """CoreDNS (kubernetes plugin only: nothing is forwarded upstream) at 10.96.0.10, on the real node."""
        started = time.monotonic()
        self.import_image(self._binary_image("coredns", COREDNS_IMAGE))
        self.cluster.kubectl("apply", "-f", str(HERE / "cluster" / "coredns.yaml"))
        done = self.cluster.kubectl("rollout", "status", "deployment/coredns", "-n", "kube-system", "--timeout=90s",
                                    check=False, timeout=100)
        if done.returncode != 0:
            raise ClusterError(f"CoreDNS did not become ready:\n{done.stdout}{done.stderr}")
        self.startup_seconds["dns"] = time.monotonic() - started

    def _binary_image(self, binary: str, ref: str, *config: str) -> Path:
        """An image of one static binary from ``build-node.sh``, built once beside it as an OCI archive."""
        return binary_image(self.node_bin / binary, ref, self.node_bin / f"{binary}.oci.tar", *config)

    def _spawn(self, name: str, args: list[str], *, in_netns: bool = True) -> _Process:
        log = self.work_dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        prefix = ["nsenter", f"--net=/var/run/netns/{NETNS}"] if in_netns else []
        # containerd finds its shim on PATH.
        env = {"PATH": f"{self.node_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        with log.open("ab") as sink:
            # nsenter execs the program, which keeps the parent-death signal.
            popen = subprocess.Popen([*prefix, *args], stdin=subprocess.DEVNULL, stdout=sink,
                                     stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)
        proc = _Process(name, popen, log)
        self._processes.append(proc)
        return proc


def _end(proc: _Process, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; returns once the process is gone."""
    if proc.popen.poll() is None:
        proc.popen.terminate()
        try:
            proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(timeout=10)


def reap_node(netns: str, veth_host: str, cgroup_root: str, work_dir: Path | None, *, listener: str) -> None:
    """Remove what a node leaves on the host, whether it is being stopped or was killed long ago.

    Kills every process in ``netns`` (containerd, the kubelet, kube-proxy, the shims, which outlive
    containerd by design) and in the ``cgroup_root`` cgroups (the pods), and the socat whose listen
    address contains ``listener``; unmounts the kubelet's volumes under ``work_dir`` and deletes the
    unpacked images there (15 GB with the trainer and Triton; pytest keeps three sessions' folders);
    removes the cgroups, ``netns``, the pods' ``cni-*`` namespaces left empty and the veth ``veth_host``.
    The logs stay.
    Idempotent: on a clean host it does nothing.
    """
    netns_dir = Path("/var/run/netns")
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=False).stdout.split()
    for procs in (Path("/sys/fs/cgroup/pids") / cgroup_root).rglob("cgroup.procs"):
        pids += procs.read_text().split()
    for pid in pids:
        subprocess.run(["kill", "-KILL", pid], capture_output=True, check=False)
    subprocess.run(["pkill", "-KILL", "-f", f"socat TCP-LISTEN:.*{listener}"], capture_output=True, check=False)
    if work_dir is not None:
        subprocess.run(["pkill", "-KILL", "-f", f"containerd-shim-runc-v2 .*-address {work_dir}/containerd.sock"],
                       capture_output=True, check=False)
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(f"{work_dir}/")]
        for mount in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)
        for directory in (work_dir / "containerd", work_dir / "kubelet"):
            subprocess.run(["rm", "-rf", "--one-file-system", str(directory)], check=False)
    # A killed process leaves its cgroup a moment later; the kubelet made one in the cgroup2 "unified" mount too.
    for controller in (*CGROUP_CONTROLLERS, "unified"):
        root = Path("/sys/fs/cgroup") / controller / cgroup_root
        for directory in [*sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True), root]:
            wait_until(lambda d=directory: not d.exists() or _rmdir(d), timeout=10, what=f"{directory} to go")
    subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
    # The pods' namespaces that no process is in any more (a live node's pods keep their pause process in theirs).
    for pod_netns in netns_dir.glob("cni-*") if netns_dir.is_dir() else ():
        if not subprocess.run(["ip", "netns", "pids", pod_netns.name], capture_output=True, text=True,
                              check=False).stdout.split():
            subprocess.run(["ip", "netns", "del", pod_netns.name], capture_output=True, check=False)
    # Deleting the namespace deletes the pair; a veth whose peer never moved there is deleted here.
    subprocess.run(["ip", "link", "del", veth_host], capture_output=True, check=False)


def _rmdir(directory: Path) -> bool:
    try:
        directory.rmdir()
    except OSError:
        return False
    return True


def binary_image(binary: Path, ref: str, archive: Path, *config: str, base: str = "scratch") -> Path:
    """An image of ``binary`` (at ``/NAME``, its entrypoint) on ``base``, as the OCI archive ``archive``,
    built unless it exists. ``config`` are ``buildah config`` flags (a user, ports)."""
    if archive.exists():
        return archive
    container = _buildah("from", base)
    try:
        _buildah("copy", container, str(binary), f"/{binary.name}")
        _buildah("config", "--entrypoint", json.dumps([f"/{binary.name}"]), *config, container)
        _buildah("commit", "-q", "--rm", container, ref)
    except BaseException:
        _buildah("rm", container)
        raise
    partial = archive.with_suffix(".partial")
    _buildah("push", "-q", ref, f"oci-archive:{partial}:{ref}")
    partial.rename(archive)
    return archive


def _buildah(*args: str) -> str:
    done = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise ClusterError(f"buildah {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout.strip()


def build_node_binaries() -> Path:
    """The node's binaries (containerd, CNI plugins, pause), built once by ``build-node.sh``."""
    done = subprocess.run(["bash", str(BUILD_NODE_SCRIPT)], stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise ClusterError(f"{BUILD_NODE_SCRIPT} failed (exit {done.returncode})")
    return Path(done.stdout.strip().splitlines()[-1])


def _main(work_dir: Path, archives: list[Path]) -> None:
    """A control plane with a real node to poke at, its images imported; Ctrl-C stops it."""
    from e2e_tests.localcluster import ensure_binaries

    cluster = LocalCluster(ensure_binaries(), work_dir / "control-plane").start()
    node = RealNode(cluster, build_node_binaries(), work_dir / "node")
    try:
        node.start()
        for archive in archives:
            node.import_image(archive)
        print(f"node ready {node.startup_seconds}\nexport KUBECONFIG={cluster.kubeconfig}  # Ctrl-C stops it",
              flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
        cluster.stop()


if __name__ == "__main__":
    if shutil.which("buildah") is None or shutil.which("socat") is None:
        sys.exit("needs buildah, socat and runc (make system-deps)")
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/recops-realnode")
    shutil.rmtree(root, ignore_errors=True)
    _main(root, [Path(a) for a in sys.argv[2:]])
