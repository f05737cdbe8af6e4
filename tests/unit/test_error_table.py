"""README's error table and the codes the sidecar answers with are the same set.

The codes come from the code itself: every SidecarError subclass in every module of the
package (its `code` and `status`), the codes the control plane writes by hand
(`error_response(STATUS, "CODE", …)`) and the ones aiohttp's own refusals are mapped to
(`web_errors`). README's table ("Errors the sidecar itself answers") must list each of them
with its status, and nothing else: a code added without a row, or a row left for a code
that is gone, fails here.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections import defaultdict
from pathlib import Path

import sidecar
from sidecar import web_errors
from sidecar.errors import SidecarError

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SECTION = "### Errors the sidecar itself answers"
#: error classes that exist but that no code path raises (no row for them): the test below
#: checks they really are unused, so the first use demands a row
NEVER_ANSWERED = {"DRAINING": "Draining"}

_ROW = re.compile(r"^\| ((?:`[A-Z][A-Z0-9_]*`(?: / )?)+) \| ([0-9]{3}(?: / [0-9]{3})*) \|")
_HAND_WRITTEN = re.compile(r'error_response\(\s*([0-9]{3}),\s*"([A-Z][A-Z0-9_]*)"')


def _all_subclasses(cls: type) -> set[type]:
    found: set[type] = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _all_subclasses(sub)
    return found


def code_statuses() -> dict[str, set[int]]:
    """Every code the package can answer with → its HTTP status(es)."""
    for module in pkgutil.walk_packages(sidecar.__path__, "sidecar."):
        if not module.name.endswith(".__main__"):  # that one runs the CLI
            importlib.import_module(module.name)  # error classes live beside their users
    codes: dict[str, set[int]] = defaultdict(set)
    for cls in {SidecarError} | _all_subclasses(SidecarError):
        codes[cls.code].add(cls.status)
    for path in (ROOT / "sidecar").rglob("*.py"):
        for status, code in _HAND_WRITTEN.findall(path.read_text(encoding="utf-8")):
            codes[code].add(int(status))
    for status, code in web_errors._CODES.items():
        codes[code].add(status)
    return dict(codes)


def readme_rows() -> dict[str, set[int]]:
    text = README.read_text(encoding="utf-8")
    assert SECTION in text, f"README has no {SECTION!r} section"
    table = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows: dict[str, set[int]] = defaultdict(set)
    for line in table.splitlines():
        match = _ROW.match(line)
        if match is None:
            continue
        statuses = {int(s) for s in match.group(2).split(" / ")}
        for code in re.findall(r"`([A-Z][A-Z0-9_]*)`", match.group(1)):
            assert code not in rows, f"README lists {code} twice"
            rows[code] |= statuses
    assert rows, "README's error table has no rows"
    return dict(rows)


def test_every_code_has_a_row_and_every_row_a_code() -> None:
    answered = {c: s for c, s in code_statuses().items() if c not in NEVER_ANSWERED}
    rows = readme_rows()
    missing = sorted(set(answered) - set(rows))
    stale = sorted(set(rows) - set(answered))
    assert not missing, f"codes the sidecar answers with but README's error table lacks: {missing}"
    assert not stale, f"README's error table lists codes nothing answers with: {stale}"


def test_each_row_gives_the_status_the_code_is_answered_with() -> None:
    rows = readme_rows()
    wrong = {
        code: (sorted(rows[code]), sorted(statuses))
        for code, statuses in code_statuses().items()
        if code in rows and not statuses <= rows[code]
    }
    assert not wrong, f"README status differs from the code's (README, code): {wrong}"


def test_codes_without_a_row_are_really_never_answered() -> None:
    for code, class_name in NEVER_ANSWERED.items():
        assert code in code_statuses()
        uses = [
            path
            for path in (ROOT / "sidecar").rglob("*.py")
            for line in path.read_text(encoding="utf-8").splitlines()
            if re.search(rf"\b{class_name}\b", line) and not line.startswith(f"class {class_name}(")
        ]
        assert not uses, f"{class_name} ({code}) is raised in {uses}: give it a README row"
