#!/usr/bin/env bash
# The gts-sidecar image, built and smoke-tested with podman, no registry needed.
#
#   scripts/image.sh              base (when missing) + build + smoke test
#   scripts/image.sh base         a local Debian bookworm base with Python 3.11 (debootstrap,
#                                 then `podman import`): what python:3.11-slim would be
#   scripts/image.sh build        podman build of the Dockerfile on that base
#   scripts/image.sh smoke        run the image as Kubernetes runs it (read-only root, uid
#                                 10001) and check /healthz, /readyz, /metrics, inbound,
#                                 outbound, the TM API, and that SIGTERM drains and exits 0;
#                                 then `gts-sidecar injector` answers an AdmissionReview over
#                                 HTTPS; prints the image size and the idle RSS
#   scripts/image.sh lock         update requirements.lock from pyproject.toml (uv pip
#                                 compile): the one command that changes what the image
#                                 installs; pins still allowed are kept (`lock --upgrade`:
#                                 the newest of everything); and requirements-build.lock,
#                                 what the build stage compiles the request path with (mypy,
#                                 pinned in setup.py, and setuptools), never in the image
#
# Environment: CONTEXT (head: the committed tree, the default; worktree: the working tree
# with its uncommitted edits), IMAGE (default localhost/gts-sidecar:VERSION), BASE_IMAGE (default
# localhost/gts-base:bookworm; python:3.11-slim where a registry is reachable, then `base` is
# skipped), DEBIAN_MIRROR (default http://deb.debian.org/debian).
# Installs podman, buildah, debootstrap and runc from Debian's packages when missing (root or
# sudo). Not part of CI: it needs root and a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE=${IMAGE:-localhost/gts-sidecar:$VERSION}
BASE_IMAGE=${BASE_IMAGE:-localhost/gts-base:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

log() { printf '== %s\n' "$*" >&2; }

install_tools() {
  local need=()
  for tool in podman buildah debootstrap runc; do
    command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  log "installing ${need[*]} (Debian packages)"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
}

# crun (podman's default runtime on Debian) refuses hosts with cgroup controllers on both
# hierarchies, and containers here may not raise rlimits: runc, and rlimits the host allows.
PODMAN=(podman --runtime runc)
LIMITS=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit "nproc=4096:4096")

