#!/usr/bin/env bash
# Builds the image tessera's containers start FROM, without any image registry: a Debian
# bookworm minbase rootfs made with debootstrap (from the machine's own Debian mirror), with
# python3 + pip (for `tessera model pull`) and a non-root user, imported with `docker import`.
#
# Usage: scripts/make-base-image.sh [TAG]    (default tessera-base:bookworm-1; idempotent)
# Needs: root (debootstrap), docker. Pinned: bookworm, the package set below, and the tag.
set -euo pipefail
tag=${1:-tessera-base:bookworm-1}
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag exists"
  exit 0
fi
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
mirror=${DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
mirror=${mirror:-http://deb.debian.org/debian}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm from $mirror into $root" >&2
debootstrap --variant=minbase --include=ca-certificates,python3,python3-pip \
  bookworm "$root" "$mirror" >/dev/null
chroot "$root" useradd --uid 10001 --user-group --create-home --home-dir /var/lib/tessera tessera
# Nothing a running container needs: package caches, docs, man pages.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
  "$root"/usr/share/doc/* "$root"/usr/share/man/*
tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' \
  --change 'ENV TESSERA_HOME=/var/lib/tessera' - "$tag" >/dev/null
echo "$tag built ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MiB", $1/1048576}'))"
