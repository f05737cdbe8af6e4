"""docs/openapi.yaml describes exactly the routes the coordinator serves (GTS REST v1).

Structural checks, no network: every route of the peer app (built by `build_peer_app`, which
calls `add_gts_routes`) is in `paths` with its method and vice versa, every `$ref` resolves,
every error answer uses the Error schema and the `x-gts-sidecar-error` header, and the enums,
limits and security headers agree with the code. With `openapi-spec-validator` installed, the
file is also validated against the OpenAPI 3.1 schema.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import sidecar.errors as errors_module
from sidecar.coordinator import protocol, server
from sidecar.coordinator.nonces import MemoryNonceStore
from sidecar.coordinator.server import SignatureGate, build_peer_app
from sidecar.coordinator.signing import SIGNED_HEADERS, KeyRing
from sidecar.coordinator.states import BranchStatus, BranchType, GlobalStatus
from sidecar.errors import ERROR_HEADER, SidecarError
from sidecar.metrics import Metrics
from sidecar.txn.locks import MemoryLocks
from sidecar.txn.locks_api import add_lock_routes

SPEC_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    data = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def served_routes() -> set[tuple[str, str]]:
    """(method, path template) of every route on the peer listener of a coordinator."""
    gate = SignatureGate(KeyRing(None), MemoryNonceStore(), 300.0, Metrics())
    app = build_peer_app(gate, engine=object())  # type: ignore[arg-type]  # never called
    # replicas on PostgreSQL also serve the global locks they share (standalone.py)
    add_lock_routes(app, MemoryLocks(), prefix=protocol.API)
    routes: set[tuple[str, str]] = set()
    for route in app.router.routes():
        assert route.resource is not None
        routes.add((route.method.lower(), route.resource.canonical))
    # aiohttp adds HEAD beside every GET by itself; those are not part of the protocol
    heads = {path for method, path in routes if method == "head"}
    assert heads <= {path for method, path in routes if method == "get"}
    return {(method, path) for method, path in routes if method != "head"}


def documented_routes(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method, path)
        for path, item in spec["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every operation, the phase-two callbacks included, with a name for messages."""
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            yield f"{method.upper()} {path}", op
            for name, callback in op.get("callbacks", {}).items():
                for expression, cb_item in callback.items():
                    for cb_method, cb_op in cb_item.items():
                        if cb_method in HTTP_METHODS:
                            yield f"callback {name}: {cb_method.upper()} {expression}", cb_op


