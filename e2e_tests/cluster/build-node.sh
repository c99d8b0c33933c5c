#!/usr/bin/env bash
# Build, once, the binaries of a real Kubernetes node for e2e_tests/realnode.py and cache them.
#
#   e2e_tests/cluster/build-node.sh   # prints the bin dir as its last line of stdout
#
# kubelet and kube-proxy come from build.sh (the control plane's k8s.io/kubernetes, same release);
# this script adds the container runtime and the pod network, each from its Go module:
#   containerd, containerd-shim-runc-v2, ctr   github.com/containerd/containerd/v2 (kubelet >= 1.36 needs 2.x)
#   bridge, host-local, loopback, portmap      github.com/containernetworking/plugins (CNI)
#   pause                                      a 15-line Go program (pause.go): the pods' sandbox image
#   coredns                                    github.com/coredns/coredns with the cluster-DNS plugins only (coredns.go)
# runc is Debian's (apt-get install runc): a cgo build, and Debian's 1.1.5 runs the pods here.
# Binaries go to ${RECOPS_CLUSTER_CACHE:-$HOME/.cache/recops/cluster}/<key>/bin; a warm run needs no Go.
set -euo pipefail

CONTAINERD_VERSION=v2.4.2
CNI_PLUGINS_VERSION=v1.10.0
COREDNS_VERSION=v1.15.0
BUILD_REV=1
GO_LINE=1.26.0

HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE_ROOT="${RECOPS_CLUSTER_CACHE:-${HOME:?HOME is not set}/.cache/recops/cluster}"
KEY="node_containerd-${CONTAINERD_VERSION}_cni-${CNI_PLUGINS_VERSION}_coredns-${COREDNS_VERSION}_r${BUILD_REV}"
BIN_DIR="$CACHE_ROOT/$KEY/bin"
SRC_DIR="$CACHE_ROOT/src"
BINARIES=(containerd containerd-shim-runc-v2 ctr bridge host-local loopback portmap pause coredns)

have() {
  local binary
  for binary in "${BINARIES[@]}"; do [[ -x "$BIN_DIR/$binary" ]] || return 1; done
}
if have; then
  printf '%s\n' "$BIN_DIR"
  exit 0
fi

log() { printf '[build-node.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}
command -v go >/dev/null 2>&1 || die "'go' is not on PATH: the node's binaries are built from Go modules"
export GOWORK=off GOFLAGS=-buildvcs=false CGO_ENABLED=0
mkdir -p "$BIN_DIR" "$SRC_DIR"
exec 9>"$CACHE_ROOT/.build-node.lock"
flock 9
if have; then
  printf '%s\n' "$BIN_DIR"
  exit 0
fi

# One wrapper module per project, so that minimal version selection never mixes their dependencies.
build_tools() {
  local name="$1" tags="$2"
  shift 2
  mkdir -p "$SRC_DIR/$name"
  printf 'module recops.local/cluster-build/%s\n\ngo %s\n' "$name" "$GO_LINE" >"$SRC_DIR/$name/go.mod"
  log "fetching and building $name ..."
  (
    cd "$SRC_DIR/$name"
    go get -tool "$@" >&2 || die "resolving $* failed: a module may be missing from the Go module proxy"
    go build -trimpath -tags "$tags" -ldflags "-s -w" -o "$BIN_DIR/" "${@%@*}" >&2
  ) || die "building $name failed (see above)"
}

# containerd without the snapshotters that need cgo or kernel modules absent here (overlayfs is kept).
build_tools containerd "no_btrfs no_devmapper no_zfs" \
  "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
  "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" \
  "github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION"
build_tools cni "" \
  "github.com/containernetworking/plugins/plugins/main/bridge@$CNI_PLUGINS_VERSION" \
  "github.com/containernetworking/plugins/plugins/main/loopback@$CNI_PLUGINS_VERSION" \
  "github.com/containernetworking/plugins/plugins/ipam/host-local@$CNI_PLUGINS_VERSION" \
  "github.com/containernetworking/plugins/plugins/meta/portmap@$CNI_PLUGINS_VERSION"
mkdir -p "$SRC_DIR/pause"
cp "$HERE/pause.go" "$SRC_DIR/pause/main.go"
printf 'module recops.local/cluster-build/pause\n\ngo %s\n' "$GO_LINE" >"$SRC_DIR/pause/go.mod"
(cd "$SRC_DIR/pause" && go build -trimpath -ldflags "-s -w" -o "$BIN_DIR/pause" .) || die "building pause failed"

# CoreDNS's own main imports every plugin (cloud SDKs included); ours imports five.
mkdir -p "$SRC_DIR/coredns"
cp "$HERE/coredns.go" "$SRC_DIR/coredns/main.go"
printf 'module recops.local/cluster-build/coredns\n\ngo %s\n' "$GO_LINE" >"$SRC_DIR/coredns/go.mod"
log "fetching and building coredns ..."
(
  cd "$SRC_DIR/coredns"
  go get "github.com/coredns/coredns@$COREDNS_VERSION" >&2 && go mod tidy >&2 &&
    go build -trimpath -ldflags "-s -w" -o "$BIN_DIR/coredns" . >&2
) || die "building coredns failed (see above)"

have || die "some binaries are still missing from $BIN_DIR"
log "node binaries ready in $BIN_DIR"
printf '%s\n' "$BIN_DIR"
