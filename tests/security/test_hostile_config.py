"""Hostile config files through `sidecar.config.load` and `gts-sidecar check-config`.

A config file is operator input, but it arrives through ConfigMaps, templating and `${ENV}`
substitution, so it must fail safe: every bad file is a `ConfigError` (check-config: exit 2
and the key path), quickly and in bounded memory, nothing in it runs code, a reload of a bad
file leaves the running config (and the watcher) alone, and no secret read from a `*_file`
ever shows in check-config's output, /admin/config or the logs.

Subprocesses run the real console script; the ones that may hang or balloon (alias bombs,
FIFOs) run under a timeout, and the bomb under an address-space limit, so a regression costs
seconds, not the machine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from sidecar import config as configmod
from sidecar.errors import ConfigError
from sidecar.logs import JsonFormatter
from sidecar.metrics import Metrics
from sidecar.reload import file_digest
from sidecar.server import Sidecar
from tests.conftest import LOOPBACK_LISTENERS

GTS_SIDECAR = str(Path(sys.executable).with_name("gts-sidecar"))
MARKER = "MARKER-s3cr3t-7f1c2a9e-do-not-print"
BASE: dict[str, Any] = {
    "listeners": LOOPBACK_LISTENERS,
    "logging": {"level": "warning"},
    "local_coordinator": {"journal": "memory://"},
}


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def check_config(path: Path, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GTS_SIDECAR, "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        errors="replace",
    )


def problems_of(path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        configmod.load(path, env={} if env is None else env)
    return info.value.problems


# --- code execution and custom tags ---------------------------------------------------------------


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.system ['touch {flag}']",
        "!!python/object/new:subprocess.Popen [['touch', '{flag}']]",
        "!!python/name:os.system",
        "!!python/module:os",
        "!<tag:yaml.org,2002:python/object/apply:os.system> ['touch {flag}']",
        "!custom {x: 1}",
    ],
)
def test_python_and_custom_tags_are_refused_and_never_run(tmp_path: Path, tag: str) -> None:
    flag = tmp_path / "pwned"
    path = write(tmp_path / "c.yaml", "drain_timeout: " + tag.replace("{flag}", str(flag)) + "\n")
    (problem,) = problems_of(path)
    assert "could not determine a constructor" in problem
    result = check_config(path)
    assert result.returncode == 2, result.stderr
    assert "invalid YAML" in result.stderr
    assert not flag.exists()


# --- alias bombs, nesting, odd keys ---------------------------------------------------------------


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The billion laughs: `width ** levels` leaves from a file of a few KiB."""
    lines = ["a0: &a0 [lol]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_pyyaml_itself_keeps_aliases_shared(tmp_path: Path) -> None:
    """The reference for the test below: PyYAML (with the sidecar's strict loader) builds the
    billion laughs in milliseconds, as a graph of shared lists; any blow-up is ours."""
    started = time.monotonic()
    data = yaml.load(alias_bomb(), Loader=configmod._StrictLoader)  # noqa: S506
    assert time.monotonic() - started < 1.0
    assert data["a9"][0] is data["a9"][8] is data["a8"]


_BOUNDED_CHECK_CONFIG = (
    "import resource, sys\n"
    "limit = 1 << 30\n"
    "resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
    "from sidecar.cli import main\n"
    "sys.exit(main(['check-config', sys.argv[1]]))\n"
)


def test_billion_laughs_is_refused_quickly_in_bounded_memory(tmp_path: Path) -> None:
    path = write(tmp_path / "bomb.yaml", alias_bomb())
    # the same entry point as the console script, under 1 GiB of address space; a run past
    # the timeout is killed by subprocess.run
    result = subprocess.run(
        [sys.executable, "-c", _BOUNDED_CHECK_CONFIG, str(path)],
        capture_output=True,
        text=True,
        timeout=3.0,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "more than 100000 values (YAML aliases expanding?)" in result.stderr


def test_the_bounded_runner_itself_refuses_a_small_bomb(tmp_path: Path) -> None:
    """The control of the test above: under the same limits, 9**3 leaves are refused at once,
    so a failure there is the bomb's size, not the harness."""
    path = write(tmp_path / "bomb.yaml", alias_bomb(levels=3))
    result = subprocess.run(
        [sys.executable, "-c", _BOUNDED_CHECK_CONFIG, str(path)],
        capture_output=True,
        text=True,
        timeout=10.0,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "a0: unknown key" in result.stderr


def deep(n: int, open_: str, close: str) -> str:
    return open_ * n + close * n


HOSTILE_STRUCTURES = [
    pytest.param("drain_timeout: " + deep(100, "[", "]"), id="nested-100-list"),
    pytest.param("drain_timeout: " + deep(5000, "[", "]"), id="nested-5000-list"),
    pytest.param("drain_timeout: " + deep(3000, "{a: ", "}"), id="nested-3000-map"),
    pytest.param(
        "".join("  " * i + f"k{i}:\n" for i in range(2000)) + "  " * 2000 + "v\n",
        id="nested-2000-block",
    ),
    pytest.param("node: &n\n  self: *n\n", id="self-referencing-map"),
    pytest.param("xid:\n  headers: &h [XID, *h]\n", id="self-referencing-list"),
    pytest.param("? [a, b]\n: 1\n", id="list-as-key"),
    pytest.param("? {a: 1}\n: 1\n", id="map-as-key"),
    pytest.param("xid:\n  max_length: " + "9" * 5000 + "\n", id="int-5000-digits"),
    pytest.param("x" * 100_000 + ": 1\n", id="100k-key"),
    pytest.param("base: &b {level: info}\nlogging:\n  <<: *b\n", id="merge-key"),
    pytest.param("- a\n- b\n", id="top-level-list"),
    pytest.param("just a string\n", id="top-level-scalar"),
    pytest.param("node: {}\n---\nnode: {}\n", id="two-documents"),
    pytest.param("1.5: x\n", id="float-key"),
    pytest.param("~: x\n", id="null-key"),
    pytest.param("drain_timeout: !!binary aGVsbG8=\n", id="binary-scalar"),
    pytest.param("drain_timeout: 2001-12-14t21:59:43.10-05:00\n", id="timestamp-scalar"),
]


@pytest.mark.parametrize("text", HOSTILE_STRUCTURES)
def test_hostile_structure_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "c.yaml", text)
    started = time.monotonic()
    problems = problems_of(path)
    assert problems and all(isinstance(p, str) and p for p in problems)
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("drain_timeout: " + deep(5000, "[", "]"), id="nested"),
        pytest.param("? [a, b]\n: 1\n", id="list-as-key"),
    ],
)
def test_check_config_exits_2_on_hostile_structure(tmp_path: Path, text: str) -> None:
    result = check_config(write(tmp_path / "c.yaml", text))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


