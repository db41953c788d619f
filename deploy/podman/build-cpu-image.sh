#!/usr/bin/env bash
# Build the Dockerfile's `cpu` target with podman where no image registry is
# reachable (only package mirrors): the Python base image is made locally with
# debootstrap and `podman import`, then the Dockerfile builds on it.
#
#   deploy/podman/build-cpu-image.sh              # -> localhost/llmgrpc:0.1.0-cpu
#
# Environment (all optional):
#   IMAGE            image to build             (localhost/llmgrpc:0.1.0-cpu)
#   BASE_IMAGE       local Debian+Python base   (localhost/llmgrpc-base:bookworm)
#   DEBIAN_MIRROR    apt mirror for debootstrap (http://deb.debian.org/debian)
#   WHEEL_DIR        directory of wheels to offer pip, e.g. one holding
#                    torch-2.13.0+cpu (mounted read-only into the build; default
#                    /opt/wheels when it exists)
#   TORCH_INDEX_URL  PyTorch CPU index; empty (the default here) when WHEEL_DIR
#                    or the pip indexes provide torch +cpu
#   CA_BUNDLE        CA bundle pip trusts inside the build, for a TLS-intercepting
#                    proxy in front of the index (default: $PIP_CERT, else the
#                    host's /etc/ssl/certs/ca-certificates.crt); mounted read-only,
#                    not copied into the image
#   REBUILD_BASE=1   rebuild the base image even if it exists
#   PODMAN_RUNTIME   OCI runtime for the RUN steps, set through a temporary
#                    CONTAINERS_CONF (podman 4.3's `build --runtime` still runs
#                    crun). Default: runc when the host has a hybrid cgroup
#                    v1/v2 layout with controllers on v2, which crun refuses.
#   PODMAN_ULIMITS   ulimits for the RUN steps (nofile=16384:16384 nproc=16384:16384):
#                    rootful podman otherwise raises nofile/nproc to the
#                    maximum, which fails where root lacks CAP_SYS_RESOURCE
# Needs root (debootstrap, rootful podman), podman and debootstrap.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
IMAGE="${IMAGE:-localhost/llmgrpc:0.1.0-cpu}"
BASE_IMAGE="${BASE_IMAGE:-localhost/llmgrpc-base:bookworm}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
WHEEL_DIR="${WHEEL_DIR:-$( [ -d /opt/wheels ] && echo /opt/wheels || true )}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
PODMAN_ULIMITS="${PODMAN_ULIMITS:-nofile=16384:16384 nproc=16384:16384}"
CA_BUNDLE="${CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
if [ -z "${PODMAN_RUNTIME:-}" ] && grep -qs . /sys/fs/cgroup/unified/cgroup.controllers \
   && command -v runc >/dev/null; then
  PODMAN_RUNTIME=runc
fi
if [ -n "${PODMAN_RUNTIME:-}" ] && [ -z "${CONTAINERS_CONF:-}" ]; then
  CONTAINERS_CONF="$(mktemp --suffix=.conf)"
  printf '[engine]\nruntime = "%s"\n' "$PODMAN_RUNTIME" > "$CONTAINERS_CONF"
  export CONTAINERS_CONF
fi

for tool in podman debootstrap; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install $tool)" >&2; exit 2; }
done

# 1. Base image: Debian bookworm (Python 3.11, like python:3.11-slim-bookworm)
#    with what the Dockerfile's stages call: python3 -m venv, apt-get, useradd.
if [ "${REBUILD_BASE:-0}" = 1 ] || ! podman image exists "$BASE_IMAGE"; then
  rootfs="$(mktemp -d)"
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$DEBIAN_MIRROR"
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE"
  rm -rf "$rootfs"
  trap - EXIT
fi

# 2. The cpu target. --format docker keeps the HEALTHCHECK (OCI has none);
#    --network host lets pip and apt use the host's route to the mirrors.
build_args=(
  --format docker --network host --target cpu
  --build-arg "PYTHON_IMAGE=$BASE_IMAGE"
  --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL"
  --tag "$IMAGE"
)
for limit in $PODMAN_ULIMITS; do build_args+=(--ulimit "$limit"); done
if [ -f "$CA_BUNDLE" ]; then
  build_args+=(--volume "$CA_BUNDLE:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
fi
if [ -n "$WHEEL_DIR" ]; then
  build_args+=(--volume "$WHEEL_DIR:/wheels-host:ro" --build-arg PIP_FIND_LINKS=/wheels-host)
fi
podman build "${build_args[@]}" "$ROOT"
echo "built $IMAGE"
