#!/usr/bin/env bash
# Build, once, the binaries of a local Kubernetes control plane for e2e_tests/ and cache them.
#
#   e2e_tests/cluster/build.sh               # prints the bin dir as its last line of stdout
#   e2e_tests/cluster/build.sh --fetch-only  # only download the modules (network, no compile)
#
# Builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok and helm
# from their Go modules (the machines reach the Go module proxy but no download site, so there
# are no release tarballs to fetch). Each project gets a wrapper module of its own under
# $CACHE/src/<name>: building them in one module would let minimal version selection drag
# Kubernetes' dependencies forward to whatever etcd, kwok or helm require.
#
# The binaries go to ${RECOPS_CLUSTER_CACHE:-$HOME/.cache/recops/cluster}/<key>/bin, where the
# key names every pinned version: change a version below and the next run builds a new set.
# When all binaries for the key exist the script prints the bin dir and exits at once, without
# needing Go at all. Progress goes to stderr; stdout carries only the bin dir.
set -euo pipefail

# --- Pinned versions (the newest served that build with Go 1.26) --------------------------------
K8S_VERSION=v1.37.2  # kube-apiserver, kube-controller-manager, kube-scheduler, kubectl
ETCD_VERSION=v3.6.16 # apiservers need etcd >= 3.5.13 for RequestWatchProgress
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.22.0
# Bump when the build flags or layout change, so caches built the old way are not reused.
BUILD_REV=2
# The wrappers' `go` line: every pinned module declares go 1.26.0.
GO_LINE=1.26.0
# -------------------------------------------------------------------------------------------------

FETCH_ONLY=false
case "${1:-}" in
  "") ;;
  --fetch-only) FETCH_ONLY=true ;;
  *)
    echo "usage: $0 [--fetch-only]" >&2
    exit 2
    ;;
esac

CACHE_ROOT="${RECOPS_CLUSTER_CACHE:-${HOME:?HOME is not set}/.cache/recops/cluster}"
KEY="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_helm-${HELM_VERSION}_r${BUILD_REV}"
BIN_DIR="$CACHE_ROOT/$KEY/bin"
SRC_DIR="$CACHE_ROOT/src"

# The binaries that each wrapper module produces.
declare -A PRODUCES=(
  [etcd]="etcd"
  [kwok]="kwok"
  [helm]="helm"
  [kubernetes]="kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy"
)
# Smallest first, so a broken setup shows up before the long Kubernetes compile.
COMPONENTS=(etcd kwok helm kubernetes)

# True when every binary of the named components is installed.
have() {
  local component binary
  for component in "$@"; do
    for binary in ${PRODUCES[$component]}; do
      [[ -x "$BIN_DIR/$binary" ]] || return 1
    done
  done
}

# Warm start: nothing to do, and Go need not even be installed.
if have "${COMPONENTS[@]}"; then
  printf '%s\n' "$BIN_DIR"
  exit 0
fi

