"""injector.py: AdmissionReviews in, reviews out. The patches are applied with jsonpatch (an
independent RFC 6902 implementation), as the API server would apply them."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import jsonpatch  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.errors import AdmissionReviewInvalid, ConfigError
from sidecar.injector import review
from sidecar.injector_config import InjectConfig, parse

SETTINGS = InjectConfig(image="registry.example.com/gts-sidecar:0.1.0")


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "containers": [{"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}]}]
    }
    body.update(spec)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "orders-", "annotations": annotations or {}},
        "spec": body,
    }


def admission(obj: Any, *, operation: str = "CREATE", kind: str = "Pod") -> bytes:
    return json.dumps(
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": kind},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": operation,
                "object": obj,
            },
        }
    ).encode()


def answer(obj: Any, settings: InjectConfig = SETTINGS, **kw: Any) -> dict[str, Any]:
    out = review(admission(obj, **kw), settings)
    assert out["apiVersion"] == "admission.k8s.io/v1" and out["kind"] == "AdmissionReview"
    response: dict[str, Any] = out["response"]
    assert response["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    return response


def patched(obj: dict[str, Any], settings: InjectConfig = SETTINGS) -> dict[str, Any]:
    response = answer(obj, settings)
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    result: dict[str, Any] = jsonpatch.apply_patch(obj, ops)
    return result


def refused(obj: dict[str, Any]) -> str:
    response = answer(obj)
    assert response["allowed"] is False and "patch" not in response
    assert response["status"]["code"] == 400
    message: str = response["status"]["message"]
    return message


INJECT = {"sidecar.gts.io/inject": "true"}


def test_a_pod_without_the_annotation_is_allowed_unchanged() -> None:
    for notes in (None, {"other": "x"}, {"sidecar.gts.io/inject": "false"}):
        response = answer(pod(notes))
        assert response == {"uid": response["uid"], "allowed": True}


def test_an_annotated_pod_gets_the_native_sidecar_first() -> None:
    original = pod(
        {**INJECT, "sidecar.gts.io/app-port": "9000"},
        initContainers=[{"name": "migrate", "image": "app:1"}],
        volumes=[{"name": "data", "emptyDir": {}}],
    )
    out = patched(copy.deepcopy(original))
    spec = out["spec"]
    sidecar = spec["initContainers"][0]
    assert sidecar["name"] == "gts-sidecar" and sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == SETTINGS.image
    assert spec["initContainers"][1] == original["spec"]["initContainers"][0]
    assert {"name": "GTS_APP_PORT", "value": "9000"} in sidecar["env"]
    assert [v["name"] for v in spec["volumes"]] == [
        "data",
        "gts-sidecar-config",
        "gts-sidecar-keys",
        "gts-sidecar-journal",
        "gts-sidecar-tmp",
    ]
    assert spec["volumes"][1]["configMap"] == {"name": "gts-sidecar-config"}
    assert spec["volumes"][2]["secret"]["secretName"] == "gts-sidecar-keys"
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    assert mounts == {
        "/etc/gts-sidecar": "gts-sidecar-config",
        "/var/run/secrets/gts": "gts-sidecar-keys",
        "/var/lib/gts-sidecar": "gts-sidecar-journal",
        "/tmp": "gts-sidecar-tmp",
    }
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert sidecar[probe]["httpGet"]["port"] == "gts-admin"
    assert {"name": "gts-admin", "containerPort": 17090, "protocol": "TCP"} in sidecar["ports"]
    app = spec["containers"][0]
    assert {"name": "GTS_OUTBOUND", "value": "http://127.0.0.1:17001"} in app["env"]
    assert {"name": "GTS_API", "value": "http://127.0.0.1:17000"} in app["env"]
    # everything else is as it was
    assert out["metadata"] == original["metadata"]
    assert {k: v for k, v in app.items() if k != "env"} == original["spec"]["containers"][0]


def test_first_init_container_and_first_volume_and_first_env() -> None:
    out = patched(pod(INJECT))
    assert [c["name"] for c in out["spec"]["initContainers"]] == ["gts-sidecar"]
    assert len(out["spec"]["volumes"]) == 4
    env = out["spec"]["containers"][0]["env"]
    assert [e["name"] for e in env] == ["GTS_OUTBOUND", "GTS_API"]
    sidecar = out["spec"]["initContainers"][0]
    assert {"name": "GTS_APP_PORT", "value": "8080"} in sidecar["env"], "the default port"


def test_env_the_app_sets_itself_is_kept() -> None:
    original = pod(INJECT)
    original["spec"]["containers"][0]["env"] = [{"name": "GTS_API", "value": "http://x"}]
    env = patched(original)["spec"]["containers"][0]["env"]
    assert env == [
        {"name": "GTS_API", "value": "http://x"},
        {"name": "GTS_OUTBOUND", "value": "http://127.0.0.1:17001"},
    ]


def test_an_injected_pod_gets_no_second_patch() -> None:
    once = patched(pod(INJECT))
    response = answer(once)
    assert response["allowed"] is True and "patch" not in response
    # a sidecar written by hand (as deploy/k8s/base does) counts too
    by_hand = pod(INJECT, containers=[{"name": "gts-sidecar", "image": "x"}])
    assert "patch" not in answer(by_hand)


def test_settings_shape_the_sidecar() -> None:
    settings = parse(
        {
            "listen": {"tls": {"cert_file": "c", "key_file": "k"}},
            "inject": {
                "image": "gts:9",
                "secret": None,
                "config_key": "mesh.yaml",
                "ports": {"admin": 18090},
                "pre_stop_sleep": "2s",
            },
        }
    ).inject
    out = patched(pod(INJECT), settings)
    sidecar = out["spec"]["initContainers"][0]
    assert sidecar["args"] == ["run", "--config", "/etc/gts-sidecar/mesh.yaml"]
    assert "gts-sidecar-keys" not in {v["name"] for v in out["spec"]["volumes"]}
    assert {"name": "gts-admin", "containerPort": 18090, "protocol": "TCP"} in sidecar["ports"]
    assert sidecar["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "2"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sidecar.gts.io/inject": "yes"}, 'must be "true" or "false"'),
        ({"sidecar.gts.io/app-port": "http"}, "must be a port (1-65535)"),
        ({"sidecar.gts.io/app-port": "70000"}, "must be a port (1-65535)"),
        ({"sidecar.gts.io/app-port": "17006"}, "17006 is the sidecar's inbound port"),
    ],
)
def test_bad_annotations_are_refused_with_a_reason(change: dict[str, str], message: str) -> None:
    assert message in refused(pod({**INJECT, **change}))


def test_pods_the_sidecar_cannot_join_are_refused_with_a_reason() -> None:
    clash = pod(INJECT)
    clash["spec"]["containers"][0]["ports"] = [{"containerPort": 17090}]
    assert "uses port 17090, the sidecar's admin port" in refused(clash)
    volume = pod(INJECT, volumes=[{"name": "gts-sidecar-tmp", "emptyDir": {}}])
    assert "already has a volume named gts-sidecar-tmp" in refused(volume)
    assert "host network" in refused(pod(INJECT, hostNetwork=True))
    assert "spec.containers is empty" in refused(pod(INJECT, containers=[]))
    assert "spec.containers is not a list" in refused(pod(INJECT, containers={"a": 1}))
    bad_meta = pod(INJECT)
    bad_meta["metadata"]["annotations"] = ["x"]
    assert "metadata.annotations is not an object" in refused(bad_meta)


def test_what_the_webhook_does_not_handle_passes_unchanged() -> None:
    for response in (
        answer(pod(INJECT), operation="UPDATE"),
        answer(pod(INJECT), kind="Deployment"),
    ):
        assert response["allowed"] is True and "patch" not in response
    assert answer("not a pod")["allowed"] is False


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}', "v1beta1"),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}', "no request"),
        (
            b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}',
            "request.uid is missing",
        ),
        (b"[" * 100_000, "not JSON"),
    ],
)
def test_a_malformed_review_is_refused(body: bytes, message: str) -> None:
    with pytest.raises(AdmissionReviewInvalid) as err:
        review(body, SETTINGS)
    assert message in err.value.message
    assert err.value.code == "ADMISSION_REVIEW_INVALID" and err.value.status == 400


def test_config_problems_name_their_key_paths() -> None:
    with pytest.raises(ConfigError) as err:
        parse(
            {
                "listen": {"bind": "nowhere", "tls": {"cert_file": "c"}},
                "inject": {
                    "image": "has space",
                    "config_map": "Not_A_Name",
                    "resources": {"limits": {"cpu": "lots", "memory": "1Gi"}},
                },
                "extra": 1,
            }
        )
    problems = "\n".join(err.value.problems)
    for expected in (
        "listen.bind: invalid bind address 'nowhere'",
        "listen.tls.key_file:",
        "inject.image: must be one image reference",
        "inject.config_map: invalid Kubernetes object name 'Not_A_Name'",
        "inject.resources.limits.cpu: invalid resource quantity 'lots'",
        "extra: unknown key",
    ):
        assert expected in problems, problems
    # cross-field checks, once the fields themselves are valid
    with pytest.raises(ConfigError) as err:
        parse(
            {
                "listen": {"tls": {"cert_file": "c", "key_file": "k"}},
                "inject": {"image": "gts:1", "default_app_port": 17000},
            }
        )
    assert err.value.problems == ["inject: default_app_port 17000 is one of the sidecar's ports"]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def _mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` nine times in ten, any JSON value otherwise: deep enough to reach every check."""
    return st.integers(0, 9).flatmap(lambda n: good if n else _json)


