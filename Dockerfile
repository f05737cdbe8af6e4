# gts-sidecar image: the sidecar (`run`), the standalone coordinator (`coordinator`) and the
# injector webhook (`injector`), from the dependencies pinned in requirements.lock.
#
#   docker build -t gts-sidecar:0.1.0 .          # classic builder, BuildKit, podman, buildah
#   docker run --rm -p 17006:17006 -p 17090:17090 gts-sidecar:0.1.0          # example config
#   docker run --rm -v "$PWD/my.yaml:/tmp/c.yaml:ro" gts-sidecar:0.1.0 check-config /tmp/c.yaml
#   scripts/image.sh                 # podman build + a smoke test of the container; no registry
#                                    # needed (its base is made locally with debootstrap)
#
# Plain instructions only, so every builder builds it the same way: no parser directive (a
# `# syntax=` line makes BuildKit fetch a frontend image) and no RUN --mount (not in the
# classic builder). Every dependency is installed as a wheel, checked against the lock's
# hashes. The one thing compiled is gts-sidecar's own request path (mypyc, setup.py with
# GTS_SIDECAR_COMPILE=1), in the build stage, the only one with a C compiler; the image
# runs that compiled build (`gts-sidecar --version` says "compiled"), with no compiler.
# Kubernetes: deploy/k8s (the config comes from a ConfigMap at /etc/gts-sidecar, the journal
# directory from a volume at /var/lib/gts-sidecar).

# Any Debian-like image with Python 3.11 and its venv module: python:3.11-slim, or a local
# Debian bookworm base with python3 and python3-venv (scripts/image.sh makes one). The lock
# pins everything installed on top; for the base too to stay the same, give it by digest
# (--build-arg PYTHON_IMAGE=python:3.11-slim@sha256:...).
ARG PYTHON_IMAGE=python:3.11-slim

# --- build: one virtual environment with everything installed ------------------------------
FROM ${PYTHON_IMAGE} AS build
# Where the wheels come from, and (behind a TLS-intercepting proxy) the CA bundle that
# verifies it: a path inside the build, e.g. mounted with `podman build --volume`
# (scripts/image.sh passes the host's). Build stage only: neither reaches the image.
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_CERT=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# mypyc's C compiler (and Python's headers where the base has none: a Debian python3 base;
# python:3.11-slim ships them), for this stage only
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends gcc libc6-dev \
 && { python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
      || apt-get install -y -qq --no-install-recommends python3-dev; } \
 && rm -rf /var/lib/apt/lists/*
# the environment the image runs, and the compiler's own (mypy, setuptools), apart
RUN python3 -m venv /opt/gts-sidecar && python3 -m venv /opt/gts-build
# the locks first: their layers are reused until a lock changes
COPY requirements.lock requirements-build.lock /tmp/
# --only-binary: a dependency without a wheel for this platform fails the build instead of
# quietly needing a compiler; --require-hashes: exactly the files the lock names
RUN /opt/gts-sidecar/bin/pip install --require-hashes --only-binary=:all: --no-deps \
      -r /tmp/requirements.lock
RUN /opt/gts-build/bin/pip install --require-hashes --only-binary=:all: --no-deps \
      -r /tmp/requirements-build.lock
COPY pyproject.toml setup.py README.md /src/
COPY sidecar /src/sidecar
# gts-sidecar itself, its request path compiled by mypyc (which type-checks it against the
# dependencies installed above: PYTHONPATH), built by the locked setuptools, nothing
# fetched; the build must say "compiled" or it fails. Then the installers leave the
# environment (the image never installs anything at run time).
RUN cd /src \
 && GTS_SIDECAR_COMPILE=1 PYTHONPATH=/opt/gts-sidecar/lib/python3.11/site-packages \
      /opt/gts-build/bin/pip wheel --no-deps --no-build-isolation --no-index -w /tmp/wheels . \
 && /opt/gts-sidecar/bin/pip install --no-deps --no-index /tmp/wheels/gts_sidecar-*.whl \
 && /opt/gts-sidecar/bin/pip check \
 && /opt/gts-sidecar/bin/gts-sidecar --version | grep -F '(compiled)' \
 && /opt/gts-sidecar/bin/pip uninstall --yes setuptools pip \
 && /opt/gts-sidecar/bin/python -m compileall -q /opt/gts-sidecar

# --- runtime -------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/gts-sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 gts \
 && useradd --system --uid 10001 --gid gts --no-create-home --home-dir /var/lib/gts-sidecar \
      --shell /usr/sbin/nologin gts \
 && mkdir -p /etc/gts-sidecar /var/lib/gts-sidecar \
 && chown gts:gts /var/lib/gts-sidecar
# the environment as built (same base image, so its python link resolves here too)
COPY --from=build /opt/gts-sidecar /opt/gts-sidecar
# the documented example config; Kubernetes mounts its ConfigMap over /etc/gts-sidecar
COPY config/sidecar.yaml /etc/gts-sidecar/sidecar.yaml
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
