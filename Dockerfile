# lesionlab: the web app (`lesionlab serve`) and the pipeline CLI in one image.
#
#   CPU (default):  docker build -t lesionlab .
#   GPU (CUDA 12.8): docker build -t lesionlab:cu128 --build-arg TORCH_VARIANT=cu128 .
#   Offline/locally built base: see docs/deployment.md and scripts/docker_smoke.sh.
#
# BASE_IMAGE must provide Python 3.11 as `python3` with the venv module (python:3.11-slim-bookworm, or the
# debootstrapped base from docker/build_base_image.sh). The CUDA torch wheels carry their own CUDA libraries, so the
# GPU image needs no CUDA base image: only the host driver, passed in by `docker run --gpus all`.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------------------
# builder: a virtual environment with every pinned runtime dependency from requirements.lock
FROM ${BASE_IMAGE} AS builder

# torch build: cpu, or a CUDA build such as cu128 / cu126 (wheels from TORCH_INDEX_URL).
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
# Where pip finds everything else (the usual PIP_* settings). For a local mirror or wheelhouse, build with
# `--network host --build-arg PIP_INDEX_URL=...` or `--build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=http://...`.
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_FIND_LINKS=
ARG PIP_NO_INDEX=0
ARG PIP_TRUSTED_HOST=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DEFAULT_TIMEOUT=120

SHELL ["/bin/sh", "-eu", "-c"]

COPY requirements.lock /tmp/build/requirements.lock
COPY docker/dev-only.txt docker/venv-pins.txt docker/runtime_lock.sh /tmp/build/

# pip/setuptools pins; torch (CUDA dependencies, if any, from the torch index; its other dependencies held to the
# lock); the other pinned packages without resolution (the lock is a complete `pip freeze`); `pip check`. Test suites, torch's test binaries and C++ headers are never used at run time (~250 MB).
WORKDIR /tmp/build
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --only-binary=:all: --requirement venv-pins.txt \
    && sh runtime_lock.sh requirements.lock dev-only.txt > runtime.lock \
    && torch_version="$(sed -n 's/^torch==\([^+]*\).*/\1/p' requirements.lock)" \
    && test -n "$torch_version" \
    && /opt/venv/bin/pip install --only-binary=:all: --constraint runtime.lock --constraint venv-pins.txt \
        --extra-index-url "$TORCH_INDEX_URL" "torch==${torch_version}+${TORCH_VARIANT}" \
    && /opt/venv/bin/pip install --only-binary=:all: --no-deps --requirement runtime.lock \
    && /opt/venv/bin/pip check \
    && find /opt/venv/lib/python3.11/site-packages -type d -name tests -prune -exec rm -rf {} + \
    && rm -rf /opt/venv/lib/python3.11/site-packages/torch/test /opt/venv/lib/python3.11/site-packages/torch/include

# The source goes on the venv's path with a .pth file (what `pip install -e` does), so no build backend is needed in
# the image; `lesionlab` is docker/launcher.py (`pipelines.cli:main`). /opt/venv is final before the source is copied,
# so a source change leaves the venv layers cached.
COPY docker/launcher.py /opt/venv/bin/lesionlab
RUN echo /app > /opt/venv/lib/python3.11/site-packages/lesionlab.pth \
    && chmod 0755 /opt/venv/bin/lesionlab

# The source and the default bundle (models/default_bundle).
WORKDIR /app
COPY pipelines /app/pipelines
COPY models /app/models
COPY app /app/app
COPY configs /app/configs
COPY docker/entrypoint.sh docker/healthcheck.py /app/docker/
RUN chmod 0755 /app/docker/entrypoint.sh \
    && /opt/venv/bin/python -m compileall -q /app \
    && /opt/venv/bin/lesionlab --help > /dev/null

# ---------------------------------------------------------------------------------------------------------------
# runtime: the environment and the source, a non-root user, nothing else
FROM ${BASE_IMAGE} AS runtime

ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="lesionlab" \
      org.opencontainers.image.description="Imbalance-aware dermoscopy and pathology image classification: web app and pipeline CLI" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.lesionlab.torch-variant="${TORCH_VARIANT}"

# Offline and private: no telemetry, no hub downloads, bytecode already compiled.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/lesionlab \
    MPLCONFIGDIR=/home/lesionlab/.config/matplotlib \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TRANSFORMERS_OFFLINE=1 \
    DIFFUSERS_OFFLINE=1 \
    DO_NOT_TRACK=1 \
    NO_ALBUMENTATIONS_UPDATE=1 \
    LESIONLAB_PORT=7860

RUN groupadd --gid 10001 lesionlab \
    && useradd --no-log-init --uid 10001 --gid lesionlab --home-dir /home/lesionlab --create-home \
        --shell /usr/sbin/nologin lesionlab \
    && mkdir -p /models /runs \
    && chown lesionlab:lesionlab /models /runs

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app

# numeric, so that `runAsNonRoot` checks and the host can resolve it
USER 10001:10001
# Build matplotlib's font cache now rather than on every container start.
RUN python3 -c "import matplotlib.font_manager"
WORKDIR /runs
# Extra model bundles (`--models /models` or LESIONLAB_MODELS=/models) and everything runs write.
VOLUME ["/models", "/runs"]
EXPOSE 7860

HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python3", "/app/docker/healthcheck.py"]

ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["serve", "--host", "0.0.0.0"]
