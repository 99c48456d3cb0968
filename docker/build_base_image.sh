#!/usr/bin/env bash
# Build a minimal Debian bookworm + Python 3.11 base image locally (no registry needed) and load it into Docker.
#
#   docker/build_base_image.sh [TAG]        (default TAG: lesionlab-base:bookworm-py311)
#
# debootstrap downloads ~60 MB of .debs from the Debian mirror once; the root file system is cached as a tarball
# (LESIONLAB_BASE_CACHE, default /var/cache/lesionlab/base-bookworm-py311.tar) so later runs only `docker import` it.
# Needs root (debootstrap chroots), debootstrap and a running Docker engine.
set -euo pipefail

TAG="${1:-lesionlab-base:bookworm-py311}"
SUITE="${LESIONLAB_BASE_SUITE:-bookworm}"
MIRROR="${LESIONLAB_BASE_MIRROR:-http://deb.debian.org/debian}"
CACHE="${LESIONLAB_BASE_CACHE:-/var/cache/lesionlab/base-${SUITE}-py311.tar}"
# python3-venv gives `python3 -m venv` + ensurepip; ca-certificates lets pip use HTTPS indexes.
PACKAGES="python3,python3-venv,ca-certificates"

log() { echo "[build_base_image] $*" >&2; }

if docker image inspect "$TAG" >/dev/null 2>&1 && [ "${LESIONLAB_BASE_REBUILD:-0}" != "1" ]; then
    log "image $TAG already present (set LESIONLAB_BASE_REBUILD=1 to rebuild)"
    exit 0
fi

if [ ! -s "$CACHE" ] || [ "${LESIONLAB_BASE_REBUILD:-0}" = "1" ]; then
    command -v debootstrap >/dev/null || { log "debootstrap not found; install it with: apt-get install -y debootstrap"; exit 1; }
    [ "$(id -u)" = "0" ] || { log "debootstrap needs root (it chroots into the new file system); run as root"; exit 1; }
    rootfs="$(mktemp -d /tmp/lesionlab-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' EXIT
    log "debootstrap --variant=minbase $SUITE into $rootfs (a few minutes)"
    if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1; then
        tail -n 20 "$rootfs.log" >&2
        log "debootstrap failed (full log: $rootfs.log); check that $MIRROR is reachable"
        exit 1
    fi
    rm -f "$rootfs.log"
    # Slim it: package caches, apt lists, docs, man pages and locales are not needed at run time.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
           "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
           "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old
    mkdir -p "$(dirname "$CACHE")"
    tar --numeric-owner -C "$rootfs" -cf "$CACHE.partial" .
    mv "$CACHE.partial" "$CACHE"
    log "cached root file system at $CACHE ($(du -h "$CACHE" | cut -f1))"
fi

log "docker import $CACHE as $TAG"
docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    "$CACHE" "$TAG" >&2
docker image ls "$TAG" >&2
