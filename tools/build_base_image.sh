#!/bin/bash
# Build a local stand-in for python:3.11-slim-bookworm from Debian packages, for machines
# where no container registry can be reached (`buildah pull python:3.11-slim-bookworm`
# fails) but a Debian mirror can:
#
#   sudo tools/build_base_image.sh                      # -> localhost/gnpd-base:3.11-bookworm
#   sudo tools/build_base_image.sh localhost/my-base:1  # another name
#
# debootstrap puts a minimal Debian 12 (minbase: dpkg, apt, bash, coreutils, passwd) with
# Debian's python3.11, its venv module (and python3-distutils, which it needs but names only
# as a virtual package debootstrap cannot resolve) and `python` (python-is-python3) into a
# folder; buildah copies that folder into an empty image, applies bookworm-updates and
# security updates, and commits it. What the Dockerfile needs from its base is all there: `python -m venv`,
# bash, groupadd/useradd, CA certificates. Python is Debian's 3.11 in /usr/bin instead of
# python.org's in /usr/local/bin; the venv the Dockerfile builds hides the difference.
#
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), DEBIAN_SECURITY
# (default http://deb.debian.org/debian-security). Needs root, debootstrap and buildah
# (Debian: apt-get install -y debootstrap buildah).
set -euo pipefail

IMAGE=${1:-localhost/gnpd-base:3.11-bookworm}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
PACKAGES=python3.11,python3.11-venv,python3-distutils,python-is-python3,ca-certificates

for tool in debootstrap buildah; do
    command -v "$tool" >/dev/null || { echo "$0: $tool not found (apt-get install -y $tool)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "$0: debootstrap needs root" >&2; exit 2; }

workdir=$(mktemp -d /var/tmp/gnpd-base.XXXXXX)
container=""
cleanup() {
    [ -n "$container" ] && buildah rm "$container" >/dev/null 2>&1 || true
    rm -rf "$workdir"
}
trap cleanup EXIT

echo "debootstrap $SUITE ($PACKAGES) from $MIRROR" >&2
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$workdir/rootfs" "$MIRROR" >&2 || {
    tail -n 40 "$workdir/rootfs/debootstrap/debootstrap.log" >&2; exit 1; }

# The same trimming the official slim images do: no documentation, man pages or apt caches.
cat > "$workdir/rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY $SUITE-security main
EOF
rm -rf "$workdir"/rootfs/usr/share/doc/* "$workdir"/rootfs/usr/share/man/* \
       "$workdir"/rootfs/usr/share/info/* "$workdir"/rootfs/var/cache/apt/*.bin \
       "$workdir"/rootfs/var/cache/apt/archives/*.deb "$workdir"/rootfs/var/lib/apt/lists/*

container=$(buildah from --isolation chroot scratch)
mountpoint=$(buildah mount "$container")
# tar keeps owners, modes, setuid bits and hard links exactly (buildah copy would chown).
tar -C "$workdir/rootfs" --numeric-owner -cf - . | tar -C "$mountpoint" --numeric-owner -xpf -
buildah umount "$container" >/dev/null

buildah run --isolation chroot "$container" -- /bin/sh -c \
    'export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get upgrade -y -qq \
     && apt-get clean && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/*' >&2

buildah config \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 \
    --cmd python3 \
    --label org.opencontainers.image.description="Debian $SUITE minbase + python3.11 (debootstrap), built by tools/build_base_image.sh" \
    "$container"
buildah commit --rm --quiet "$container" "$IMAGE" >/dev/null
container=""
container=$(buildah from --quiet "$IMAGE")
buildah run --isolation chroot "$container" -- python -c 'import ensurepip, ssl, sys; print(sys.version)' >&2 \
    || { echo "$0: the committed image has no working python" >&2; exit 1; }
echo "$IMAGE"
