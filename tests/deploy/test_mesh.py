"""Sharing a pod with a service mesh: no default port of the sidecar is one a mesh's proxy
uses (the containers of a pod share one network namespace, so one of the two could not bind,
and Istio's iptables rules capture its own ports), and the Istio overlay tells Istio which of
the sidecar's ports it must leave alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sidecar.config import _DEFAULT_BINDS, Config, load, parse_bind
from sidecar.schema import validate

from .kube import KUSTOMIZATIONS, ROOT, Obj, all_containers, find, labels_match, one, render
from .test_manifests import APP, SIDECAR, sidecar

#: ports the meshes people run take in the pod's network namespace
MESH_PORTS: dict[str, set[int]] = {
    # admin, outbound/inbound capture, HBONE, health, merged metrics, DNS, Envoy metrics
    "Istio": {*range(15000, 15022), 15053, 15090},
    "Linkerd": {4140, 4143, 4190, 4191},
    "Dapr": {3500, 3501, 50001, 50002, 9090},
    "Consul": {19000, *range(21000, 21256)},
}
LISTENERS = ("inbound", "outbound", "api", "peer", "admin")


def mesh_conflicts(ports: dict[str, int]) -> list[str]:
    """'where: port N is MESH's' for every port a mesh uses."""
    return [
        f"{where}: port {port} is {mesh}'s"
        for where, port in sorted(ports.items())
        for mesh, taken in MESH_PORTS.items()
        if port in taken
    ]


def test_the_check_knows_the_old_ports() -> None:
    """The old defaults (Istio's own) are caught: the check below can fail."""
    old = {"inbound": 15006, "outbound": 15001, "api": 15000, "peer": 15020, "admin": 15090}
    assert len(mesh_conflicts(old)) == 5
    assert mesh_conflicts({"x": 4191, "y": 21255, "z": 9090, "ok": 17006}) == [
        "x: port 4191 is Linkerd's",
        "y: port 21255 is Consul's",
        "z: port 9090 is Dapr's",
    ]


def _config_ports(where: str, config: Config) -> dict[str, int]:
    return {
        f"{where} listeners.{name}": parse_bind(getattr(config.listeners, name).bind)[1]
        for name in LISTENERS
    }


def test_config_defaults_and_example_stay_out_of_mesh_ports() -> None:
    ports = _config_ports("Config()", Config())
    ports |= {f"_DEFAULT_BINDS {n}": parse_bind(b)[1] for n, b in _DEFAULT_BINDS.items()}
    # a listener given in part keeps its default bind
    partial = validate(Config, {"listeners": {n: {} for n in LISTENERS}})
    ports |= _config_ports("partial listeners", partial)
    ports |= _config_ports("config/sidecar.yaml", load(ROOT / "config" / "sidecar.yaml", env={}))
    assert set(ports.values()) == {17000, 17001, 17006, 17020, 17090}
    assert not mesh_conflicts(ports)


def _manifest_ports(name: str) -> dict[str, int]:
    """Every container port, and every listener bind of every config a ConfigMap carries."""
    ports: dict[str, int] = {}
    for obj in render(name):
        if obj["kind"] in ("Deployment", "StatefulSet"):
            for c in all_containers(obj["spec"]["template"]["spec"]):
                for p in c.get("ports") or []:
                    ports[f"{name} {obj['metadata']['name']}/{c['name']}:{p['name']}"] = int(
                        p["containerPort"]
                    )
        if obj["kind"] == "ConfigMap":
            for key, text in (obj.get("data") or {}).items():
                listeners = (yaml.safe_load(text) or {}).get("listeners") or {}
                for lname, section in listeners.items():
                    if isinstance(section, dict) and "bind" in section:
                        where = f"{name} {obj['metadata']['name']}/{key} listeners.{lname}"
                        ports[where] = parse_bind(section["bind"])[1]
    return ports


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_manifest_ports_stay_out_of_mesh_ports(name: str) -> None:
    ports = _manifest_ports(name)
    assert ports, f"{name}: no ports found"
    assert not mesh_conflicts(ports)


def test_dockerfile_exposes_no_mesh_port() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    exposed = {
        f"EXPOSE {p}": int(p.split("/")[0])
        for line in text.splitlines()
        if line.startswith("EXPOSE ")
        for p in line.split()[1:]
    }
    assert exposed and not mesh_conflicts(exposed)


# --- the istio overlay ---------------------------------------------------------------------