def resolve(spec: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"only local references are used: {ref}"
    node: Any = spec
    for token in ref[2:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and token in node, f"unresolved $ref {ref}"
        node = node[token]
    return node


def deref(spec: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = resolve(spec, node["$ref"])
    return node


def walk_refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                assert isinstance(value, str)
                yield value
            else:
                yield from walk_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk_refs(value)


def walk_key(node: Any, key: str) -> Iterator[Any]:
    if isinstance(node, dict):
        for k, value in node.items():
            if k == key:
                yield value
            yield from walk_key(value, key)
    elif isinstance(node, list):
        for value in node:
            yield from walk_key(value, key)


def sidecar_error_codes() -> set[str]:
    codes: set[str] = set()
    for obj in vars(errors_module).values():
        if isinstance(obj, type) and issubclass(obj, SidecarError):
            codes.add(obj.code)
    return codes


# --- routes --------------------------------------------------------------------------------


def test_is_openapi_3_1(spec: dict[str, Any]) -> None:
    assert str(spec["openapi"]).startswith("3.1.")
    assert spec["info"]["title"] and spec["info"]["version"]
    assert any("17020" in str(s.get("variables", {})) for s in spec["servers"])


def test_every_served_route_is_documented_with_its_method(spec: dict[str, Any]) -> None:
    missing = served_routes() - documented_routes(spec)
    assert not missing, f"routes served but not in docs/openapi.yaml: {sorted(missing)}"


def test_every_documented_route_is_served(spec: dict[str, Any]) -> None:
    extra = documented_routes(spec) - served_routes()
    assert not extra, f"routes in docs/openapi.yaml that the peer app does not serve: {extra}"


def test_the_gts_routes_are_all_under_the_api_prefix(spec: dict[str, Any]) -> None:
    gts = {path for _, path in served_routes() if path != "/healthz"}
    assert gts and all(path.startswith(protocol.API + "/") for path in gts)


def test_path_parameters_are_declared(spec: dict[str, Any]) -> None:
    for path, item in spec["paths"].items():
        names = {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            declared = {
                p["name"]
                for p in (deref(spec, p) for p in op.get("parameters", []))
                if p["in"] == "path"
            }
            assert declared == names, f"{method.upper()} {path}: path parameters {declared}"


# --- references and errors -----------------------------------------------------------------


def test_every_ref_resolves(spec: dict[str, Any]) -> None:
    refs = list(walk_refs(spec))
    assert refs
    for ref in refs:
        resolve(spec, ref)


def test_every_component_is_used(spec: dict[str, Any]) -> None:
    used = set(walk_refs(spec))
    for kind, items in spec["components"].items():
        if kind == "securitySchemes":
            continue  # used by name in security requirements
        for name in items:
            assert f"#/components/{kind}/{name}" in used, f"unused component {kind}/{name}"


def test_every_error_answer_has_the_error_shape_and_header(spec: dict[str, Any]) -> None:
    error_ref = "#/components/schemas/Error"
    for name, op in operations(spec):
        if name.startswith("callback"):
            continue  # the branch's answers are the branch's, not the sidecar's errors
        for status, response in op["responses"].items():
            if not str(status).startswith(("4", "5")):
                continue
            response = deref(spec, response)
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": error_ref}, f"{name} {status}: not the Error schema"
            assert ERROR_HEADER in response.get("headers", {}), f"{name} {status}: no header"


def test_signed_routes_answer_401_and_413(spec: dict[str, Any]) -> None:
    for name, op in operations(spec):
        if name.startswith("callback") or op.get("security") == []:
            continue
        assert {"401", "413"} <= set(op["responses"]), name


def example_error_codes(spec: dict[str, Any]) -> set[str]:
    """The `error.code` of every example body in the file."""
    bodies = list(walk_key(spec, "example"))
    for examples in walk_key(spec, "examples"):
        if isinstance(examples, dict):
            bodies += [e.get("value") for e in examples.values() if isinstance(e, dict)]
    return {
        body["error"]["code"]
        for body in bodies
        if isinstance(body, dict) and isinstance(body.get("error"), dict)
    }


def test_documented_error_codes_exist(spec: dict[str, Any]) -> None:
    codes = sidecar_error_codes()
    examples = example_error_codes(spec)
    assert examples and examples <= codes, examples - codes
    error = spec["components"]["schemas"]["Error"]["properties"]["error"]["properties"]
    listed = {
        word.strip(".,")
        for word in error["code"]["description"].split()
        if re.fullmatch(r"[A-Z_]+[.,]?", word) and len(word) > 3
    }
    assert listed <= codes, listed - codes
    assert examples <= listed, examples - listed


# --- agreement with the code ---------------------------------------------------------------


def test_status_enums_match_the_state_machine(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    assert schemas["GlobalStatus"]["enum"] == [s.value for s in GlobalStatus]
    assert schemas["BranchStatus"]["enum"] == [s.value for s in BranchStatus]
    assert schemas["BranchType"]["enum"] == [t.value for t in BranchType]
    report = schemas["ReportRequest"]["properties"]["status"]["enum"]
    assert report == [BranchStatus.PHASE_ONE_DONE.value, BranchStatus.PHASE_ONE_FAILED.value]


def test_signature_headers_are_the_signing_schemes(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    api_keys = {s["name"] for s in schemes.values() if s["type"] == "apiKey"}
    assert api_keys == set(SIGNED_HEADERS)
    assert all(s["in"] == "header" for s in schemes.values() if s["type"] == "apiKey")
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    for requirement in spec["security"]:
        names = {schemes[name]["name"] for name in requirement if schemes[name]["type"] == "apiKey"}
        assert names == set(SIGNED_HEADERS), "every requirement needs all four signature headers"


def test_limits_match_the_code(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    assert schemas["StartRequest"]["properties"]["name"]["maxLength"] == 128
    assert schemas["Xid"]["maxLength"] == 128
    assert "64 KiB" in schemas["RegisterRequest"]["properties"]["applicationData"]["description"]
    assert protocol.MAX_APPLICATION_DATA == 64 * 1024
    assert "256 KiB" in spec["components"]["responses"]["PayloadTooLarge"]["description"]
    assert server.MAX_BODY == 256 * 1024


def test_openapi_spec_validator_accepts_it(spec: dict[str, Any]) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(spec)
