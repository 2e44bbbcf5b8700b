#!/bin/bash
# Build the gnpd image with buildah and print a Markdown report of what was built and how
# large it is (the build log goes to stderr):
#
#   nice -n 10 tools/build_image.sh > docs/results/image_size.md    # localhost/gnpd:0.1.0
#   TORCH_VARIANT=cpu tools/build_image.sh localhost/gnpd:0.1.0-cpu
#
# The base: PYTHON_IMAGE (default python:3.11-slim-bookworm, the Dockerfile's default) when
# it is in local storage or can be pulled; otherwise localhost/gnpd-base:3.11-bookworm, built
# from Debian packages by tools/build_base_image.sh if it is not there yet.
#
# Wheels: every folder of GNPD_WHEELS that exists (default: this machine's local wheelhouse,
# "/opt/pypi-more/files /opt/pypi/files", which holds torch 2.14.1 and its CUDA libraries) is
# mounted read-only into the RUN steps and passed to pip as --find-links; pip prefers a local
# file to the same file on an index, and takes the rest from PyPI. GNPD_WHEELS="" builds from
# the indexes alone, as `docker build` does.
#
# TLS: where outgoing HTTPS passes a proxy with its own CA (as on these machines), the host's
# bundle (GNPD_BUILD_CA, default $PIP_CERT) is mounted into the RUN steps as pip's PIP_CERT;
# it is not copied into the image.
#
# Needs root and buildah (Debian: apt-get install -y buildah). Layers are cached
# (--layers), so a rebuild without source changes takes seconds.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
TAG=${1:-localhost/gnpd:0.1.0}
VARIANT=${TORCH_VARIANT:-cuda}
PYTHON_IMAGE=${PYTHON_IMAGE:-python:3.11-slim-bookworm}
LOCAL_BASE=localhost/gnpd-base:3.11-bookworm
WHEELS=${GNPD_WHEELS-/opt/pypi-more/files /opt/pypi/files}
CA_BUNDLE=${GNPD_BUILD_CA:-${PIP_CERT:-}}

command -v buildah >/dev/null || { echo "$0: buildah not found (apt-get install -y buildah)" >&2; exit 2; }

has_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }

base_note="pulled from its registry"
if has_image "$PYTHON_IMAGE"; then
    base_note="already in local storage"
elif ! buildah pull --quiet "$PYTHON_IMAGE" >/dev/null 2>&1; then
    echo "$PYTHON_IMAGE cannot be pulled: using $LOCAL_BASE (Debian packages)" >&2
    has_image "$LOCAL_BASE" || "$REPO/tools/build_base_image.sh" "$LOCAL_BASE" >&2
    base_note="stand-in for $PYTHON_IMAGE, which could not be pulled; built by tools/build_base_image.sh"
    PYTHON_IMAGE=$LOCAL_BASE
fi

volumes=()
links=""
i=0
for dir in $WHEELS; do
    [ -d "$dir" ] || continue
    volumes+=(--volume "$dir:/wheels/$i:ro")
    links="${links:+$links }/wheels/$i"
    i=$((i + 1))
done

cert=""
if [ -n "$CA_BUNDLE" ] && [ -f "$CA_BUNDLE" ]; then
    volumes+=(--volume "$CA_BUNDLE:/wheels/ca-bundle.crt:ro")
    cert=/wheels/ca-bundle.crt
fi

# --format docker: the OCI image config has no HEALTHCHECK and no SHELL (buildah drops both).
start=$(date +%s)
buildah bud --isolation chroot --layers --format docker \
    --build-arg PYTHON_IMAGE="$PYTHON_IMAGE" \
    --build-arg TORCH_VARIANT="$VARIANT" \
    --build-arg PIP_FIND_LINKS="$links" \
    --build-arg PIP_CERT="$cert" \
    "${volumes[@]}" \
    --tag "$TAG" --file "$REPO/Dockerfile" "$REPO" >&2
seconds=$(( $(date +%s) - start ))

# Sizes: the image's layers, uncompressed (what a node's disk holds), and the largest parts
# of the virtual environment, measured in a working container.
mib() { echo $(( ($1 + 1048575) / 1048576 )); }
# The layer sizes in the manifest: for a locally built image, uncompressed tar sizes.
layers_bytes() {
    buildah inspect --type image "$1" | python3 -c '
import json, sys
print(sum(layer["size"] for layer in json.loads(json.load(sys.stdin)["Manifest"])["layers"]))'
}
image_bytes=$(layers_bytes "$TAG")
base_bytes=$(layers_bytes "$PYTHON_IMAGE")
container=$(buildah from --pull-never --quiet "$TAG")
trap 'buildah umount "$container" >/dev/null 2>&1; buildah rm "$container" >/dev/null 2>&1' EXIT
root=$(buildah mount "$container")
site=$(echo "$root"/opt/gnpd/lib/python3*/site-packages)
part_mib() { du -sm "$@" 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
torch_version=$(cat "$site"/torch/version.py | sed -n 's/^__version__ = .\(.*\).$/\1/p')

cat <<EOF
# gnpd container image size

Produced by \`nice -n 10 tools/build_image.sh > docs/results/image_size.md\` (buildah
$(buildah --version | awk '{print $3}'), $(date -u +%Y-%m-%d)). Sizes are uncompressed, as the
image lies on a node's disk; a registry stores its layers gzip-compressed (smaller).

| image | torch variant | torch | base image | image size | of which base | build time |
|---|---|---|---|---|---|---|
| \`$TAG\` | $VARIANT | $torch_version | \`$PYTHON_IMAGE\` ($base_note) | $(mib "$image_bytes") MiB | $(mib "$base_bytes") MiB | ${seconds} s |

Where the size goes (\`du\` inside the image, MiB):

| part | MiB |
|---|---|
| \`/opt/gnpd\` (the virtual environment) | $(part_mib "$root/opt/gnpd") |
| of which torch | $(part_mib "$site/torch") |
| of which NVIDIA CUDA libraries (\`nvidia/\`, \`cuda/\`) | $(part_mib "$site/nvidia" "$site/cuda") |
| of which triton | $(part_mib "$site/triton") |
| of which everything else | $(( $(part_mib "$root/opt/gnpd") - $(part_mib "$site/torch" "$site/nvidia" "$site/cuda" "$site/triton") )) |
| the rest of the root filesystem | $(( $(part_mib "$root") - $(part_mib "$root/opt/gnpd") )) |
EOF
