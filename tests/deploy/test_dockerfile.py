"""The Dockerfile, checked statically (no Docker engine here to build it): stages, the final
stage's user, contents, ports and entry point agree with the config defaults and deploy/k8s."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field

import yaml

from sidecar.config import Config, load, parse_bind

from .kube import BASE, ROOT

DOCKERFILE = ROOT / "Dockerfile"


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


def test_multi_stage_build_with_a_slim_final_stage() -> None:
    assert len(STAGES) >= 2
    build = STAGES[0]
    assert build.name, "the build stage is named, so the final stage can refer to it"
    assert "build-essential" in build.text(), "the build stage has the compilers"
    assert "pip wheel" in build.text()
    assert FINAL.base == "python:3.11-slim"


def test_final_stage_has_no_compilers_and_installs_only_wheels() -> None:
    text = FINAL.text()
    assert not COMPILERS.search(text), COMPILERS.search(text)
    installs = [r for r in FINAL.all("RUN") if "pip install" in r]
    assert len(installs) == 1
    run = installs[0]
    assert "--no-index" in run and "--find-links=/wheels" in run, "only the built wheels"
    assert f"from={STAGES[0].name}" in run, "the wheels come from the build stage"
    for copy in FINAL.all("COPY"):
        sources = [w for w in shlex.split(copy) if not w.startswith("--")][:-1]
        assert sources == ["config/sidecar.yaml"], f"the final stage copies only the config: {copy}"


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
            words = [w for w in shlex.split(copy) if not w.startswith("--")]
            for source in words[:-1]:
                assert (ROOT / source).exists(), source
                assert included(source), f"{source} is excluded by .dockerignore"
    for path in ("sidecar/cli.py", "pyproject.toml", "README.md"):
        assert included(path)
    for path in (".venv/bin/python", "tests/conftest.py", ".git/config", "var/journal.db"):
        assert not included(path), f"{path} should stay out of the build context"
