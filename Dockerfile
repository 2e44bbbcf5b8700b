# syntax=docker/dockerfile:1
# gnpd container image: the daemon (`gnpd run`) and the reference producer (`gnpd produce`).
#
#   docker build -t gnpd:0.1.0 .                                  # CUDA-capable torch (default)
#   docker build -t gnpd:0.1.0-cpu --build-arg TORCH_VARIANT=cpu .  # CPU-only torch, much smaller
#
# The default image carries PyPI's torch==2.14.1, the CUDA build: it runs on the CPU anywhere
# and on a GPU where the node has one (`docker run --gpus all`, or the k8s `gpu` overlay); the
# NVIDIA runtime only has to inject the driver. See docs/operations.md.
#
# Where no registry serves python:3.11-slim-bookworm, tools/build_image.sh builds it with
# buildah on a base made from Debian packages (tools/build_base_image.sh, passed as
# --build-arg PYTHON_IMAGE=...) and installs the wheels from a local wheelhouse
# (--volume DIR:/wheels/0:ro --build-arg PIP_FIND_LINKS=/wheels/0; PIP_CERT likewise).
# With buildah use --format docker: the OCI format drops HEALTHCHECK and SHELL.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment holding gnpd and its dependencies -------------------------
FROM ${PYTHON_IMAGE} AS build

# cuda: torch from PyPI (CUDA build, works on CPU too); cpu: torch from the PyTorch CPU index.
ARG TORCH_VARIANT=cuda
ARG TORCH_VERSION=2.14.1
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# Optional local wheel folders (space-separated) that pip reads before PyPI; pip takes the
# variable from the environment. Empty: everything comes from the indexes.
ARG PIP_FIND_LINKS=""
# Optional CA bundle for pip's HTTPS (a proxy with its own CA); empty: pip's default.
ARG PIP_CERT=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/gnpd \
    PATH=/opt/gnpd/bin:$PATH

RUN python -m venv /opt/gnpd

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# torch first and alone: the largest layer, cached across source changes. `==2.14.1` also
# matches the CPU index's `2.14.1+cpu`, so the project install below keeps the CPU build.
RUN case "${TORCH_VARIANT}" in \
      cuda) pip install --no-cache-dir "torch==${TORCH_VERSION}" ;; \
      cpu)  pip install --no-cache-dir --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}" ;; \
      *)    echo "TORCH_VARIANT must be cuda or cpu, not '${TORCH_VARIANT}'" >&2; exit 2 ;; \
    esac

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gnp/ gnp/
COPY daemon/ daemon/
COPY schemas/ schemas/
RUN pip install --no-cache-dir . \
    && python -c "import daemon, gnp, torch; print('torch', torch.__version__)"

# ---- runtime: the environment, a non-root user, and nothing from the build ------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG TORCH_VARIANT=cuda
LABEL org.opencontainers.image.title="gnpd" \
      org.opencontainers.image.description="Streaming continual-learning daemon (grow-and-prune)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.gnpd.torch-variant="${TORCH_VARIANT}"

# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can verify it and volumes can be chowned.
RUN groupadd --system --gid 10001 gnpd \
    && useradd --system --uid 10001 --gid gnpd --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin gnpd \
    && mkdir -p /var/lib/gnpd \
    && chown gnpd:gnpd /var/lib/gnpd

COPY --from=build /opt/gnpd /opt/gnpd

# Writable caches live under /tmp so the root filesystem can be read-only (k8s mounts an
# emptyDir there). NVIDIA_* let the NVIDIA container runtime expose the GPU and driver.
ENV PATH=/opt/gnpd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    GNPD_STORE__PATH=/var/lib/gnpd/store \
    GNPD_MODEL__PATH=/var/lib/gnpd/models \
    GNPD_SERVE__HOST=0.0.0.0 \
    GNPD_SERVE__PORT=8000

# One data volume: the chunk store and the checkpoints under it, set explicitly so the image
# does not depend on the daemon's defaults for where they live inside the data directory.
VOLUME ["/var/lib/gnpd"]
WORKDIR /var/lib/gnpd
USER 10001:10001
EXPOSE 8000

# slim has no curl: ask /healthz with the standard library (non-2xx raises -> exit 1).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GNPD_SERVE__PORT', '8000'), timeout=4)"]

# `docker run IMAGE` runs the daemon; `docker run IMAGE produce --dataset digits` the producer.
ENTRYPOINT ["gnpd"]
CMD ["run"]