def _ports_annotation(annotations: dict[str, str], key: str) -> set[int]:
    value = annotations.get(key, "")
    return {int(p) for p in value.split(",") if p.strip()}


def test_istio_overlay_leaves_peer_and_admin_to_the_sidecar(tmp_path: Path) -> None:
    s = sidecar("istio", tmp_path)
    objs = s.objs
    namespace = s.workload["metadata"]["namespace"]
    ns = one(objs, "Namespace", namespace)
    assert ns["metadata"]["labels"]["istio-injection"] == "enabled"
    assert all(o["metadata"].get("namespace") == namespace for o in objs if o is not ns)

    meta = s.pod["metadata"]
    assert meta["labels"]["sidecar.istio.io/inject"] == "true"
    annotations = meta["annotations"]
    inbound, peer, admin = s.port("inbound"), s.port("peer"), s.port("admin")
    # peer: signed calls from coordinators in or out of the mesh; admin: kubelet probes and
    # Prometheus in plain HTTP under STRICT mTLS
    excluded_in = _ports_annotation(annotations, "traffic.sidecar.istio.io/excludeInboundPorts")
    assert excluded_in == {peer, admin}
    assert inbound not in excluded_in, "callers reach the app through Istio's mTLS"
    # other pods exclude the peer port on the way in, so calls to it must bypass Envoy
    excluded_out = _ports_annotation(annotations, "traffic.sidecar.istio.io/excludeOutboundPorts")
    assert excluded_out == {peer}
    assert yaml.safe_load(annotations["proxy.istio.io/config"]) == {
        "holdApplicationUntilProxyStarts": True
    }
    # the sidecar's probes target the excluded admin port
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert s.container[probe]["httpGet"]["port"] == "admin"
    # the sidecar runs as a user Istio captures (not Istio's 1337): its upstream calls go
    # through Envoy
    assert s.spec["securityContext"]["runAsUser"] != 1337
    assert "runAsUser" not in s.container["securityContext"]

    # the Service points at the captured inbound port and declares HTTP for Istio
    svc = one(objs, "Service", APP)
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == "inbound" and port["appProtocol"] == "http"

    # NetworkPolicy: the sidecar's ports as in the base, Istio's metrics for monitoring only
    labels = meta["labels"]
    (policy,) = [
        p for p in find(objs, "NetworkPolicy") if labels_match(p["spec"]["podSelector"], labels)
    ]
    istio_rules: list[Obj] = [
        r for r in policy["spec"]["ingress"] if {p["port"] for p in r["ports"]} & {15020, 15090}
    ]
    assert len(istio_rules) == 1
    assert istio_rules[0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    assert [c["name"] for c in all_containers(s.spec)] == [SIDECAR, "app"]


def _walk_ports(node: object, where: str) -> dict[str, int]:
    """containerPort / port / targetPort numbers and host:port binds anywhere in a document."""
    found: dict[str, int] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}"
            if key in ("containerPort", "port", "targetPort") and isinstance(value, int):
                found[here] = value
            elif key in ("bind",) and isinstance(value, str) and ":" in value:
                found[here] = parse_bind(value)[1]
            else:
                found |= _walk_ports(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found |= _walk_ports(value, f"{where}[{i}]")
    return found


#: ports of Istio's own that a manifest may name on purpose (the istio overlay admits them)
ISTIO_OWN = {"deploy/k8s/overlays/istio/mesh-networkpolicy.yaml": {15020, 15090}}


def test_no_yaml_file_of_the_repository_binds_a_mesh_port() -> None:
    """Every YAML under config/ and deploy/ (the injector's too, and ConfigMap payloads):
    whatever port it names is clear of the meshes' (Istio's own, where it is admitted on
    purpose, excepted)."""
    checked = 0
    for path in sorted([*ROOT.glob("config/*.yaml"), *ROOT.glob("deploy/**/*.yaml")]):
        rel = str(path.relative_to(ROOT))
        for i, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            ports = _walk_ports(doc, f"{rel}#{i}")
            for key, text in (
                ((doc or {}).get("data") or {}).items() if isinstance(doc, dict) else ()
            ):
                if isinstance(text, str) and key.endswith((".yaml", ".yml")):
                    ports |= _walk_ports(yaml.safe_load(text), f"{rel}#{i}.data.{key}")
            allowed = ISTIO_OWN.get(rel, set())
            ports = {k: v for k, v in ports.items() if v not in allowed}
            checked += len(ports)
            assert not mesh_conflicts(ports)
    assert checked > 20
