"""The Dockerfile, checked statically (scripts/image.sh builds and runs it with podman; not in
CI): every builder reads it alike, dependencies come only as the lock's wheels, and the final
stage's user, contents, ports and entry point agree with the config defaults and deploy/k8s."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from packaging.requirements import Requirement

from sidecar.config import Config, load, parse_bind

from .kube import BASE, ROOT

DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements.lock"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def text(self) -> str:
        return "\n".join(f"{kw} {args}" for kw, args in self.instructions)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Instructions with line continuations joined and comments dropped; global ARGs
    (before the first FROM) with their defaults; stages with ${ARG} substituted in FROM."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue  # comments (and parser directives) and blank lines, also mid-instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "a line continuation at the end of the file"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            image = re.sub(
                r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], words[0]
            )
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image, name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM, not {keyword}"
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


ARGS, STAGES = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
FINAL = STAGES[-1]
COMPILERS = re.compile(
    r"\b(gcc|g\+\+|cc|clang|make|build-essential|python3?-dev|libc6?-dev|apt-get install)\b"
)


def test_every_builder_reads_it_the_same_way() -> None:
    """No parser directive (`# syntax=` makes BuildKit fetch a frontend image: no build
    without a registry) and no BuildKit-only instruction flags (the classic builder has no
    RUN --mount; COPY --link, --chmod and heredocs are BuildKit's too)."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert not re.match(r"\s*#\s*(syntax|escape|check)\s*=", text, re.IGNORECASE)
    for stage in STAGES:
        for keyword, args in stage.instructions:
            assert "--mount" not in args, f"{keyword} {args}"
            assert "<<" not in args, f"a heredoc: {keyword} {args}"
            if keyword in ("COPY", "ADD"):
                flags = {w.split("=")[0] for w in shlex.split(args) if w.startswith("--")}
                assert flags <= {"--from", "--chown"}, f"{keyword} {args}"


def test_multi_stage_build_with_a_slim_final_stage() -> None:
    assert len(STAGES) >= 2
    build = STAGES[0]
    assert build.name, "the build stage is named, so the final stage can refer to it"
    assert FINAL.base == build.base == "python:3.11-slim"


def test_a_compiler_in_the_build_stage_only_and_dependencies_only_as_locked_wheels() -> None:
    """The build stage compiles gts-sidecar's request path (mypyc) and nothing else: every
    dependency, and the compiler's own (requirements-build.lock), comes as a locked wheel.
    The final stage has no compiler."""
    assert not COMPILERS.search(FINAL.text()), COMPILERS.search(FINAL.text())
    assert COMPILERS.search(STAGES[0].text()), "the build stage compiles the request path"
    installs = [r for r in STAGES[0].all("RUN") if "pip install" in r and " -r " in r]
    locks = {"/tmp/requirements.lock": "/opt/gts-sidecar/", "/tmp/requirements-build.lock": ""}
    assert len(installs) == len(locks), "one install from each lock"
    for lock, venv in locks.items():
        (run,) = [r for r in installs if lock in r]
        assert venv in run, f"{lock} goes into {venv}"
        for flag in ("--require-hashes", "--only-binary=:all:", "--no-deps"):
            assert flag in run, f"{flag}: exactly the locked wheels, nothing compiled"
    copies = [shlex.split(c) for c in STAGES[0].all("COPY")]
    assert ["requirements.lock", "requirements-build.lock", "/tmp/"] in copies
    project = [r for r in STAGES[0].all("RUN") if "pip wheel" in r and "/src" in r]
    assert len(project) == 1
    for flag in ("--no-deps", "--no-build-isolation", "--no-index", "GTS_SIDECAR_COMPILE=1"):
        assert flag in project[0], f"{flag}: gts-sidecar built with the locked tools only"
    assert "pip check" in project[0], "the lock satisfies every requirement on this Python"
    assert "--version | grep -F '(compiled)'" in project[0], "the image ships the compiled build"


def test_final_stage_copies_the_built_environment_and_installs_nothing() -> None:
    assert not [r for r in FINAL.all("RUN") if "pip" in r], "no installer runs in the image"
    sources = []
    for copy in FINAL.all("COPY"):
        words = shlex.split(copy)
        flags = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        if f"--from={STAGES[0].name}" in flags:
            assert paths == ["/opt/gts-sidecar", "/opt/gts-sidecar"]
        else:
            sources += paths[:-1]
    assert sources == ["config/sidecar.yaml"], "the final stage copies only the config"
    env = " ".join(FINAL.all("ENV"))
    assert re.search(r"\bPATH=/opt/gts-sidecar/bin:\$PATH\b", env), "gts-sidecar on PATH"


def _requirement(line: str) -> tuple[str, str]:
    name, _, rest = line.partition("==")
    return re.sub(r"[-_.]+", "-", name.strip()).lower(), rest


def _pins(lock: Path) -> dict[str, str]:
    """name → "version[ ; markers]" of a lock, every entry checked to be pinned with hashes."""
    text = lock.read_text(encoding="utf-8")
    assert "scripts/image.sh lock" in text.splitlines()[1], "says how to update it"
    pinned: dict[str, str] = {}
    for entry in " ".join(text.split("\\\n")).splitlines():  # one line per requirement
        if not entry.strip() or entry.lstrip().startswith("#"):
            continue
        assert "==" in entry and "--hash=sha256:" in entry, f"not pinned with hashes: {entry}"
        name, rest = _requirement(entry.split(" --hash")[0])
        pinned[name] = rest
    return pinned


def test_the_build_lock_pins_the_compiler_setup_py_asks_for() -> None:
    """requirements-build.lock: mypy as setup.py pins it, and the same setuptools and shared
    packages as requirements.lock (the compile type-checks against the image's packages)."""
    build, image = _pins(ROOT / "requirements-build.lock"), _pins(LOCK)
    pin = re.search(r'"mypy==([^"]+)"', (ROOT / "setup.py").read_text(encoding="utf-8"))
    assert pin is not None
    assert build["mypy"].split(";")[0].strip() == pin.group(1)
    for name in build.keys() & image.keys():
        assert build[name] == image[name], f"{name}: the two locks differ"


def test_the_lock_pins_every_dependency_with_hashes() -> None:
    pinned = _pins(LOCK)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    wanted = project["project"]["dependencies"] + project["build-system"]["requires"]
    for line in wanted:
        requirement = Requirement(line)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pinned, f"{name} is not in requirements.lock: run scripts/image.sh lock"
        version = pinned[name].split(";")[0].strip()
        assert requirement.specifier.contains(version, prereleases=True), (
            f"requirements.lock pins {name}=={version}, pyproject.toml asks for {line}: "
            "run scripts/image.sh lock"
        )


def test_runs_as_the_non_root_user_kubernetes_expects() -> None:
    users = FINAL.all("USER")
    assert users, "the final stage sets USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, "numeric and non-zero, so runAsNonRoot can check it"
    assert gid.isdigit() and int(gid) > 0
    pod = yaml.safe_load((BASE / "deployment.yaml").read_text(encoding="utf-8"))
    context = pod["spec"]["template"]["spec"]["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"]) == (int(uid), int(gid))
    assert re.search(rf"useradd\b.*--uid {uid}\b", FINAL.text())