_container = st.fixed_dictionaries(
    {"name": _mostly(st.sampled_from(["app", "worker"]))},
    optional={
        "ports": _mostly(
            st.lists(
                _mostly(
                    st.fixed_dictionaries({"containerPort": _mostly(st.sampled_from([80, 17006]))})
                ),
                max_size=3,
            )
        ),
        "env": _mostly(st.lists(_mostly(st.fixed_dictionaries({"name": _json})), max_size=3)),
    },
)
_pod_like = st.fixed_dictionaries(
    {
        "metadata": _mostly(
            st.fixed_dictionaries(
                {
                    "annotations": _mostly(
                        st.fixed_dictionaries(
                            {"sidecar.gts.io/inject": _mostly(st.just("true"))},
                            optional={"sidecar.gts.io/app-port": _mostly(st.just("9000"))},
                        )
                    )
                }
            )
        ),
        "spec": _mostly(
            st.fixed_dictionaries(
                {"containers": _mostly(st.lists(_mostly(_container), min_size=1, max_size=3))},
                optional={
                    "initContainers": _mostly(st.lists(_mostly(_container), max_size=2)),
                    "volumes": _mostly(
                        st.lists(
                            _mostly(
                                st.fixed_dictionaries(
                                    {"name": st.sampled_from(["data", "gts-sidecar-tmp"])}
                                )
                            ),
                            max_size=2,
                        )
                    ),
                    "hostNetwork": st.booleans(),
                },
            )
        ),
    }
)


@settings(max_examples=300, deadline=None)
@given(obj=_pod_like | _json)
def test_any_object_gets_an_answer_never_an_exception(obj: Any) -> None:
    """Whatever the pod object holds, the review is answered (allowed, refused with a
    reason, or patched with a patch that applies): no exception escapes."""
    response = answer(obj)
    assert isinstance(response["allowed"], bool)
    if not response["allowed"]:
        assert response["status"]["message"]
    if "patch" in response:
        ops = json.loads(base64.b64decode(response["patch"]))
        jsonpatch.apply_patch(obj, ops)