async def test_a_hostile_reload_is_refused_and_the_watcher_keeps_watching(tmp_path: Path):
    path = write(tmp_path / "sidecar.yaml", yaml.safe_dump(BASE))
    sc = Sidecar(
        configmod.load(path),
        config_path=str(path),
        config_digest=file_digest(path),
        metrics=Metrics(),
        reload_interval=0.01,
    )
    await sc.start()

    async def counted(result: str, value: float) -> None:
        while (
            sc.metrics.registry.get_sample_value(
                "gts_sidecar_config_reloads_total", {"result": result}
            )
            or 0
        ) < value:
            await asyncio.sleep(0.01)

    try:
        write(path, "drain_timeout: " + deep(5000, "[", "]"))
        await asyncio.wait_for(counted("invalid", 1), 10.0)
        assert sc.config.drain_timeout == 20.0
        # the watcher is still there for the next, good version
        write(path, yaml.safe_dump({**BASE, "drain_timeout": "5s"}))
        await asyncio.wait_for(counted("applied", 1), 10.0)
        assert sc.config.drain_timeout == 5.0
    finally:
        task = sc._watcher._task if sc._watcher is not None else None
        await sc.close()
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # retrieved: the failure is the assertion's to report


# --- size, encoding, duplicates -------------------------------------------------------------------


