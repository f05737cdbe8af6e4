"""deploy/k8s: every kustomization renders (real kustomize), every object validates against
the Kubernetes JSON schema (offline, strict), and the manifests agree with the config the
sidecar actually loads: ports, probe paths, config and secret mounts, the journal volume,
drain time, the downward API, security settings."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar import cli
from sidecar.admin import build_admin_app
from sidecar.config import Config, load, parse_bind

from .kube import (
    BASE,
    CRD_API_VERSIONS,
    KUSTOMIZATIONS,
    ROOT,
    Obj,
    all_containers,
    container,
    find,
    labels_match,
    latest_schema_version,
    mount_for,
    one,
    port_number,
    prestop_sleep,
    render,
    validate_schema,
)

SIDECAR = "gts-sidecar"
APP = "example-app"
CONFIG_MAP = "gts-sidecar-config"
SECRET = "gts-sidecar-keys"
NATIVE = ["base", "persistent-journal", "coordinator", "istio"]
#: ports the istio overlay also admits: Istio's own metrics (its agent's and Envoy's)
ISTIO_METRICS_PORTS = {15020, 15090}
ALL = list(KUSTOMIZATIONS)
#: the coordinator overlay's database Secret (CloudNativePG's `<cluster>-app`): plausible values
DATABASE_SECRET = "gts-pg-app"
DATABASE_SECRET_EXAMPLE = {"username": "app", "host": "gts-pg-rw", "port": "5432", "dbname": "app"}

# --- rendering and schema ------------------------------------------------------------------


def schema_versions(name: str) -> list[str]:
    """The oldest Kubernetes each variant supports, and the newest schema shipped."""
    oldest = "1.25.0" if name == "legacy-sidecar" else "1.29.0"  # native sidecars: 1.29
    return [oldest, latest_schema_version()]


@pytest.mark.parametrize("name", ALL)
def test_renders_and_validates_against_the_kubernetes_schema(name: str) -> None:
    objs = render(name)
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "ConfigMap", "NetworkPolicy", "PodMonitor"} <= kinds
    for obj in objs:
        if obj["apiVersion"] in CRD_API_VERSIONS:
            continue  # not in the Kubernetes schema: test_custom_resources_are_well_formed
        for version in schema_versions(name):
            validate_schema(obj, version)


def test_secret_example_validates_and_holds_only_placeholders() -> None:
    secret = yaml.safe_load((BASE / "secret.example.yaml").read_text(encoding="utf-8"))
    validate_schema(secret, "1.29.0")
    assert secret["metadata"]["name"] == SECRET
    assert secret.get("data") is None, "stringData placeholders only"
    for key, value in secret["stringData"].items():
        assert "PLACEHOLDER" in value, f"{key}: not a placeholder"


@pytest.mark.parametrize("name", ALL)
def test_no_secret_is_committed(name: str) -> None:
    assert not find(render(name), "Secret"), "create the Secret by hand (docs/operations.md)"


@pytest.mark.parametrize("name", ALL)
def test_custom_resources_are_well_formed(name: str) -> None:
    objs = render(name)
    for pm in find(objs, "PodMonitor"):
        assert pm["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(pm["spec"]) <= {"selector", "podMetricsEndpoints", "namespaceSelector"}
        assert pm["spec"]["selector"]["matchLabels"]
        for ep in pm["spec"]["podMetricsEndpoints"]:
            assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
            assert re.fullmatch(r"\d+s", ep["interval"])
    for rule in find(objs, "PrometheusRule"):
        assert rule["apiVersion"] == "monitoring.coreos.com/v1"
        for group in rule["spec"]["groups"]:
            assert group["name"] and group["rules"]
            for r in group["rules"]:
                assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}
                assert r["alert"] and r["expr"].strip()


def _kustomization_files(directory: Path) -> set[str]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    used = {r for r in k.get("resources") or [] if not r.startswith("..")}
    used |= {p["path"] for p in k.get("patches") or [] if "path" in p}
    for gen in (k.get("configMapGenerator") or []) + (k.get("secretGenerator") or []):
        used |= set(gen.get("files") or [])
    return used


@pytest.mark.parametrize("name", ALL)
def test_every_file_of_a_kustomization_is_used(name: str) -> None:
    directory = KUSTOMIZATIONS[name]
    present = {p.name for p in directory.iterdir() if p.is_file()} - {"kustomization.yaml"}
    unused = present - _kustomization_files(directory) - {"secret.example.yaml"}
    assert not unused, f"{name}: files no kustomization uses: {sorted(unused)}"


# --- the config the sidecar loads ----------------------------------------------------------


def _secret_paths(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(key, str) and key.endswith("_file") and isinstance(value, str):
                yield value
            else:
                yield from _secret_paths(value)
    elif isinstance(node, list):
        for value in node:
            yield from _secret_paths(value)


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def localise(text: str, tmp: Path) -> tuple[str, dict[str, str]]:
    """The config text with each secret file replaced by a local one; and the originals."""
    paths = sorted(set(_secret_paths(yaml.safe_load(text))), key=len, reverse=True)
    originals = {}
    for i, path in enumerate(paths):
        local = tmp / f"secret-{i}-{Path(path).name}"
        local.write_text("test-secret-value\n", encoding="utf-8")
        text = text.replace(path, str(local))
        originals[path] = str(local)
    return text, originals


def pod_env(workload: Obj, c: Obj) -> dict[str, str]:
    """The environment the container would get: plain values, and plausible downward-API
    values. A config needing a variable the container lacks then fails to load."""
    pod_name = workload["metadata"]["name"] + (
        "-0" if workload["kind"] == "StatefulSet" else "-7d9f8b6c5-x2k4q"
    )
    facts = {
        "status.podIP": "10.1.2.3",
        "metadata.name": pod_name,
        "metadata.namespace": "default",
    }
    env = {}
    for var in c.get("env") or []:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var["valueFrom"]:  # the database's address, from its Secret
            env[var["name"]] = DATABASE_SECRET_EXAMPLE[var["valueFrom"]["secretKeyRef"]["key"]]
        else:
            env[var["name"]] = facts[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


class Loaded:
    """A workload's gts-sidecar container and the config it runs with."""

    def __init__(self, name: str, kind: str, workload: str, c_name: str, tmp: Path) -> None:
        self.objs = render(name)
        self.workload = one(self.objs, kind, workload)
        self.pod = self.workload["spec"]["template"]
        self.spec = self.pod["spec"]
        self.container = container(self.spec, c_name)
        args = self.container["args"]
        assert args[1] == "--config" and len(args) == 3, args
        self.command = args[0]
        self.config_path = args[2]
        mount, volume = mount_for(self.spec, self.container, self.config_path)
        assert volume is not None and "configMap" in volume
        assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
        assert mount.get("readOnly") is True
        self.config_map = one(self.objs, "ConfigMap", volume["configMap"]["name"])
        key = self.config_path[len(mount["mountPath"].rstrip("/")) + 1 :]
        self.text: str = self.config_map["data"][key]
        self.raw = yaml.safe_load(self.text)
        self.env = pod_env(self.workload, self.container)
        local, self.secrets = localise(self.text, tmp)
        self.local_path = tmp / "config.yaml"
        self.local_path.write_text(local, encoding="utf-8")
        self.config: Config = load(self.local_path, env=self.env)

    def port(self, listener: str) -> int:
        return parse_bind(getattr(self.config.listeners, listener).bind)[1]


