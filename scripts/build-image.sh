#!/usr/bin/env bash
# Build the llmproxy container image with buildah, no Docker engine needed.
#
#   scripts/build-image.sh                       FROM python:3.12-slim (pulled)
#   scripts/build-image.sh --debootstrap         FROM a local Debian bookworm base
#                                                made with debootstrap (no registry)
#   scripts/build-image.sh --base IMAGE --tag llmproxy:0.1.0
#
# Options:
#   --tag IMAGE        the image to build (default localhost/llmproxy:dev)
#   --base IMAGE       the Dockerfile's BASE (default python:3.12-slim)
#   --debootstrap      build (once) and use localhost/llmproxy-base:bookworm, a
#                      minimal Debian bookworm with python3 and python3-venv
#   --rebuild-base     with --debootstrap: make the base again even if it exists
#
# Environment:
#   DEBIAN_MIRROR      debootstrap's mirror (default http://deb.debian.org/debian)
#   BUILD_CA_BUNDLE    a CA bundle for pip inside the build, for networks that
#                      intercept TLS (default: $PIP_CERT when set)
#   BUILDAH_ISOLATION  buildah's isolation (default chroot, which works inside
#                      containers and unprivileged sandboxes)
#
# Needs root (or a rootless buildah setup) and: buildah; debootstrap for
# --debootstrap. On Debian: apt-get install buildah debootstrap.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
tag=localhost/llmproxy:dev
base=python:3.12-slim
debootstrap_base=0
rebuild_base=0
local_base=localhost/llmproxy-base:bookworm

while (($#)); do
    case $1 in
        --tag) tag=$2; shift 2 ;;
        --base) base=$2; shift 2 ;;
        --debootstrap) debootstrap_base=1; shift ;;
        --rebuild-base) rebuild_base=1; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-image.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done

export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
ca_bundle=${BUILD_CA_BUNDLE:-${PIP_CERT:-}}
started=$SECONDS
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A Debian bookworm root filesystem with just enough Python for the Dockerfile:
# python3 (3.11, which satisfies requires-python) and its venv module.
make_base() {
    local rootfs=$work/rootfs ctr
    echo "build-image.sh: debootstrap bookworm into $rootfs" >&2
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >&2
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" --numeric-owner -cf "$work/rootfs.tar" .

    ctr=$(buildah from scratch)
    buildah add "$ctr" "$work/rootfs.tar" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd python3 "$ctr"
    buildah commit --rm "$ctr" "$local_base" >/dev/null
}

if ((debootstrap_base)); then
    if ((rebuild_base)) || ! buildah inspect --type image "$local_base" >/dev/null 2>&1; then
        make_base
        echo "build-image.sh: base $local_base made in $((SECONDS - started))s" >&2
    fi
    base=$local_base
fi

args=(--file "$repo/Dockerfile" --tag "$tag" --build-arg "BASE=$base"
    --format docker --layers)
if [[ -n $ca_bundle ]]; then
    # Mounted for the RUN steps only; nothing of it lands in a layer.
    args+=(--volume "$(dirname "$ca_bundle"):/run/build-ca:ro"
        --build-arg "PIP_CERT=/run/build-ca/$(basename "$ca_bundle")")
fi

buildah build "${args[@]}" "$repo" >&2
echo "build-image.sh: built $tag FROM $base in $((SECONDS - started))s" >&2
echo "$tag"