def test_a_config_over_1mib_is_refused(tmp_path: Path) -> None:
    """A ConfigMap holds at most 1 MiB: a bigger config file is refused, unread."""
    text = yaml.safe_dump(BASE) + ("# " + "c" * 1022 + "\n") * 2048
    path = write(tmp_path / "c.yaml", text)
    (problem,) = problems_of(path)
    assert "is larger than 1048576 bytes" in problem


def test_a_64mib_sparse_config_is_refused_quickly(tmp_path: Path) -> None:
    path = tmp_path / "sparse.yaml"
    with path.open("wb") as f:
        f.truncate(64 << 20)  # a hole: 64 MiB of NULs that take no disk
    started = time.monotonic()
    (problem,) = problems_of(path)
    assert "is larger than 1048576 bytes" in problem
    assert time.monotonic() - started < 5.0


@pytest.mark.parametrize(
    ("data", "words"),
    [
        pytest.param(
            b"node:\n  advertise_address: caf\xe9\n", "is not UTF-8 (byte 30)", id="latin-1"
        ),
        pytest.param("node: {}\n".encode("utf-16"), "is not UTF-8", id="utf-16"),
        pytest.param(b"node: {}\n\x00\n", "unacceptable character #x0000", id="nul"),
        pytest.param(b"node: {}\n\x1b[31m\n", "unacceptable character #x001b", id="escape"),
        pytest.param(b"\xff\xfe\xfd", "is not UTF-8 (byte 0)", id="garbage"),
    ],
)
def test_non_utf8_and_control_bytes_are_refused(tmp_path: Path, data: bytes, words: str) -> None:
    path = write(tmp_path / "c.yaml", data)
    (problem,) = problems_of(path)
    assert words in problem
    result = check_config(path)
    assert result.returncode == 2
    assert words in result.stderr


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("logging:\n  level: info\nlogging:\n  level: debug\n", "'logging'"),
        ("logging:\n  level: info\n  level: debug\n", "'level'"),
        ('logging: {level: info}\n"logging": {level: debug}\n', "'logging'"),
        ("transactions:\n- name: a\n  name: b\n", "'name'"),
        ("? logging\n: {}\nlogging: {}\n", "'logging'"),
        ("true: x\nyes: y\n", "True"),
    ],
)
def test_duplicate_keys_are_refused_with_their_lines(tmp_path: Path, text: str, key: str) -> None:
    (problem,) = problems_of(write(tmp_path / "c.yaml", text))
    assert f"key {key} appears twice" in problem
    assert "line" in problem


# --- ${ENV} substitution --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "10.0.0.1\nlisteners: {admin: {bind: '0.0.0.0:1'}}",
        "x\n  bind: 0.0.0.0:1",
        "{advertise_address: evil}",
        "[1, 2]",
        "&anchor x",
        "*anchor",
        "!!python/object/apply:os.system ['true']",
        "${OTHER}",
        "'quoted' # comment",
        "a: b",
    ],
)
def test_env_substitution_never_injects_structure(tmp_path: Path, value: str) -> None:
    path = write(tmp_path / "c.yaml", "node:\n  advertise_address: ${POD_IP}\n")
    config = configmod.load(path, env={"POD_IP": value, "OTHER": "expanded"})
    assert config.node.advertise_address == value  # one string, exactly as given
    assert config.listeners == configmod.Config().listeners
    assert config.redacted()["node"] == {"advertise_address": value}


def test_env_substitution_is_not_applied_to_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "${SECTION}:\n  level: debug\n")
    (problem,) = problems_of(path, env={"SECTION": "logging"})
    assert problem == "${SECTION}: unknown key"


def test_an_unset_variable_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "node:\n  advertise_address: ${POD_IP}\n")
    assert problems_of(path) == ["node.advertise_address: environment variable POD_IP is not set"]


def test_an_infinite_duration_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "drain_timeout: " + "9" * 400 + "s\n")
    (problem,) = problems_of(path)
    assert problem.startswith("drain_timeout:")


# --- secret files ---------------------------------------------------------------------------------


def secret(tmp_path: Path, name: str, content: str | bytes = MARKER) -> str:
    return str(write(tmp_path / name, content))