log() { printf '[build.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}
# Seconds since $1 (an $EPOCHREALTIME value), with one decimal.
since() { LC_ALL=C awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1fs", b - a }'; }

if ! command -v go >/dev/null 2>&1; then
  die "'go' is not on PATH. The local control plane is built from Go modules and needs Go >= ${GO_LINE%.*}
  (e.g. export PATH=/usr/local/go/bin:\$PATH), or point KUBECONFIG at an existing cluster instead."
fi
go_version="$(go env GOVERSION)"
go_minor="${go_version#go1.}"
go_minor="${go_minor%%[!0-9]*}"
need_minor="${GO_LINE#1.}"
need_minor="${need_minor%%.*}"
if [[ "$go_version" != go1.* ]] || ((go_minor < need_minor)); then
  die "$go_version is too old: the pinned modules need Go >= ${GO_LINE%.*}"
fi

# Build settings that must not come from the caller's environment: a go.work above the cache
# would swallow the wrappers, GOFLAGS=-mod=vendor breaks module mode, and the wrappers are in no
# VCS checkout to stamp. Static, cgo-free binaries run on any Linux of the same architecture.
export GOWORK=off GOFLAGS=-buildvcs=false CGO_ENABLED=0

mkdir -p "$CACHE_ROOT" "$SRC_DIR" "$BIN_DIR"

# Two test sessions may start at once: only one builds, the other waits and reuses its result.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$CACHE_ROOT/.build.lock"
  if ! flock -n 9; then
    log "another build holds $CACHE_ROOT/.build.lock; waiting for it"
    flock 9
  fi
  if have "${COMPONENTS[@]}"; then
    printf '%s\n' "$BIN_DIR"
    exit 0
  fi
fi

STAGE_DIR="$(mktemp -d "$CACHE_ROOT/$KEY/stage.XXXXXX")"
trap 'rm -rf "$STAGE_DIR"' EXIT

started="$EPOCHREALTIME"
log "building into $BIN_DIR with $go_version ($(go env GOMODCACHE) module cache)"

# Start a wrapper module from scratch; the go.sum of an earlier run is kept as a cache.
new_wrapper() {
  local name="$1" extra="${2:-}"
  mkdir -p "$SRC_DIR/$name"
  printf 'module recops.local/cluster-build/%s\n\ngo %s\n%s' "$name" "$GO_LINE" "$extra" \
    >"$SRC_DIR/$name/go.mod"
}

# Resolve and download everything the named packages need, before any compile starts, so that a
# module the proxy does not serve fails in seconds rather than after a long build.
fetch() {
  local name="$1"
  shift
  local t0="$EPOCHREALTIME"
  log "fetching modules for $name ..."
  (
    cd "$SRC_DIR/$name"
    go get -tool "$@" >&2 ||
      die "resolving $* failed: a module may be missing from the Go module proxy (see above)"
    # `go list -deps` loads every package the tools import, so any module still missing shows
    # up now; go get alone checks only what it needs to choose versions.
    go list -deps "${@%@*}" >/dev/null ||
      die "loading the packages of $name failed: a module may be missing from the proxy"
  )
  log "fetched $name in $(since "$t0")"
}

# The replace block that makes k8s.io/kubernetes usable as a dependency. Its go.mod requires the
# staging modules (k8s.io/api, k8s.io/client-go, ...) at v0.0.0 and points them at ./staging with
# replace lines that do not apply to a dependent module (kubernetes/kubernetes#79384), so a
# wrapper must map each to its published v0.N.M. The list comes from the exact go.mod of the
# pinned version, since releases add staging modules (1.36 added k8s.io/cri-streaming).
k8s_replace_block() {
  local json gomod staging_version
  json="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION")" ||
    die "cannot download k8s.io/kubernetes@$K8S_VERSION: $json"
  gomod="$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p' <<<"$json")"
  [[ -f "$gomod" ]] || die "no go.mod for k8s.io/kubernetes@$K8S_VERSION in: $json"
  staging_version="v0.${K8S_VERSION#v1.}"
  printf 'replace (\n'
  awk -v v="$staging_version" '
    $1 == "require" && $2 ~ /^k8s\.io\// && $3 == "v0.0.0" { print "\t" $2 " => " $2 " " v; next }
    $1 ~ /^k8s\.io\// && $2 == "v0.0.0" { print "\t" $1 " => " $1 " " v }
  ' "$gomod" | sort -u
  printf ')\n'
}

# Compile the packages of one wrapper into the stage dir, then move the binaries into place one
# by one (a rename is atomic), so an interrupted build never leaves a half-written binary behind.
compile() {
  local name="$1" ldflags="$2"
  shift 2
  local t0="$EPOCHREALTIME" out="$STAGE_DIR/"
  log "building ${PRODUCES[$name]// /, } ..."
  # `go build -o DIR/` names a binary after its package's last path element, which for etcd's
  # go.etcd.io/etcd/server/v3 would be "v3": a single binary gets its exact name instead.
  [[ "${PRODUCES[$name]}" == *" "* ]] || out="$STAGE_DIR/${PRODUCES[$name]}"
  (
    cd "$SRC_DIR/$name"
    go build -trimpath -ldflags "$ldflags" -o "$out" "$@" >&2
  ) || die "building $name failed (see above)"
  local binary
  for binary in ${PRODUCES[$name]}; do
    mv -f "$STAGE_DIR/$binary" "$BIN_DIR/$binary"
  done
  log "built ${PRODUCES[$name]// /, } in $(since "$t0")"
}

# -s -w: no symbol table or DWARF; nobody debugs these here, and the links are faster and smaller.
STRIP="-s -w"

K8S_PKGS=(
  "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION"
  "k8s.io/kubernetes/cmd/kube-controller-manager@$K8S_VERSION"
  "k8s.io/kubernetes/cmd/kube-scheduler@$K8S_VERSION"
  "k8s.io/kubernetes/cmd/kubectl@$K8S_VERSION"
  "k8s.io/kubernetes/cmd/kubelet@$K8S_VERSION"
  "k8s.io/kubernetes/cmd/kube-proxy@$K8S_VERSION"
)

# Phase 1: resolve and download everything (network only) for the components still missing.
todo=()
for component in "${COMPONENTS[@]}"; do
  have "$component" || todo+=("$component")
done
for component in "${todo[@]}"; do
  case "$component" in
    etcd)
      # etcd's server module has replace lines of its own, so `go install ...@v` refuses it.
      new_wrapper etcd
      fetch etcd "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
      ;;
    kwok)
      new_wrapper kwok
      fetch kwok "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
      ;;
    helm)
      new_wrapper helm
      fetch helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
      ;;
    kubernetes)
      # The replace block must be in place before the first `go get`, or resolving fails with
      # "unknown revision v0.0.0".
      replace_block="$(k8s_replace_block)"
      new_wrapper kubernetes "
