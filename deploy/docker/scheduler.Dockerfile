# syntax=docker/dockerfile:1.7
# facefleet scheduler. Build from the repository root:
#   docker build -f deploy/docker/scheduler.Dockerfile -t facefleet-scheduler:0.1.0 .
# Everything is installed at build time; the container needs no network except its own gRPC peers.
# Run: mount mTLS material read-only at /etc/facefleet/tls (ca.pem, scheduler.pem, scheduler-key.pem)
# and keep /var/lib/facefleet (SQLite store, audit log) on a volume, or point
# FACEFLEET_SCHEDULER__STORE_URL at PostgreSQL for HA.
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm
# checkov:skip=CKV_DOCKER_7:FROM uses ${PYTHON_IMAGE}, pinned to a version tag by the ARG above (checkov does not resolve build args)

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/facefleet
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY facefleet ./facefleet
COPY scheduler ./scheduler
COPY agent ./agent
COPY policies ./policies
RUN /opt/facefleet/bin/pip install --no-cache-dir .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="facefleet-scheduler" \
      org.opencontainers.image.description="facefleet scheduling control plane (gRPC :50051, metrics :9464)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 facefleet \
    && useradd --system --uid 10001 --gid facefleet --home-dir /var/lib/facefleet --create-home \
       --shell /usr/sbin/nologin facefleet
COPY --from=build /opt/facefleet /opt/facefleet
COPY policies /etc/facefleet/policies
ENV PATH=/opt/facefleet/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FACEFLEET_DATA_DIR=/var/lib/facefleet \
    FACEFLEET_SCHEDULER__LISTEN=0.0.0.0:50051 \
    FACEFLEET_SCHEDULER__STORE_URL=sqlite:////var/lib/facefleet/facefleet.db \
    FACEFLEET_POLICY__DIR=/etc/facefleet/policies/default \
    FACEFLEET_TLS__DIR=/etc/facefleet/tls \
    FACEFLEET_AUDIT__PATH=/var/lib/facefleet/audit.jsonl
WORKDIR /var/lib/facefleet
VOLUME ["/var/lib/facefleet"]
USER 10001:10001
EXPOSE 50051 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "facefleet.healthcheck", "scheduler"]
ENTRYPOINT ["facefleet"]
CMD ["scheduler", "run"]