def test_a_secret_path_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    path = write(tmp_path / "c.yaml", f"admin:\n  token_file: {tmp_path / 'dir'}\n")
    (problem,) = problems_of(path)
    assert problem.startswith("admin.token_file: secret file")
    assert "is not a regular file" in problem
    result = check_config(path)
    assert result.returncode == 2 and "admin.token_file" in result.stderr


@pytest.mark.parametrize(
    ("content", "words"),
    [("", "is empty"), ("  \n\t\n", "is empty"), (None, "No such file or directory")],
)
def test_an_empty_or_missing_secret_is_refused(tmp_path: Path, content, words) -> None:
    name = tmp_path / "token"
    if content is not None:
        name.write_text(content)
    path = write(tmp_path / "c.yaml", f"admin:\n  token_file: {name}\n")
    (problem,) = problems_of(path)
    assert problem.startswith("admin.token_file:") and words in problem


def test_a_huge_sparse_secret_file_is_refused(tmp_path: Path) -> None:
    token = tmp_path / "token"
    with token.open("wb") as f:
        f.write(b"t")
        f.truncate(16 << 20)  # 16 MiB, a hole after the first byte
    path = write(tmp_path / "c.yaml", f"admin:\n  token_file: {token}\n")
    (problem,) = problems_of(path)
    assert problem.startswith("admin.token_file:")


def test_a_fifo_as_secret_file_does_not_block_check_config(tmp_path: Path) -> None:
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    path = write(tmp_path / "c.yaml", f"admin:\n  token_file: {fifo}\n")
    result = check_config(path, timeout=2.0)  # TimeoutExpired (the child killed) if it blocks
    assert result.returncode == 2
    assert "admin.token_file" in result.stderr


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Transfer-Encoding", "chunked"),
        ("Content-Length", "0"),
        ("Host", "evil.example"),
        ("Connection", "close"),
        ("X-Api-Key", "first-line\nInjected: yes"),
    ],
)
def test_phase_two_headers_cannot_break_the_call_to_the_app(tmp_path: Path, name, value) -> None:
    tcc = {
        "resource": "inv",
        "try": {"method": "POST", "path": "/try"},
        "confirm": {"method": "POST", "path": "/confirm"},
        "cancel": {"method": "POST", "path": "/cancel"},
        "phase_two_headers": [{"name": name, "value_file": secret(tmp_path, "v", value)}],
    }
    path = write(tmp_path / "c.yaml", yaml.safe_dump({"tcc": [tcc]}))
    (problem,) = problems_of(path)
    assert problem.startswith("tcc[0].phase_two_headers[0]")


# --- no secret in check-config output, /admin/config or the logs ----------------------------------


def secret_config(tmp_path: Path, marker: str = MARKER) -> dict[str, Any]:
    """Every `*_file` secret of the schema, each holding `marker` (plus its own suffix)."""

    def s(name: str) -> str:
        return secret(tmp_path, name, f"{marker}-{name}\n")

    return {
        "admin": {"token_file": s("admin-token")},
        "coordinator": {
            "signing": {
                "key_id": "k1",
                "secret_file": s("k1"),
                "previous": [{"key_id": "k0", "secret_file": s("k0")}],
            },
            "auth": {
                "token_url": "http://127.0.0.1:9/token",
                "access_key_file": s("access-key"),
                "verify_key_file": s("verify-key"),
            },
        },
        "idempotency": {"password_file": s("redis-password")},
        "locks": {"backend": "memory", "password_file": s("locks-password")},
        "tcc": [
            {
                "resource": "inv",
                "try": {"method": "POST", "path": "/try"},
                "confirm": {"method": "POST", "path": "/confirm"},
                "cancel": {"method": "POST", "path": "/cancel"},
                "phase_two_headers": [{"name": "Authorization", "value_file": s("phase-two")}],
            }
        ],
    }


