# syntax=docker/dockerfile:1.7
# facefleet GPU agent: the swap pipeline on ONNX Runtime (TensorRT -> CUDA -> CPU) plus ffmpeg.
# Build from the repository root:
#   docker build -f deploy/docker/agent.Dockerfile -t facefleet-agent:0.1.0 .
# Everything is installed at build time; no weights and no packages are fetched at run time.
# Run with the GPU and the model directory mounted read-only:
#   docker run --gpus all -v "$PWD/models:/models:ro" -v "$PWD/var/certs:/etc/facefleet/tls:ro" \
#     -v agent-data:/data facefleet-agent:0.1.0 agent run --pool onprem-a --trust-zone private ...
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
# checkov:skip=CKV_DOCKER_7:FROM uses ${CUDA_IMAGE}, pinned to a version tag by the ARG above (checkov does not resolve build args)

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3 -m venv /opt/facefleet
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY facefleet ./facefleet
COPY scheduler ./scheduler
COPY agent ./agent
COPY policies ./policies
# [gpu] = onnxruntime-gpu + NVML; never the CPU onnxruntime next to it (they share one import).
RUN /opt/facefleet/bin/pip install --no-cache-dir ".[gpu]"

FROM ${CUDA_IMAGE}
LABEL org.opencontainers.image.title="facefleet-agent" \
      org.opencontainers.image.description="facefleet GPU face-swap agent (gRPC :50061, metrics :9465)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ffmpeg ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 facefleet \
    && useradd --system --uid 10001 --gid facefleet --home-dir /var/lib/facefleet --create-home \
       --shell /usr/sbin/nologin facefleet \
    && install -d -o facefleet -g facefleet /data /models
COPY --from=build /opt/facefleet /opt/facefleet
ENV PATH=/opt/facefleet/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FACEFLEET_DATA_DIR=/var/lib/facefleet \
    FACEFLEET_AGENT__LISTEN=0.0.0.0:50061 \
    FACEFLEET_AGENT__MODELS_DIR=/models \
    FACEFLEET_AGENT__WORK_DIR=/var/lib/facefleet/work \
    FACEFLEET_AGENT__ALLOWED_ROOTS='["/data"]' \
    FACEFLEET_TLS__DIR=/etc/facefleet/tls
WORKDIR /var/lib/facefleet
# /models is mounted read-only (`-v ./models:/models:ro`): the agent verifies the sha256 manifest
# and never writes there. /data holds task inputs/outputs; /var/lib/facefleet holds checkpoints.
VOLUME ["/models", "/data", "/var/lib/facefleet"]
USER 10001:10001
EXPOSE 50061 9465
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "facefleet.healthcheck", "agent"]
ENTRYPOINT ["facefleet"]
CMD ["agent", "run"]
