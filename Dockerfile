# syntax=docker/dockerfile:1
# gts-sidecar image: a wheel built with compilers in the build stage; the final stage has the
# Python runtime and the installed wheels only (no compilers, no build tools, no sources).
#
#   docker build -t gts-sidecar:0.1.0 .
#   docker run --rm -p 17006:17006 -p 17090:17090 gts-sidecar:0.1.0          # example config
#   docker run --rm -v "$PWD/my.yaml:/tmp/c.yaml:ro" gts-sidecar:0.1.0 check-config /tmp/c.yaml
#
# Kubernetes: deploy/k8s (the config comes from a ConfigMap at /etc/gts-sidecar, the journal
# directory from a volume at /var/lib/gts-sidecar).

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: wheels for gts-sidecar and every dependency ------------------------------------
FROM ${PYTHON_IMAGE} AS build
# compilers, for dependencies without a prebuilt wheel on this platform (httptools, uvloop,
# aiohttp's and orjson's extensions ship wheels for the common ones)
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime -------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# the wheels are bind-mounted from the build stage, so they never become a layer of this image
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links=/wheels gts-sidecar \
 && groupadd --system --gid 10001 gts \
 && useradd --system --uid 10001 --gid gts --no-create-home --home-dir /var/lib/gts-sidecar \
      --shell /usr/sbin/nologin gts \
 && mkdir -p /etc/gts-sidecar /var/lib/gts-sidecar \
 && chown gts:gts /var/lib/gts-sidecar
# the documented example config; Kubernetes mounts its ConfigMap over /etc/gts-sidecar
COPY --chown=root:root config/sidecar.yaml /etc/gts-sidecar/sidecar.yaml
# the journal (local_coordinator.journal; the example's relative sqlite:///var/journal.db
# lands here), the fence and the global locks: writable, and a volume
WORKDIR /var/lib/gts-sidecar
VOLUME ["/var/lib/gts-sidecar"]
# numeric, so Kubernetes' runAsNonRoot can check it
USER 10001:10001
# inbound, peer, admin (listeners.*.bind defaults); outbound 17001 and api 17000 are
# loopback-only, for the app in the same pod
EXPOSE 17006 17020 17090
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:17090/healthz', timeout=1)"]
ENTRYPOINT ["gts-sidecar"]
CMD ["run", "--config", "/etc/gts-sidecar/sidecar.yaml"]
