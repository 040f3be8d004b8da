# medinfer HTTP API. CPU image by default:
#   docker build -t medinfer:cpu .
# CUDA variant (see docs/serving.md):
#   docker build -t medinfer:cuda \
#     --build-arg BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/medinfer \
    PATH=/opt/medinfer/bin:$PATH \
    MEDINFER_JOB_STORE=/var/lib/medinfer
# no MEDINFER_MODEL / MEDINFER_DEVICE here: the defaults (bundled demo-brain, auto) apply,
# and `docker run -e MEDINFER_MODEL` or the UNet3D names (`-e UNET3D_MODEL_PATH=
# /models/unet3d_best.pt -v /path/to/checkpoints:/models`, UNET3D_DEVICE ...) choose
# another model without a conflict between the two names (docs/compat/unet3d.md)

# CUDA bases are plain Ubuntu: bring Python 3.11 in; python:3.11-slim already has it.
RUN if ! command -v python3.11 >/dev/null 2>&1; then \
        apt-get update && \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3.11 python3.11-venv ca-certificates && \
        rm -rf /var/lib/apt/lists/*; \
    fi && \
    python3.11 -m venv /opt/medinfer && \
    groupadd --system medinfer && \
    useradd --system --gid medinfer --home-dir /var/lib/medinfer --shell /usr/sbin/nologin medinfer && \
    mkdir -p /var/lib/medinfer && chown medinfer:medinfer /var/lib/medinfer

RUN pip install --upgrade pip && \
    pip install --index-url ${TORCH_INDEX} "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[serve,onnx]" && \
    mkdir -p /opt/medinfer-zoo && cp -r src/medinfer/models/zoo/. /opt/medinfer-zoo/ && \
    rm -rf /src
# the bundled models (model.yaml + weights) are also copied to /opt/medinfer-zoo (they are
# package data too). Mount another model folder (or a weights file with its model.yaml) and
# set MEDINFER_MODEL or UNET3D_MODEL_PATH to serve it.

USER medinfer
WORKDIR /var/lib/medinfer
VOLUME ["/var/lib/medinfer"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=4).status == 200 else 1)"]

CMD ["medinfer", "serve", "--host", "0.0.0.0", "--port", "8000"]