def sidecar(name: str, tmp: Path) -> Loaded:
    return Loaded(name, "Deployment", APP, SIDECAR, tmp)


def coordinator(tmp: Path) -> Loaded:
    return Loaded("coordinator", "Deployment", "gts-coordinator", "coordinator", tmp)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    for sub in [*ALL, "coordinator-sts"]:
        (tmp_path / sub).mkdir()
    return tmp_path


DEFAULTS = Config()


def test_the_config_defaults_are_the_documented_ports() -> None:
    example = load(ROOT / "config" / "sidecar.yaml", env={})
    for cfg in (DEFAULTS, example):
        ports = {n: parse_bind(getattr(cfg.listeners, n).bind) for n in ("inbound", "peer")}
        assert ports == {"inbound": ("0.0.0.0", 17006), "peer": ("0.0.0.0", 17020)}
        assert parse_bind(cfg.listeners.admin.bind) == ("0.0.0.0", 17090)
        assert parse_bind(cfg.listeners.outbound.bind)[0] == "127.0.0.1"
        assert parse_bind(cfg.listeners.api.bind)[0] == "127.0.0.1"
        assert cfg.drain_timeout == 20.0


@pytest.mark.parametrize("name", ALL)
def test_every_config_map_passes_check_config(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gts-sidecar check-config` on each config file the ConfigMaps carry (with the secret
    files present and the environment a pod gives the container that mounts it)."""
    objs = render(name)
    checked = 0
    for workload in find(objs, "Deployment") + find(objs, "StatefulSet"):
        spec = workload["spec"]["template"]["spec"]
        for c in all_containers(spec):
            if c.get("args", [None])[0] not in ("run", "coordinator"):
                continue
            path = c["args"][2]
            mount, volume = mount_for(spec, c, path)
            assert volume is not None
            cm = one(objs, "ConfigMap", volume["configMap"]["name"])
            text, _ = localise(cm["data"][Path(path).name], tmp_path)
            local = tmp_path / f"{checked}-{Path(path).name}"
            local.write_text(text, encoding="utf-8")
            for var in re.findall(r"\$\{(\w+)\}", " ".join(_strings(yaml.safe_load(text)))):
                # a ${VAR} without a default: the pod must set it
                assert var in pod_env(workload, c), f"{c['name']}: config needs ${var}"
            for key in ("POD_IP", "POD_NAME", "POD_NAMESPACE"):
                monkeypatch.delenv(key, raising=False)
            for key, value in pod_env(workload, c).items():
                monkeypatch.setenv(key, value)
            assert cli.check_config(str(local)) == 0, capsys.readouterr().err
            checked += 1
    assert checked == (2 if name == "coordinator" else 1)


@pytest.mark.parametrize("name", ALL)
def test_ports_probes_and_paths_match_the_config(name: str, tmp: Path) -> None:
    s = sidecar(name, tmp / name)
    ports = {p["name"]: p["containerPort"] for p in s.container["ports"]}
    assert ports == {"inbound": s.port("inbound"), "peer": s.port("peer"), "admin": s.port("admin")}
    assert ports == {"inbound": 17006, "peer": 17020, "admin": 17090}
    for loopback in ("outbound", "api"):  # the app's, inside the pod: never a container port
        assert parse_bind(getattr(s.config.listeners, loopback).bind)[0] == "127.0.0.1"
    assert s.command == "run"
    check_probes(s)


class _NoState:
    pass


ADMIN_GET_ROUTES = {
    r.resource.canonical
    for r in build_admin_app(_NoState()).router.routes()  # type: ignore[arg-type]
    if r.method == "GET" and r.resource is not None
}


def check_probes(s: Loaded) -> None:
    c, admin = s.container, s.port("admin")
    expected = {
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
        "startupProbe": "/healthz",
    }
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert path in ADMIN_GET_ROUTES
        assert port_number(s.spec, get["port"]) == admin, probe


@pytest.mark.parametrize("name", ALL)
def test_grace_period_outlasts_pre_stop_and_drain(name: str, tmp: Path) -> None:
    for where, s in [(name, sidecar(name, tmp / name))] + (
        [("statefulset", coordinator(tmp / "coordinator-sts"))] if name == "coordinator" else []
    ):
        grace = s.spec["terminationGracePeriodSeconds"]
        own = prestop_sleep(s.container)
        assert own > 0, f"{where}: a preStop sleep lets endpoints update before SIGTERM"
        # native sidecars stop after the app, so the app's preStop counts too; a plain
        # container stops alongside it: the sum covers both
        everything = sum(prestop_sleep(c) for c in all_containers(s.spec))
        assert grace > everything + s.config.drain_timeout, (
            f"{where}: terminationGracePeriodSeconds {grace} must exceed the preStop sleeps "
            f"({everything}s) plus drain_timeout ({s.config.drain_timeout:g}s)"
        )


@pytest.mark.parametrize("name", NATIVE)
def test_native_sidecar(name: str, tmp: Path) -> None:
    s = sidecar(name, tmp / name)
    init = s.spec["initContainers"]
    assert [c["name"] for c in init] == [SIDECAR]
    assert init[0]["restartPolicy"] == "Always"
    assert "startupProbe" in init[0], "the app starts once the sidecar's startup probe passes"
    assert [c["name"] for c in s.spec["containers"]] == ["app"]


def test_legacy_sidecar_is_a_plain_first_container_that_holds_the_app(tmp: Path) -> None:
    s = sidecar("legacy-sidecar", tmp / "legacy-sidecar")
    assert not s.spec.get("initContainers")
    names = [c["name"] for c in s.spec["containers"]]
    assert names == [SIDECAR, "app"], "the sidecar must start first"
    for c in s.spec["containers"]:
        assert "restartPolicy" not in c, "the API server refuses it on regular containers"
    hook = " ".join(s.container["lifecycle"]["postStart"]["exec"]["command"])
    assert f"127.0.0.1:{s.port('admin')}/healthz" in hook
    app = container(s.spec, "app")
    assert prestop_sleep(s.container) > prestop_sleep(app), "the sidecar must outlive the app"
    text = (KUSTOMIZATIONS["legacy-sidecar"] / "kustomization.yaml").read_text(encoding="utf-8")
    assert "Start-up order is not guaranteed" in text


@pytest.mark.parametrize("name", ALL)
def test_pod_ip_reaches_the_advertised_address(name: str, tmp: Path) -> None:
    s = sidecar(name, tmp / name)
    assert s.raw["node"]["advertise_address"] == "${POD_IP}"
    env = {v["name"]: v for v in s.container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert s.config.node.advertise_address == "10.1.2.3"


@pytest.mark.parametrize("name", ALL)
def test_security_context_and_resources(name: str) -> None:
    for workload in find(render(name), "Deployment") + find(render(name), "StatefulSet"):
        spec = workload["spec"]["template"]["spec"]
        where = workload["metadata"]["name"]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, where
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec["automountServiceAccountToken"] is False, where
        for c in all_containers(spec):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
            res = c["resources"]
            for kind in ("cpu", "memory"):
                request = quantity(res["requests"][kind])
                limit = quantity(res["limits"][kind])
                assert 0 < request <= limit, f"{c['name']} {kind}"
            if c["name"] in (SIDECAR, "coordinator"):
                assert c["image"] == "registry.example.com/gts-sidecar:0.1.0", "images: applies"
                mount, volume = mount_for(spec, c, "/tmp/x")
                assert mount["mountPath"] == "/tmp", "a writable /tmp (SQLite's temp files)"


_UNITS = {"m": 1e-3, "": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity(value: str | int) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|)", str(value))
    assert m, f"unexpected quantity {value!r}"
    return float(m.group(1)) * _UNITS[m.group(2)]


def test_sidecar_resources_follow_the_benchmark() -> None:
    c = container(one(render("base"), "Deployment", APP)["spec"]["template"]["spec"], SIDECAR)
    assert c["resources"] == {
        "requests": {"cpu": "100m", "memory": "96Mi"},
        "limits": {"cpu": "1", "memory": "256Mi"},
    }
    text = (BASE / "deployment.yaml").read_text(encoding="utf-8")
    assert "bench/proxy_bench.py" in text, "say where the figures come from"


@pytest.mark.parametrize("name", ALL)
def test_journal_is_on_its_volume(name: str, tmp: Path) -> None:
    s = sidecar(name, tmp / name)
    journal = s.config.local_coordinator.journal
    assert journal.startswith("sqlite:////"), "an absolute path, on the journal volume"
    path = journal[len("sqlite:///") :]
    mount, volume = mount_for(s.spec, s.container, path)
    assert mount["mountPath"] == str(Path(path).parent), "the fence and locks live beside it"
    assert not mount.get("readOnly")
    assert mount["mountPath"] == s.container["workingDir"]
    assert volume is not None
    if name == "persistent-journal":
        claim = volume["persistentVolumeClaim"]["claimName"]
        pvc = one(s.objs, "PersistentVolumeClaim", claim)
        assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
        assert s.workload["spec"]["replicas"] == 1
        assert s.workload["spec"]["strategy"] == {"type": "Recreate"}
    else:
        assert "emptyDir" in volume and "medium" not in volume["emptyDir"], "not tmpfs"


@pytest.mark.parametrize("name", ALL)
def test_secret_files_come_from_the_documented_secret(name: str, tmp: Path) -> None:
    example = yaml.safe_load((BASE / "secret.example.yaml").read_text(encoding="utf-8"))
    loaded = [sidecar(name, tmp / name)]
    if name == "coordinator":
        loaded.append(coordinator(tmp / "coordinator-sts"))
    for s in loaded:
        assert s.config.admin.token_file is not None, "/admin/* needs a token"
        assert s.config.coordinator.signing.key_id is not None, "one shared signing key"
        for path in s.secrets:
            mount, volume = mount_for(s.spec, s.container, path)
            if s.raw.get("local_coordinator", {}).get("password_file") == path:
                # the replicated coordinator's database password: the database's own Secret
                assert volume is not None and volume["secret"]["secretName"] == DATABASE_SECRET
                continue
            assert volume is not None and volume["secret"]["secretName"] == SECRET
            assert mount.get("readOnly") is True and "subPath" not in mount
            assert Path(path).name in example["stringData"], f"{path}: not in the example"
        signing = s.raw["coordinator"]["signing"]
        assert Path(signing["secret_file"]).name == f"signing-key-{signing['key_id']}"


@pytest.mark.parametrize("name", ALL)
def test_service_network_policy_and_pod_monitor_reach_the_right_ports(name: str, tmp: Path) -> None:
    s = sidecar(name, tmp / name)
    labels = s.pod["metadata"]["labels"]
    assert labels_match(s.workload["spec"]["selector"], labels)

    svc = one(s.objs, "Service", APP)
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    targets = {port_number(s.spec, p["targetPort"]) for p in svc["spec"]["ports"]}
    assert targets == {s.port("inbound")}

    policies = [
        p for p in find(s.objs, "NetworkPolicy") if labels_match(p["spec"]["podSelector"], labels)
    ]
    assert len(policies) == 1
    policy = policies[0]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = {port["port"]: rule for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    extra = ISTIO_METRICS_PORTS if name == "istio" else set()
    assert set(rules) == {s.port("inbound"), s.port("peer"), s.port("admin")} | extra
    app_port = int(s.config.app.url.rsplit(":", 1)[1])
    assert app_port not in rules, "the app is reached only through the sidecar"
    peer_from = rules[s.port("peer")]["from"]
    assert {"podSelector": {}} in peer_from, "the namespace"
    coordinators = [f for f in peer_from if "namespaceSelector" in f]
    assert len(coordinators) == 1 and coordinators[0]["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/name": "gts-coordinator"}
    }
    assert len(peer_from) == 2, "nothing else may call the peer port"

    monitors = [
        m for m in find(s.objs, "PodMonitor") if labels_match(m["spec"]["selector"], labels)
    ]
    assert len(monitors) == 1
    for ep in monitors[0]["spec"]["podMetricsEndpoints"]:
        assert port_number(s.spec, ep["port"]) == s.port("admin")
        assert ep["path"] == "/metrics" and "/metrics" in ADMIN_GET_ROUTES


def test_coordinator_overlay(tmp: Path) -> None:
    c = coordinator(tmp / "coordinator-sts")
    app = sidecar("coordinator", tmp / "coordinator")
    assert c.command == "coordinator"
    deployment = c.workload
    labels = c.pod["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in c.container["ports"]}
    assert ports == {"peer": c.port("peer"), "admin": c.port("admin")}
    check_probes(c)

    # replicas on one PostgreSQL: three, at most one away at a time, no volume of their own
    assert deployment["spec"]["replicas"] == 3
    pdbs = [
        p
        for p in find(c.objs, "PodDisruptionBudget")
        if labels_match(p["spec"]["selector"], labels)
    ]
    assert len(pdbs) == 1 and pdbs[0]["spec"]["minAvailable"] == 2
    lc = c.config.local_coordinator
    assert lc.replicated, lc.journal
    assert lc.journal == "postgresql://app@gts-pg-rw:5432/app", "from the Secret's keys"
    assert not any("persistentVolumeClaim" in v for v in c.spec.get("volumes", []))
    assert lc.password_file is not None
    mount, volume = mount_for(c.spec, c.container, c.raw["local_coordinator"]["password_file"])
    assert volume is not None and volume["secret"]["secretName"] == DATABASE_SECRET

    # one Service for the cluster: any replica answers for any XID, only ready ones get calls
    svc = one(c.objs, "Service", "gts-coordinator")
    assert svc["spec"].get("clusterIP") != "None"
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == {"peer"}
    assert app.config.coordinator.endpoints == [
        f"http://{svc['metadata']['name']}:{c.port('peer')}"
    ]
    assert c.config.coordinator.signing.key_id == app.config.coordinator.signing.key_id
    assert c.container["readinessProbe"]["periodSeconds"] <= lc.lease / 2

    # the coordinator does not reload: its ConfigMap is hash-suffixed, so a change rolls it
    assert c.config_map["metadata"]["name"] != "gts-coordinator-config"
    assert app.config_map["metadata"]["name"] == CONFIG_MAP, "reloaded in place"

    policies = [
        p for p in find(c.objs, "NetworkPolicy") if labels_match(p["spec"]["podSelector"], labels)
    ]
    assert len(policies) == 1
    admitted = {port["port"] for rule in policies[0]["spec"]["ingress"] for port in rule["ports"]}
    assert admitted == {c.port("peer"), c.port("admin")}
    assert [m for m in find(c.objs, "PodMonitor") if labels_match(m["spec"]["selector"], labels)]
