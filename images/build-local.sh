#!/usr/bin/env bash
# Builds the repository's images HERE, without Docker or a registry: a Python base assembled from Debian
# packages (mmdebstrap), imported into buildah's local storage under the upstream name the Dockerfiles
# name (so they build unchanged), then each Dockerfile built with `buildah bud` and exported as an OCI
# archive (e.g. for `ctr -n k8s.io images import`).
#
#   images/build-local.sh [operator] [trainer] [triton]      (none named: all three)
#
# Everything lands in ${RECOPS_IMAGE_CACHE:-$HOME/.cache/recops/images}:
#   base-<key>.tar          the Debian rootfs; <key> = hash of packages + suite + options + BUILD_REV
#   <name>-<hash>.oci.tar   an image; <hash> = its Dockerfile, .dockerignore, requirements.lock, pyproject.toml,
#                           README.md, images/requirements.py, src/, kernels/, the build args, the base key
# An archive that exists is not rebuilt. The archive paths are printed on stdout (last lines); progress
# and timings go to stderr. Needs root, buildah and mmdebstrap (Debian: apt-get install buildah mmdebstrap).
#
# All three build on a CPU machine: they start from the same Python base and install torch (its CUDA build,
# which runs on CPU too) and Triton (nvidia-pytriton) from PyPI at the lock's versions. buildah's layer cache
# (--layers) keeps the dependency layers: a source change rebuilds the last layers only, and the trainer and
# Triton images share their torch layer (same instructions on the same base). The torch images are ~7 GB
# unpacked: expect a cold build of ~10 min each on 2 cores, most of it pip and layer commits.
# BUILD_ARGS="WITH_KERNELS=1 ..." passes --build-arg's to every image (and enters the hash).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${RECOPS_IMAGE_CACHE:-$HOME/.cache/recops/images}
REGISTRY=${REGISTRY:-ghcr.io/recops}
SUITE=${RECOPS_BASE_SUITE:-bookworm}
MIRROR=${RECOPS_BASE_MIRROR:-http://deb.debian.org/debian}
# Bump to force a new base (e.g. to pick up Debian point releases).
BUILD_REV=1
# The upstream image the Dockerfiles start FROM; the local base is tagged with this name.
UPSTREAM_BASE=docker.io/library/python:3.11.14-slim-bookworm
# What the Dockerfiles use from the official image: python (python-is-python3), `python -m venv` (which
# brings pip: python3-venv), TLS roots for pip (ca-certificates), /etc/services and /etc/protocols
# (netbase), libpython3.11.so.1.0 (the official Python is built --enable-shared; Triton's python backend
# stub links it). groupadd/useradd (passwd) and getent (libc-bin) are in minbase already.
BASE_PACKAGES=(python3 python3-venv python-is-python3 libpython3.11 ca-certificates netbase)
# Like the official slim images: no man pages, docs (copyright files kept), info or translations.
DPKG_OPTS=(
  'path-exclude=/usr/share/man/*'
  'path-exclude=/usr/share/doc/*'
  'path-include=/usr/share/doc/*/copyright'
  'path-exclude=/usr/share/info/*'
  'path-exclude=/usr/share/locale/*'
)
# The official image's environment: the Dockerfiles extend ${PATH}, so it must be set.
BASE_ENV=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8)

declare -A FOLDERS=([operator]=operator [trainer]=trainer_image [triton]=triton_image)