def _merged(tmp_path: Path, invalid: bool) -> dict[str, Any]:
    """secret_config() in a whole file; `invalid` adds errors everywhere, right next to the
    secrets too."""
    data: dict[str, Any] = {**BASE, **secret_config(tmp_path)}
    if not invalid:
        return data
    data["drain_timeout"] = "soon"
    data["xid"] = {"max_length": 3}
    data["coordinator"]["signing"]["window"] = "never"
    data["coordinator"]["auth"]["algorithms"] = ["none"]
    data["tcc"][0]["phase_two_headers"].append(
        {"name": "Bad Header", "value_file": data["tcc"][0]["phase_two_headers"][0]["value_file"]}
    )
    data["admin"]["bogus"] = 1
    return data


def test_check_config_never_prints_a_secret(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", yaml.safe_dump(_merged(tmp_path, invalid=True)))
    result = check_config(path)
    assert result.returncode == 2
    out = result.stdout + result.stderr
    for key in (
        "drain_timeout",
        "xid.max_length",
        "coordinator.signing.window",
        "coordinator.auth.algorithms",
        "tcc[0].phase_two_headers[1].name",
        "admin.bogus",
    ):
        assert key in out, out
    assert MARKER not in out
    # and the valid version of the same file is ok, printing nothing of it either
    path = write(tmp_path / "c.yaml", yaml.safe_dump(_merged(tmp_path, invalid=False)))
    result = check_config(path)
    assert result.returncode == 0, result.stderr
    assert MARKER not in result.stdout + result.stderr


def test_a_config_error_never_carries_a_secret(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", yaml.safe_dump(_merged(tmp_path, invalid=True)))
    with pytest.raises(ConfigError) as info:
        configmod.load(path, env={})
    assert MARKER not in str(info.value) + repr(info.value.problems)
    config = configmod.load(
        write(tmp_path / "ok.yaml", yaml.safe_dump(_merged(tmp_path, invalid=False))), env={}
    )
    assert MARKER not in repr(config) + str(config) + repr(config.redacted())


async def test_admin_config_shows_secret_paths_never_values(sidecar_factory, tmp_path) -> None:
    data = secret_config(tmp_path)
    sc = await sidecar_factory(data)
    token = f"{MARKER}-admin-token"
    base = f"http://127.0.0.1:{sc.ports['admin']}"
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/admin/config", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200
            text = await r.text()
        async with s.get(base + "/metrics") as r:
            metrics = await r.text()
    assert MARKER not in text and MARKER not in metrics
    assert f"<redacted: {data['admin']['token_file']}>" in text
    assert text.count("<redacted: ") == 8  # every secret of secret_config(), by path


async def test_a_refused_reload_never_logs_a_secret(tmp_path: Path, caplog) -> None:
    good = {**BASE, **secret_config(tmp_path)}
    path = write(tmp_path / "sidecar.yaml", yaml.safe_dump(good))
    sc = Sidecar(
        configmod.load(path, env={}),
        config_path=str(path),
        config_digest=file_digest(path),
        metrics=Metrics(),
        reload_interval=3600,  # only the explicit reloads below act
    )
    await sc.start()
    formatter = JsonFormatter()
    try:
        with caplog.at_level(logging.DEBUG):
            # invalid next to the secrets, then valid but not appliable without a restart
            write(path, yaml.safe_dump(_merged(tmp_path, invalid=True)))
            assert await sc.reload("test") == "invalid"
            changed = {**good, "coordinator": {**good["coordinator"], "breaker": {"failures": 9}}}
            write(path, yaml.safe_dump(changed))
            assert await sc.reload("test") == "invalid"
        logged = "\n".join(formatter.format(r) for r in caplog.records)
        assert "config reload refused" in logged
        assert "drain_timeout" in logged and "coordinator: changing this section" in logged
        assert MARKER not in logged
    finally:
        await sc.close()


def test_a_binary_secret_is_refused_without_showing_its_bytes(tmp_path: Path) -> None:
    token = secret(tmp_path, "token", b"s3cr3t-\x9c\xde-tail")
    path = write(tmp_path / "c.yaml", f"admin:\n  token_file: {token}\n")
    result = check_config(path)
    assert result.returncode == 2
    assert "admin.token_file" in result.stderr
    assert "0x9c" not in result.stderr and "position 7" not in result.stderr