def test_entrypoint_and_default_command() -> None:
    assert exec_form(FINAL.all("ENTRYPOINT")[-1]) == ["gts-sidecar"]
    cmd = exec_form(FINAL.all("CMD")[-1])
    assert cmd == ["run", "--config", "/etc/gts-sidecar/sidecar.yaml"]
    pod = yaml.safe_load((BASE / "deployment.yaml").read_text(encoding="utf-8"))
    sidecar = pod["spec"]["template"]["spec"]["initContainers"][0]
    assert sidecar["args"] == cmd, "Kubernetes mounts its config where the image looks"
    copies = " ".join(FINAL.all("COPY"))
    assert "config/sidecar.yaml /etc/gts-sidecar/sidecar.yaml" in copies


def test_exposed_ports_are_the_pod_facing_listeners() -> None:
    exposed = {int(p.split("/")[0]) for e in FINAL.all("EXPOSE") for p in e.split()}
    for cfg in (Config(), load(ROOT / "config" / "sidecar.yaml", env={})):
        binds = {
            name: parse_bind(getattr(cfg.listeners, name).bind)
            for name in ("inbound", "outbound", "api", "peer", "admin")
        }
        facing = {port for host, port in binds.values() if host not in ("127.0.0.1", "::1")}
        assert exposed == facing == {17006, 17020, 17090}


def test_the_journal_directory_is_a_writable_volume() -> None:
    workdir = FINAL.all("WORKDIR")[-1]
    volumes = [v for arg in FINAL.all("VOLUME") for v in json.loads(arg)]
    assert workdir in volumes
    # the example config's relative journal lands inside it
    journal = load(ROOT / "config" / "sidecar.yaml", env={}).local_coordinator.journal
    relative = journal[len("sqlite:///") :]
    assert not relative.startswith("/")
    assert re.search(rf"chown \S+ {re.escape(workdir)}\b", FINAL.text()), "owned by the user"
    # Kubernetes mounts the journal volume there too
    pod = yaml.safe_load((BASE / "deployment.yaml").read_text(encoding="utf-8"))
    sidecar = pod["spec"]["template"]["spec"]["initContainers"][0]
    assert sidecar["workingDir"] == workdir
    assert {"name": "journal", "mountPath": workdir} in sidecar["volumeMounts"]


def test_build_context_holds_what_the_build_copies() -> None:
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def included(path: str) -> bool:
        keep = True
        for rule in rules:
            negate = rule.startswith("!")
            pattern = rule.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
                keep = negate
        return keep

    for stage in STAGES:
        for copy in stage.all("COPY"):
            if "--from=" in copy:
                continue  # from another stage, not the context
            words = [w for w in shlex.split(copy) if not w.startswith("--")]
            for source in words[:-1]:
                assert (ROOT / source).exists(), source
                assert included(source), f"{source} is excluded by .dockerignore"
    for path in ("sidecar/cli.py", "pyproject.toml", "setup.py", "README.md", "requirements.lock"):
        assert included(path)
    for path in (".venv/bin/python", "tests/conftest.py", ".git/config", "var/journal.db"):
        assert not included(path), f"{path} should stay out of the build context"