log() { printf '[build-local %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

check_tools() {
  local tool
  for tool in buildah mmdebstrap sha256sum; do
    command -v "$tool" >/dev/null || die "needs $tool (Debian: apt-get install buildah mmdebstrap)"
  done
  [[ $(id -u) == 0 ]] || die "needs root (mmdebstrap --mode=root, buildah --isolation chroot)"
}

read_version() {
  VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$REPO/src/recops/__init__.py")
  [[ -n $VERSION ]] || die "no __version__ in src/recops/__init__.py"
}

base_key() {
  printf '%s\n' "rev=$BUILD_REV" "suite=$SUITE" "mirror=$MIRROR" "${BASE_PACKAGES[@]}" "${DPKG_OPTS[@]}" \
    "${BASE_ENV[@]}" | sha256sum | cut -c1-16
}

# a. The Debian rootfs, built once per key.
build_base_tar() {
  BASE_TAR=$CACHE/base-$BASE_KEY.tar
  if [[ -f $BASE_TAR ]]; then
    log "base: cached $BASE_TAR"
    return
  fi
  local start opts=() opt
  start=$(now)
  for opt in "${DPKG_OPTS[@]}"; do opts+=("--dpkgopt=$opt"); done
  log "base: mmdebstrap $SUITE with ${BASE_PACKAGES[*]} (a few minutes)"
  rm -f "$CACHE/.base-$BASE_KEY.partial.tar"
  mmdebstrap --mode=root --format=tar --variant=minbase --components=main \
    --include="$(IFS=,; echo "${BASE_PACKAGES[*]}")" "${opts[@]}" \
    "$SUITE" "$CACHE/.base-$BASE_KEY.partial.tar" "$MIRROR" >&2
  mv "$CACHE/.base-$BASE_KEY.partial.tar" "$BASE_TAR"
  log "base: built $BASE_TAR ($(du -h "$BASE_TAR" | cut -f1)) in $(elapsed "$start") s"
}

# b. The rootfs as an image in buildah's storage, tagged with the upstream name the Dockerfiles use.
import_base() {
  local image=localhost/recops/base:$BASE_KEY start ctx env
  if ! buildah inspect --type image "$image" >/dev/null 2>&1; then
    start=$(now)
    ctx=$(mktemp -d)
    ln "$BASE_TAR" "$ctx/base.tar" 2>/dev/null || cp "$BASE_TAR" "$ctx/base.tar"
    {
      echo "FROM scratch"
      echo "ADD base.tar /"
      for env in "${BASE_ENV[@]}"; do echo "ENV $env"; done
      echo 'CMD ["python3"]'
    } >"$ctx/Containerfile"
    log "base: importing as $image"
    buildah bud --isolation chroot --quiet -f "$ctx/Containerfile" -t "$image" "$ctx" >/dev/null
    rm -rf "$ctx"
    log "base: imported in $(elapsed "$start") s"
  fi
  buildah tag "$image" "$UPSTREAM_BASE"
  log "base: $UPSTREAM_BASE -> $image (local storage only: it shadows the upstream image here)"
}

# The inputs of an image: its Dockerfile, what .dockerignore lets in, the base.
image_hash() {
  local folder=$1
  (
    cd "$REPO"
    echo "base=$BASE_KEY version=$VERSION build-args=${BUILD_ARGS:-}"
    find "$folder/Dockerfile" .dockerignore requirements.lock pyproject.toml README.md images/requirements.py src \
      $([[ -d kernels ]] && echo kernels) \
      -type f ! -path '*/__pycache__/*' ! -name '*.py[cod]' ! -name '*.so' ! -path '*.egg-info/*' \
      ! -path '*/build/*' ! -path '*/dist/*' ! -path '*/.pytest_cache/*' ! -path '*/.ruff_cache/*' -print0 \
      | LC_ALL=C sort -z | xargs -0 sha256sum
  ) | sha256sum | cut -c1-16
}

# c. + d. Build one image from the repository's Dockerfile and export it as an OCI archive.
build_image() {
  local name=$1 folder=${FOLDERS[$1]} ref hash archive start arg build_args=()
  ref=$REGISTRY/$name:$VERSION
  hash=$(image_hash "$folder")
  archive=$CACHE/$name-$hash.oci.tar
  if [[ -f $archive ]]; then
    log "$name: cached $archive"
    # Point the name in local storage back at this build too (another source state may have moved it).
    if buildah inspect --type image "localhost/recops/$name:$hash" >/dev/null 2>&1; then
      buildah tag "localhost/recops/$name:$hash" "$ref"
    else
      log "$name: not in local storage; $ref there may be another build (the archive is this one)"
    fi
    ARCHIVES+=("$archive")
    return
  fi
  start=$(now)
  log "$name: buildah bud -f $folder/Dockerfile -t $ref (context $REPO)"
  # The host's CA bundle is bind-mounted for the RUN steps only (pip behind a TLS-intercepting proxy
  # needs the proxy's CA); it does not end up in the image.
  for arg in ${BUILD_ARGS:-}; do build_args+=(--build-arg "$arg"); done
  buildah bud --isolation chroot --layers --build-arg "VERSION=$VERSION" "${build_args[@]}" \
    -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    -f "$REPO/$folder/Dockerfile" -t "$ref" "$REPO" >&2
  buildah tag "$ref" "localhost/recops/$name:$hash"
  log "$name: built in $(elapsed "$start") s"
  start=$(now)
  rm -f "$archive.partial"
  buildah push --quiet "$ref" "oci-archive:$archive.partial:$ref" >&2
  mv "$archive.partial" "$archive"
  log "$name: exported $archive ($(du -h "$archive" | cut -f1)) in $(elapsed "$start") s"
  prune_older "$name" "$hash"
  ARCHIVES+=("$archive")
}

# Keep one build per image: every source change makes a new 3.4 GB trainer and Triton archive, and CI once ran
# out of disk after a day of them. The older archives go, with their tags in local storage and the layers
# only they used (the dependency layers the new build shares stay: they are its parents).
prune_older() {
  local name=$1 hash=$2 old old_hash
  for old in "$CACHE/$name"-*.oci.tar; do
    [[ -f $old && $old != "$CACHE/$name-$hash.oci.tar" ]] || continue
    old_hash=${old##*/$name-}
    old_hash=${old_hash%.oci.tar}
    rm -f "$old"
    buildah rmi "localhost/recops/$name:$old_hash" >/dev/null 2>&1 || true
    log "$name: removed the older build $old_hash"
  done
  buildah rmi --prune >/dev/null 2>&1 || true
}

main() {
  local name total
  [[ $# -gt 0 ]] || set -- operator trainer triton
  for name in "$@"; do [[ -n ${FOLDERS[$name]:-} ]] || die "unknown image $name (operator, trainer, triton)"; done
  total=$(now)
  check_tools
  read_version
  mkdir -p "$CACHE"
  # buildah stages a pushed image's blobs in $TMPDIR (default /var/tmp: ~5 GB for the trainer); a failed or
  # killed push left them there. Stage them beside the cache, and remove them whatever happens.
  export TMPDIR=$CACHE/.tmp
  rm -rf "$TMPDIR" && mkdir -p "$TMPDIR"
  trap 'rm -rf "$TMPDIR"' EXIT
  BASE_KEY=$(base_key)
  build_base_tar
  import_base
  ARCHIVES=()
  for name in "$@"; do build_image "$name"; done
  log "done in $(elapsed "$total") s"
  printf '%s\n' "${ARCHIVES[@]}"
}

main "$@"
