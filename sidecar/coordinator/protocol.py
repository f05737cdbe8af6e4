"""GTS REST v1 message shapes: parse and validate request bodies, render answers.

Rules: pure. Bodies are parsed with orjson into plain data, then checked field by field; any
problem is an InvalidRequest naming the field. Nothing here touches the engine or a socket.
64-bit ids (branchId) go out as JSON strings and are read as a string or an integer.
The prose and OpenAPI description of these shapes is docs/protocol.md and docs/openapi.yaml.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Final

import orjson

from sidecar.coordinator.records import BranchRecord, GlobalRecord
from sidecar.coordinator.states import BranchStatus, BranchType
from sidecar.errors import InvalidRequest
from sidecar.xid import DEFAULT_MAX_LENGTH
from sidecar.xid import parse as parse_xid

API: Final = "/api/v1"
#: phase-two callback paths, appended to a branch's callbackUrl
COMMIT_SUFFIX: Final = "/commit"
ROLLBACK_SUFFIX: Final = "/rollback"
MAX_APPLICATION_DATA: Final = 64 * 1024
_MAX_NAME: Final = 128


def body_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


#: C0 controls and DEL: never part of a name, URL or key
CONTROL_CHARS: Final = re.compile("[\x00-\x1f\x7f]")


def json_object(body: bytes, shape: str = "") -> dict[str, Any]:
    """A request body that must be a JSON object, or InvalidRequest saying so (with `shape`,
    an example of the expected object, appended to the message)."""
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object" + (f": {shape}" if shape else ""))
    return data


def _string(data: dict[str, Any], key: str, *, max_len: int = 256, required: bool = True) -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{key} must be a non-empty string")
    if len(value) > max_len:
        raise InvalidRequest(f"{key} must be at most {max_len} characters")
    if CONTROL_CHARS.search(value):
        raise InvalidRequest(f"{key} must not contain control characters")
    return value


def _int(data: dict[str, Any], key: str, *, required: bool = True) -> int | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{key} must be an integer")
    return value


#: ids (txids, branch ids) are 63-bit: they fit a signed 64-bit integer, never 0
MAX_ID: Final = 2**63 - 1
_ID_DIGITS: Final = re.compile("[0-9]{1,19}")


def id_value(value: object, where: str) -> int:
    """A 64-bit id as a caller sent it: a string of decimal digits (what every answer carries,
    so a decoder that reads JSON numbers as doubles never rounds it) or a JSON integer;
    InvalidRequest naming the field otherwise."""
    if isinstance(value, str):
        if not _ID_DIGITS.fullmatch(value):  # ASCII digits only: int() would take "٣" or " 3"
            raise InvalidRequest(
                f"{where} must be a string of decimal digits (or an integer), got {value[:40]!r}"
            )
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise InvalidRequest(f"{where} must be a string of decimal digits (or an integer)")
    if not 0 < number <= MAX_ID:
        raise InvalidRequest(f"{where} must be between 1 and {MAX_ID}")
    return number


def id_text(number: int) -> str:
    """How every answer writes a 64-bit id: as a JSON string (JavaScript's and Go's
    map[string]any decoders would round a number above 2^53)."""
    return str(number)


def xid_field(value: object, where: str = "xid", max_length: int = DEFAULT_MAX_LENGTH) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{where} must be a string")
    return parse_xid(value, max_length).raw


@dataclass(frozen=True, slots=True)
class StartRequest:
    name: str
    timeout_ms: int | None


def parse_start(body: bytes) -> StartRequest:
    data = json_object(body)
    timeout = _int(data, "timeoutMs", required=False)
    if timeout is not None and timeout <= 0:
        raise InvalidRequest("timeoutMs must be positive")
    return StartRequest(_string(data, "name", max_len=_MAX_NAME), timeout)


@dataclass(frozen=True, slots=True)
class RegisterRequest:
    xid: str
    branch_type: BranchType
    resource_id: str
    callback_url: str
    application_data: bytes


def parse_register(body: bytes, xid_max_length: int = DEFAULT_MAX_LENGTH) -> RegisterRequest:
    data = json_object(body)
    xid = xid_field(data.get("xid"), max_length=xid_max_length)
    try:
        branch_type = BranchType(str(data.get("branchType")))
    except ValueError:
        raise InvalidRequest("branchType must be TCC or SAGA") from None
    callback = _string(data, "callbackUrl", max_len=1024)
    if not callback.startswith(("http://", "https://")):
        raise InvalidRequest("callbackUrl must be an http(s) URL")
    app_data = orjson.dumps(data.get("applicationData"))
    if len(app_data) > MAX_APPLICATION_DATA:
        raise InvalidRequest(f"applicationData is larger than {MAX_APPLICATION_DATA} bytes")
    return RegisterRequest(
        xid, branch_type, _string(data, "resourceId"), callback.rstrip("/"), app_data
    )


@dataclass(frozen=True, slots=True)
class ReportRequest:
    xid: str
    branch_id: int
    status: BranchStatus


def parse_report(body: bytes, xid_max_length: int = DEFAULT_MAX_LENGTH) -> ReportRequest:
    data = json_object(body)
    xid = xid_field(data.get("xid"), max_length=xid_max_length)
    branch_id = id_value(data.get("branchId"), "branchId")
    status = data.get("status")
    if status not in (BranchStatus.PHASE_ONE_DONE.value, BranchStatus.PHASE_ONE_FAILED.value):
        raise InvalidRequest("status must be PhaseOne_Done or PhaseOne_Failed")
    return ReportRequest(xid, branch_id, BranchStatus(status))


def render_global(record: GlobalRecord, branches: list[BranchRecord] | None = None) -> bytes:
    out: dict[str, Any] = {
        "xid": record.xid,
        "status": record.status.value,
        "name": record.name,
        "timeoutMs": record.timeout_ms,
        "beginTime": record.begin_ms,
    }
    if branches is not None:
        out["branches"] = [render_branch(b) for b in branches]
    return orjson.dumps(out)


def render_branch(b: BranchRecord) -> dict[str, Any]:
    return {
        "branchId": id_text(b.branch_id),
        "branchType": b.branch_type.value,
        "resourceId": b.resource_id,
        "status": b.status.value,
        "attempts": b.attempts,
        "stuck": b.stuck,
        "lastError": b.last_error,
    }


def ids_as_text(status: dict[str, Any]) -> dict[str, Any]:
    """A status answer relayed from a coordinator, with every branchId a string (a
    coordinator that predates string ids answers numbers; the caller must not get them)."""
    branches = status.get("branches")
    if isinstance(branches, list):
        for branch in branches:
            if isinstance(branch, dict):
                value = branch.get("branchId")
                if isinstance(value, int) and not isinstance(value, bool):
                    branch["branchId"] = id_text(value)
    return status


def callback_body(b: BranchRecord) -> bytes:
    """What a branch's phase-two callback receives."""
    return (
        b'{"xid":'
        + orjson.dumps(b.xid)
        + b',"branchId":"'
        + str(b.branch_id).encode()
        + b'","resourceId":'
        + orjson.dumps(b.resource_id)
        + b',"applicationData":'
        + b.application_data
        + b"}"
    )