$replace_block
"
      fetch kubernetes "${K8S_PKGS[@]}"
      ;;
  esac
done

if [[ "$FETCH_ONLY" == true ]]; then
  log "modules fetched in $(since "$started"); --fetch-only: nothing compiled"
  exit 0
fi

# Phase 2: compile.
for component in "${todo[@]}"; do
  case "$component" in
    etcd)
      compile etcd "$STRIP" go.etcd.io/etcd/server/v3
      ;;
    kwok)
      compile kwok "$STRIP -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" \
        sigs.k8s.io/kwok/cmd/kwok
      ;;
    helm)
      # Stamp what helm's Makefile stamps: its own version (unstamped it says "v3.22+unreleased")
      # and the default Kubernetes version for `helm template`, derived from its client-go.
      client_go="$(cd "$SRC_DIR/helm" && go list -m -f '{{.Version}}' k8s.io/client-go)"
      client_go_minor="$(cut -d. -f2 <<<"$client_go")"
      ldflags="$STRIP -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
      ldflags+=" -X helm.sh/helm/v3/internal/version.metadata="
      ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
      for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
        ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$client_go_minor"
      done
      compile helm "$ldflags" helm.sh/helm/v3/cmd/helm
      ;;
    kubernetes)
      # Stamp the exact version, as the release build does: unstamped binaries report
      # v0.0.0-master, which clients that compare versions (helm's kubeVersion checks, kubectl's
      # skew warning) would take for an ancient server.
      minor="$(cut -d. -f2 <<<"$K8S_VERSION")"
      ldflags="$STRIP"
      for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
      done
      compile kubernetes "$ldflags" "${K8S_PKGS[@]%@*}"
      ;;
  esac
done

have "${COMPONENTS[@]}" || die "some binaries are still missing from $BIN_DIR"
log "all binaries ready in $(since "$started")"
printf '%s\n' "$BIN_DIR"
