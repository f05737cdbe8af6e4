#!/usr/bin/env bash
# Debian packages the tests and benchmarks use, installed when missing (needs root or sudo).
# Under CI=true a package that cannot be installed is an error; elsewhere a warning, and the
# tests that need it fail with a message naming it.
set -uo pipefail
need=()
command -v strace >/dev/null 2>&1 || need+=(strace)
# scripts/test.sh's second run: the request path compiled by mypyc needs a C compiler and the
# headers of the Python that runs the tests
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null ||
  need+=(python3-dev)
# tests/faults: slow headers/body clients, clock skew, write/fsync failure injection
command -v slowhttptest >/dev/null 2>&1 || need+=(slowhttptest)
command -v faketime >/dev/null 2>&1 || need+=(faketime)
compgen -G '/usr/lib/*/faketime/libfaketime.so.1' >/dev/null || need+=(libfaketime)
command -v fiu-run >/dev/null 2>&1 || need+=(fiu-utils)
[ -e /usr/lib/fiu/fiu_posix_preload.so ] || need+=(libfiu0)
# TLS tests: openssl s_client as a peer that is not Python
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# the replicated coordinator's tests start their own PostgreSQL cluster (initdb, pg_ctl)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
# tests/realclients: Go's net/http as a real client (built from source by the tests)
command -v go >/dev/null 2>&1 || need+=(golang-go)
# tests/realclients: grpc-go, the gRPC client of the Go services the sidecar serves
[ -d /usr/share/gocode/src/google.golang.org/grpc ] || need+=(golang-google-grpc-dev)
# tests/realclients: @grpc/grpc-js (Node's HTTP/2) as a second real gRPC client
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
# tests/realclients: Java's HttpClient, which offers HTTP/2 (Upgrade: h2c) by default
command -v javac >/dev/null 2>&1 || need+=(default-jdk-headless)
# tests/realpeers: nginx as an ingress in front of the sidecar and as a server behind it (and
# bench/proxy_bench.py's reference); it lives in /usr/sbin, often not on PATH
{ [ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1; } || need+=(nginx-light)
[ -n "${GTS_NEED_REDIS:-1}" ] && ! command -v redis-server >/dev/null 2>&1 && need+=(redis-server)
[ ${#need[@]} -eq 0 ] && exit 0

SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
echo "installing Debian packages: ${need[*]}"
if $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 ||
   { $SUDO apt-get update -qq >/dev/null 2>&1 &&
     $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; }; then
  exit 0
fi
if [ "${CI:-}" = "true" ]; then
  echo "cannot install ${need[*]} (CI=true: this is an error)" >&2
  exit 1
fi
echo "warning: cannot install ${need[*]}; tests needing them will fail" >&2
exit 0