base() {
  if [[ "$BASE_IMAGE" != localhost/* ]]; then
    log "BASE_IMAGE=$BASE_IMAGE comes from a registry: nothing to make"
    return 0
  fi
  if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    log "base $BASE_IMAGE exists (podman rmi it to make it again)"
    return 0
  fi
  local root
  root=$(mktemp -d /var/tmp/gts-base.XXXXXX)
  trap 'rm -rf "$root"' RETURN
  log "debootstrap bookworm (minbase + python3, python3-venv) into $root"
  $SUDO debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$DEBIAN_MIRROR" >/dev/null
  # what an image needs no copy of: package caches and lists, documentation
  $SUDO rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
  log "podman import -> $BASE_IMAGE"
  $SUDO tar -C "$root" -c . | "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" \
    >/dev/null
}

build() {
  log "podman build -> $IMAGE (base $BASE_IMAGE)"
  # --network host: the build stage fetches the locked wheels from the package index;
  # --format docker keeps the HEALTHCHECK (the OCI format has none)
  # The host's CA bundle for the package index when pip here is told to use one (a
  # TLS-intercepting proxy): mounted into the build, never copied into a layer.
  local cert extra=()
  cert=${PIP_CERT:-$(.venv/bin/python -m pip config get global.cert 2>/dev/null || true)}
  if [ -n "$cert" ] && [ -f "$cert" ]; then
    extra+=(--volume "$cert:/etc/gts-build-ca.crt:ro" --build-arg PIP_CERT=/etc/gts-build-ca.crt)
  fi
  # the committed tree (git archive HEAD), so that edits in progress never reach an image;
  # CONTEXT=worktree builds the working tree as it is
  local context=.
  if [ "${CONTEXT:-head}" = head ] && git rev-parse --verify -q HEAD >/dev/null; then
    context=$(mktemp -d /var/tmp/gts-context.XXXXXX)
    trap 'rm -rf "$context"' RETURN
    git archive HEAD | tar -x -C "$context"
    log "context: git archive HEAD ($(git rev-parse --short HEAD))"
  fi
  "${PODMAN[@]}" build --format docker --network host "${LIMITS[@]}" "${extra[@]}" \
    --build-arg "PYTHON_IMAGE=$BASE_IMAGE" --tag "$IMAGE" "$context"
}

smoke() {
  local python=.venv/bin/python
  [ -x "$python" ] || scripts/setup.sh
  log "smoke test of $IMAGE"
  IMAGE="$IMAGE" "$python" - "${PODMAN[@]}" -- "${LIMITS[@]}" <<'PY'
"""Run the image as deploy/k8s does (read-only root, uid 10001, the journal on a volume,
the config mounted read-only) beside a test app on the host's loopback, and check that every
listener answers and that SIGTERM drains and exits 0."""
import json, os, socket, subprocess, sys, tempfile, threading, time, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

args = sys.argv[1:]
sep = args.index("--")
podman, limits = args[:sep], args[sep + 1 :]
image = os.environ["IMAGE"]


def free_port():
    """A free port below the ephemeral range (32768+), so that no outgoing connection of
    another program takes it between this check and the container's bind."""
    import random
    while True:
        port = random.randrange(20000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port


class App(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"path": self.path, "xid": self.headers.get("XID")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


app = ThreadingHTTPServer(("127.0.0.1", 0), App)
threading.Thread(target=app.serve_forever, daemon=True).start()
app_url = f"http://127.0.0.1:{app.server_address[1]}"

ports = {n: free_port() for n in ("inbound", "outbound", "api", "peer", "admin")}
config = yaml.safe_load(Path("config/sidecar.yaml").read_text())
for name, port in ports.items():
    host = "127.0.0.1" if name in ("outbound", "api") else "0.0.0.0"
    config["listeners"][name]["bind"] = f"{host}:{port}"
config["app"]["url"] = app_url
config["upstreams"] = {"inventory": {"url": app_url}}
config["local_coordinator"]["journal"] = "sqlite:////var/lib/gts-sidecar/journal.db"
tmp = Path(tempfile.mkdtemp(prefix="gts-smoke-"))
(tmp / "sidecar.yaml").write_text(yaml.safe_dump(config))
os.chmod(tmp, 0o755)
os.chmod(tmp / "sidecar.yaml", 0o644)

name = f"gts-smoke-{os.getpid()}"
run = [*podman, "run", "--detach", "--name", name, *limits, "--network", "host",
       "--read-only", "--user", "10001:10001", "--cap-drop", "ALL",
       "--security-opt", "no-new-privileges",
       "--volume", f"{tmp}:/etc/gts-sidecar:ro",
       "--volume", "/var/lib/gts-sidecar",  # the journal: a fresh volume, as an emptyDir
       "--no-healthcheck",  # the image's HEALTHCHECK needs systemd timers; checked below
       image]  # the image's own CMD: run --config /etc/gts-sidecar/sidecar.yaml
failures = []


def check(what, ok, detail=""):
    print(f"  {'ok  ' if ok else 'FAIL'} {what}{(': ' + detail) if detail and not ok else ''}")
    if not ok:
        failures.append(what)


def get(url, data=None, headers=None, timeout=5):
    req = urllib.request.Request(url, data=data, headers=headers or {},
                                 method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def inspect_of(container, fmt):
    return subprocess.run([*podman, "inspect", "--format", fmt, container],
                          capture_output=True, text=True, check=True).stdout.strip()


def inspect(fmt):
    return inspect_of(name, fmt)


def rss(pid):
    """VmRSS of a process, in KiB."""
    return next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").open()
                if line.startswith("VmRSS:"))


try:
    # inside the try: a container that was created but failed to start is removed too
    subprocess.run(run, check=True, stdout=subprocess.DEVNULL)
    admin = f"http://127.0.0.1:{ports['admin']}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if get(admin + "/healthz", timeout=1)[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline or inspect("{{.State.Running}}") != "true":
            raise SystemExit("the container did not start:\n" + subprocess.run(
                [*podman, "logs", name], capture_output=True, text=True).stderr[-3000:])
        time.sleep(0.2)
    check("GET /healthz", True)
    status, _ = get(admin + "/readyz")
    check("GET /readyz 200 (the app is reachable)", status == 200, str(status))
    status, body = get(admin + "/metrics")
    check("GET /metrics", status == 200 and b"gts_sidecar_" in body, str(status))
    status, body = get(f"http://127.0.0.1:{ports['inbound']}/orders/1",
                       headers={"XID": "10.0.0.1:17020:42"})
    check("inbound -> app (XID passed on)", status == 200 and
          json.loads(body).get("xid") == "10.0.0.1:17020:42", f"{status} {body[:200]!r}")
    status, body = get(f"http://127.0.0.1:{ports['outbound']}/inventory/items")
    check("outbound -> upstream", status == 200 and json.loads(body)["path"] == "/items",
          f"{status} {body[:200]!r}")
    api = f"http://127.0.0.1:{ports['api']}/v1/transactions"
    status, body = get(api, data=json.dumps({"name": "smoke"}).encode(),
                       headers={"Content-Type": "application/json"})
    xid = json.loads(body).get("xid") if status in (200, 201) else None
    check("TM API begin", bool(xid), f"{status} {body[:200]!r}")
    if xid:
        status, body = get(f"{api}/{xid}/commit", data=b"")
        check("TM API commit", status == 200 and json.loads(body)["status"] == "Committed",
              f"{status} {body[:200]!r}")
    pid = inspect("{{.State.Pid}}")
    time.sleep(3)  # idle: nothing in flight, then measure
    rss_kib = rss(pid)
    user = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0]
    check("runs as uid 10001", user == "10001", user)
    started = time.monotonic()
    subprocess.run([*podman, "stop", "--time", "40", name], check=True,
                   stdout=subprocess.DEVNULL)
    stopped_in = time.monotonic() - started
    code = inspect("{{.State.ExitCode}}")
    logs = subprocess.run([*podman, "logs", name], capture_output=True, text=True).stderr
    if failures:
        print("  the container's last log lines:\n" + "\n".join(logs.splitlines()[-15:]))
    check("SIGTERM: drained and exited 0", code == "0" and '"stopped"' in logs,
          f"exit {code}")
    # the injector webhook from the same image, on a certificate made as docs/injector.md says
    certs = tmp / "tls"  # /etc/gts-injector/tls in the container (config/injector.yaml)
    subprocess.run(["deploy/k8s/injector/self-signed/make-cert.sh", str(certs)], check=True,
                   stdout=subprocess.DEVNULL)
    for f in certs.iterdir():
        os.chmod(f, 0o644)
    os.chmod(certs, 0o755)
    inj = yaml.safe_load(Path("config/injector.yaml").read_text())
    inj_port = free_port()
    inj["listen"]["bind"] = f"127.0.0.1:{inj_port}"
    (tmp / "injector.yaml").write_text(yaml.safe_dump(inj))
    inj_name = name + "-injector"
    try:
        subprocess.run([*podman, "run", "--detach", "--name", inj_name, *limits, "--network",
                        "host", "--read-only", "--user", "10001:10001", "--cap-drop", "ALL",
                        "--no-healthcheck", "--volume", f"{tmp}:/etc/gts-injector:ro", image,
                        "injector", "--config", "/etc/gts-injector/injector.yaml"],
                       check=True, stdout=subprocess.DEVNULL)
        import ssl
        ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        ctx.check_hostname = False  # the certificate names the Service; loopback here
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE", "object": {
                "metadata": {"annotations": {"sidecar.gts.io/inject": "true"}},
                "spec": {"containers": [{"name": "app", "image": "app"}]}}}}
        deadline, answer = time.monotonic() + 30, None
        while answer is None and time.monotonic() < deadline:
            try:
                req = urllib.request.Request(f"https://127.0.0.1:{inj_port}/mutate",
                                             data=json.dumps(review).encode(), method="POST")
                with urllib.request.urlopen(req, timeout=2, context=ctx) as r:
                    answer = json.loads(r.read())
            except OSError:
                time.sleep(0.2)
        check("injector: AdmissionReview answered with a patch over HTTPS",
              bool(answer) and "patch" in answer["response"], str(answer)[:200])
        inj_pid = inspect_of(inj_name, "{{.State.Pid}}")
        inj_rss = rss(inj_pid)
        subprocess.run([*podman, "stop", "--time", "20", inj_name], check=True,
                       stdout=subprocess.DEVNULL)
        code = inspect_of(inj_name, "{{.State.ExitCode}}")
        check("injector: SIGTERM exits 0", code == "0", f"exit {code}")
        print(f"  injector idle RSS {inj_rss / 1024:.1f} MiB")
    finally:
        subprocess.run([*podman, "rm", "--force", inj_name], capture_output=True)
    size = int(subprocess.run([*podman, "image", "inspect", "--format", "{{.Size}}", image],
                              capture_output=True, text=True, check=True).stdout.strip())
    print(f"  image {image}: {size / 1e6:.1f} MB; idle RSS {rss_kib / 1024:.1f} MiB; "
          f"stopped {stopped_in:.1f}s after SIGTERM")
finally:
    subprocess.run([*podman, "rm", "--force", "--volumes", name], capture_output=True)
    app.shutdown()
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
if failures:
    raise SystemExit(f"smoke test failed: {', '.join(failures)}")
print("smoke test passed")
PY
}

lock() {
  local python=.venv/bin/python
  [ -x "$python" ] || scripts/setup.sh
  [ -x .venv/bin/uv ] || "$python" -m pip install -q --disable-pip-version-check uv
  # A universal lock (markers for every Python 3.11.x and platform: Debian's 3.11.2 needs a
  # package 3.11.7 does not), with the build backend (build-system.requires) that the image
  # builds gts-sidecar with. This machine's pip and uv settings stay out: the lock names
  # files of the package index only.
  "$python" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' |
    env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT UV_NO_CONFIG=1 \
      UV_CUSTOM_COMPILE_COMMAND="scripts/image.sh lock" \
      .venv/bin/uv pip compile --quiet "$@" --universal --python-version 3.11 \
      --generate-hashes --no-emit-index-url --index-url https://pypi.org/simple \
      --output-file requirements.lock pyproject.toml -
  # the compiler's lock: mypy as setup.py pins it, PyYAML's stubs (mypyc type-checks the
  # compiled modules' imports), the lock's setuptools; the build stage builds gts-sidecar
  # from a second venv holding only these
  local mypy_pin
  mypy_pin=$(sed -n 's/.*"\(mypy==[^"]*\)".*/\1/p' setup.py | head -1)
  printf '%s\ntypes-PyYAML\nsetuptools\n' "$mypy_pin" |
    env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT UV_NO_CONFIG=1 \
      UV_CUSTOM_COMPILE_COMMAND="scripts/image.sh lock" \
      .venv/bin/uv pip compile --quiet --universal --python-version 3.11 \
      --generate-hashes --no-emit-index-url --index-url https://pypi.org/simple \
      --constraint requirements.lock --output-file requirements-build.lock -
  log "requirements.lock and requirements-build.lock updated: review the diff, then rebuild"
}

case "${1:-all}" in
  all) install_tools; base; build; smoke ;;
  base) install_tools; base ;;
  build) install_tools; build ;;
  smoke) install_tools; smoke ;;
  lock) shift; lock "$@" ;;
  *) echo "usage: scripts/image.sh [all|base|build|smoke|lock]" >&2; exit 2 ;;
esac
