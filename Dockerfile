# syntax=docker/dockerfile:1
#
# edge-gateway image: two stages, so that nothing used to build the project ships in the image.
#
#   build    installs the project and its runtime dependencies (no test or load extras) into a
#            virtualenv at /opt/edge-gateway. Every dependency ships manylinux wheels for amd64 and
#            arm64, so no compiler is needed; --only-binary=:all: turns a missing wheel into a build
#            error instead of a silent source build (if that ever happens, add build-essential here,
#            in this stage only).
#   runtime  the same slim base, the virtualenv copied over, a numeric non-root user (so that
#            Kubernetes' runAsNonRoot can verify it), a default config, and a health check.
#
# Both stages use the same base tag: the virtualenv's interpreter is a symlink to
# /usr/local/bin/python3.11, which must be the same build in both.
#
#   docker build -t edge-gateway:0.1.0 .
#   docker run --rm -p 8080:8080 \
#     -e EDGE_GATEWAY__POOLS__0__ENDPOINTS='["http://10.0.0.7:30000"]' edge-gateway:0.1.0
#
# See infra/README.md for how pools are set per deployment.

FROM python:3.11.14-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/edge-gateway
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY engine_nodes ./engine_nodes
RUN /opt/edge-gateway/bin/pip install --no-cache-dir --only-binary=:all: /src


FROM python:3.11.14-slim-bookworm AS runtime

RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin gateway

COPY --from=build /opt/edge-gateway /opt/edge-gateway
COPY infra/docker/gateway.toml /etc/edge-gateway/gateway.toml

ENV PATH=/opt/edge-gateway/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001

# 8080: public listener (/v1/*, /healthz, /readyz, /metrics). 9090: admin listener, which the
# default config binds to 127.0.0.1; publish it only after binding it to 0.0.0.0 behind a firewall.
EXPOSE 8080 9090

# Liveness of the process only (/healthz), not readiness: Docker cannot take a container out of
# rotation, and /readyz also fails while no engine endpoint is healthy. slim has no curl, so the
# check uses the standard library; urlopen raises on any non-2xx answer, which exits 1.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]

ENTRYPOINT ["edge-gateway"]
CMD ["--config", "/etc/edge-gateway/gateway.toml"]
