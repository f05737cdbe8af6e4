"""Sidecar injection, as pure logic: an AdmissionReview v1 in, an AdmissionReview out, with
the JSON patch (RFC 6902) that adds gts-sidecar to a pod. The webhook server
(injector_server.py) only moves bytes.

Rules (no I/O here):
- A pod is injected when its annotation `sidecar.gts.io/inject` is "true"; "false" or no
  annotation: allowed, no patch. Any other value is refused (a typo must not silently leave
  a pod without its sidecar).
- A pod that already has a container named gts-sidecar (injected before, or written by hand)
  is allowed with no patch: a second call (reinvocation) changes nothing.
- The sidecar is a native sidecar (an init container with restartPolicy Always, Kubernetes
  >= 1.29), placed first so the pod's own init containers can use it too. It gets the
  config ConfigMap, the keys Secret, a journal emptyDir and a /tmp emptyDir, the probes of
  deploy/k8s/base, and the app's port (`sidecar.gts.io/app-port`) as GTS_APP_PORT, which
  the sidecar config reads as `app.url: http://127.0.0.1:${GTS_APP_PORT}`.
- The app's containers get GTS_OUTBOUND and GTS_API (unless they set them).
- What cannot be injected safely is refused with a message that says why: a bad app port,
  a port or volume name the sidecar needs already in use, host networking.
- A malformed review (not JSON, not AdmissionReview v1, no request uid) raises
  AdmissionReviewInvalid: there is no uid to answer, so the server answers 400.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Final

from sidecar.errors import AdmissionReviewInvalid
from sidecar.injector_config import InjectConfig
from sidecar.schema import dump

ANNOTATION_INJECT: Final = "sidecar.gts.io/inject"
ANNOTATION_APP_PORT: Final = "sidecar.gts.io/app-port"
SIDECAR_NAME: Final = "gts-sidecar"
#: the image's user and group (Dockerfile: USER 10001:10001)
SIDECAR_UID: Final = 10001

CONFIG_DIR: Final = "/etc/gts-sidecar"
KEYS_DIR: Final = "/var/run/secrets/gts"
JOURNAL_DIR: Final = "/var/lib/gts-sidecar"
VOLUMES: Final = {
    "config": "gts-sidecar-config",
    "keys": "gts-sidecar-keys",
    "journal": "gts-sidecar-journal",
    "tmp": "gts-sidecar-tmp",
}
API_VERSION: Final = "admission.k8s.io/v1"


class _Refused(Exception):
    """The pod cannot be injected: the review is answered allowed=false with this message."""


# --- the AdmissionReview envelope ------------------------------------------------------------


def review(body: bytes, settings: InjectConfig) -> dict[str, Any]:
    """Answer one AdmissionReview (the raw request body). Raises AdmissionReviewInvalid when the
    body is not a review that can be answered."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise AdmissionReviewInvalid(
            "the body is not JSON (an AdmissionReview v1 is expected)"
        ) from None
    if not isinstance(data, dict):
        raise AdmissionReviewInvalid(
            "the body is not a JSON object (an AdmissionReview v1 is expected)"
        )
    if data.get("apiVersion") != API_VERSION or data.get("kind") != "AdmissionReview":
        raise AdmissionReviewInvalid(
            f"expected apiVersion {API_VERSION} and kind AdmissionReview, got "
            f"{data.get('apiVersion')!r} and {data.get('kind')!r} (the webhook's "
            "admissionReviewVersions must be [v1])"
        )
    request = data.get("request")
    if not isinstance(request, dict):
        raise AdmissionReviewInvalid("the AdmissionReview has no request object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise AdmissionReviewInvalid("request.uid is missing: there is nothing to answer to")
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    try:
        patch = _patch_for(request, settings)
    except _Refused as exc:
        response["allowed"] = False
        response["status"] = {"code": 400, "reason": "BadRequest", "message": str(exc)}
    else:
        if patch:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(
                json.dumps(patch, separators=(",", ":")).encode()
            ).decode("ascii")
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def _patch_for(request: dict[str, Any], settings: InjectConfig) -> list[dict[str, Any]]:
    kind = request.get("kind")
    is_pod = isinstance(kind, dict) and kind.get("group", "") == "" and kind.get("kind") == "Pod"
    if not is_pod or request.get("operation") != "CREATE" or request.get("subResource"):
        return []  # the webhook's rules ask for pod creation only: anything else passes
    pod = request.get("object")
    if not isinstance(pod, dict):
        raise _Refused("request.object is not a pod object")
    return pod_patch(pod, settings)


# --- the pod ---------------------------------------------------------------------------------


def pod_patch(pod: dict[str, Any], settings: InjectConfig) -> list[dict[str, Any]]:
    """The JSON patch that injects the sidecar into `pod`; [] when nothing is to be done.
    Raises _Refused when the pod asks for injection but cannot have it."""
    metadata = _mapping(pod.get("metadata"), "metadata")
    annotations = _mapping(metadata.get("annotations"), "metadata.annotations")
    if not _wants_injection(annotations.get(ANNOTATION_INJECT)):
        return []
    spec = _mapping(pod.get("spec"), "spec")
    containers = _containers(spec, "containers")
    init_containers = _containers(spec, "initContainers")
    if any(c.get("name") == SIDECAR_NAME for c in containers + init_containers):
        return []  # already injected (or a hand-written sidecar): never a second one
    if not containers:
        raise _Refused("spec.containers is empty: there is no app to put the sidecar beside")
    if spec.get("hostNetwork") is True:
        raise _Refused(
            "a pod on the host network cannot be injected: the sidecar's ports would be the "
            "node's, shared by every such pod"
        )
    app_port = _app_port(annotations.get(ANNOTATION_APP_PORT), settings)
    _check_ports_free(containers + init_containers, settings)
    volumes = spec.get("volumes")
    if volumes is not None and not isinstance(volumes, list):
        raise _Refused("spec.volumes is not a list")
    taken = {str(v.get("name")) for v in volumes or [] if isinstance(v, dict)}
    ours = _volumes(settings)
    clash = sorted(taken & {v["name"] for v in ours})
    if clash:
        raise _Refused(f"the pod already has a volume named {', '.join(clash)}")

    patch: list[dict[str, Any]] = []
    sidecar = sidecar_container(settings, app_port)
    if init_containers:
        patch.append({"op": "add", "path": "/spec/initContainers/0", "value": sidecar})
    else:
        patch.append({"op": "add", "path": "/spec/initContainers", "value": [sidecar]})
    if volumes:
        patch += [{"op": "add", "path": "/spec/volumes/-", "value": v} for v in ours]
    else:
        patch.append({"op": "add", "path": "/spec/volumes", "value": ours})
    app_env = _app_env(settings)
    for i, c in enumerate(containers):
        env = c.get("env")
        if env is not None and not isinstance(env, list):
            raise _Refused(f"spec.containers[{i}].env is not a list")
        names = [e.get("name") for e in env or [] if isinstance(e, dict)]
        if not all(isinstance(name, str) for name in names):
            raise _Refused(f"spec.containers[{i}].env has a variable without a string name")
        have = set(names)
        missing = [e for e in app_env if e["name"] not in have]
        if not env:
            if missing:
                patch.append({"op": "add", "path": f"/spec/containers/{i}/env", "value": missing})
        else:
            patch += [
                {"op": "add", "path": f"/spec/containers/{i}/env/-", "value": e} for e in missing
            ]
    return patch


def _mapping(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Refused(f"{where} is not an object")
    return value


def _containers(spec: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = spec.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
        raise _Refused(f"spec.{key} is not a list of containers")
    return value


def _wants_injection(value: object) -> bool:
    if value is None:
        return False
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _Refused(f'annotation {ANNOTATION_INJECT} must be "true" or "false", not {value!r}')


def _app_port(value: object, settings: InjectConfig) -> int:
    if value is None:
        return settings.default_app_port
    text = value if isinstance(value, str) else ""
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
        raise _Refused(f"annotation {ANNOTATION_APP_PORT} must be a port (1-65535), not {value!r}")
    port = int(text)
    for name, number in dump(settings.ports).items():
        if port == number:
            raise _Refused(
                f"annotation {ANNOTATION_APP_PORT}: {port} is the sidecar's {name} port; "
                "the app must listen on another one"
            )
    return port


def _check_ports_free(containers: list[dict[str, Any]], settings: InjectConfig) -> None:
    ours = {number: name for name, number in dump(settings.ports).items()}
    for c in containers:
        ports = c.get("ports")
        for p in ports if isinstance(ports, list) else []:
            number = p.get("containerPort") if isinstance(p, dict) else None
            if isinstance(number, int) and number in ours:
                raise _Refused(
                    f"container {c.get('name')!r} uses port {number}, the sidecar's "
                    f"{ours[number]} port (all containers of a pod share its ports)"
                )


# --- what is added ---------------------------------------------------------------------------


def sidecar_container(settings: InjectConfig, app_port: int) -> dict[str, Any]:
    """The native sidecar, as deploy/k8s/base runs it (tests/deploy checks the two agree)."""
    ports = settings.ports
    probe = {"httpGet": {"path": "/healthz", "port": "gts-admin"}}
    mounts = [
        {"name": VOLUMES["config"], "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": VOLUMES["journal"], "mountPath": JOURNAL_DIR},
        {"name": VOLUMES["tmp"], "mountPath": "/tmp"},
    ]
    if settings.secret is not None:
        mounts.insert(1, {"name": VOLUMES["keys"], "mountPath": KEYS_DIR, "readOnly": True})
    resources = settings.resources
    return {
        "name": SIDECAR_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "restartPolicy": "Always",  # what makes an init container a native sidecar
        "args": ["run", "--config", f"{CONFIG_DIR}/{settings.config_key}"],
        "workingDir": JOURNAL_DIR,
        "ports": [
            {"name": "gts-inbound", "containerPort": ports.inbound, "protocol": "TCP"},
            {"name": "gts-peer", "containerPort": ports.peer, "protocol": "TCP"},
            {"name": "gts-admin", "containerPort": ports.admin, "protocol": "TCP"},
        ],
        "env": [
            _field_env("POD_IP", "status.podIP"),
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
            {"name": "GTS_APP_PORT", "value": str(app_port)},
        ],
        # the pod's next containers start only once this succeeds
        "startupProbe": {**probe, "periodSeconds": 1, "failureThreshold": 30},
        "livenessProbe": {**probe, "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3},
        # 503 while draining or while the app cannot be connected to
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "gts-admin"},
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": 2,
        },
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", f"{settings.pre_stop_sleep:g}"]}}},
        "resources": {
            "requests": dump(resources.requests),
            "limits": dump(resources.limits),
        },
        # set on the container, not the pod: the app's own settings stay as they are
        "securityContext": {
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    }


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _volumes(settings: InjectConfig) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": VOLUMES["config"], "configMap": {"name": settings.config_map}},
        {"name": VOLUMES["journal"], "emptyDir": {"sizeLimit": settings.journal_size_limit}},
        {"name": VOLUMES["tmp"], "emptyDir": {"sizeLimit": "64Mi"}},
    ]
    if settings.secret is not None:
        # 0444: the pod's fsGroup is the app's business, so the files cannot be group-only;
        # only the sidecar container mounts this volume, so only it can read them
        secret = {"secretName": settings.secret, "defaultMode": 0o444}
        volumes.insert(1, {"name": VOLUMES["keys"], "secret": secret})
    return volumes


def _app_env(settings: InjectConfig) -> list[dict[str, str]]:
    return [
        {"name": "GTS_OUTBOUND", "value": f"http://127.0.0.1:{settings.ports.outbound}"},
        {"name": "GTS_API", "value": f"http://127.0.0.1:{settings.ports.api}"},
    ]
