"""The injector's config file (`gts-sidecar injector --config FILE`): a typed, validated,
frozen schema and `load(path)`, built like the sidecar's own (unknown keys are errors, every
problem reported with its key path). config/injector.yaml is the documented example.

Rules: pure apart from reading the file; the certificate files are only named here (the
server loads them, and loads them again when they change).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated, Final, Literal

from sidecar.config import Bind, Duration, LoggingConfig, Size, parse_as, read_yaml
from sidecar.schema import Before, Ge, Le, Len, Model, check, dump, model

#: a Kubernetes resource quantity as containers' resources take it (100m, 96Mi, 1, 0.5)
_QUANTITY_RE: Final = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?\Z")
#: a DNS-1123 subdomain (ConfigMap and Secret names)
_OBJECT_NAME_RE: Final = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z")
#: a ConfigMap key (the file name the sidecar's config has in the mounted directory)
_CONFIG_KEY_RE: Final = re.compile(r"^[-._a-zA-Z0-9]{1,253}\Z")


def _quantity(value: object) -> object:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and not _QUANTITY_RE.match(value):
        raise ValueError(f"invalid resource quantity {value!r} (e.g. 100m, 1, 96Mi)")
    return value


def _object_name(value: object) -> object:
    if isinstance(value, str) and not _OBJECT_NAME_RE.match(value):
        raise ValueError(f"invalid Kubernetes object name {value!r} (lowercase DNS name)")
    return value


def _config_key(value: object) -> object:
    if isinstance(value, str) and (not _CONFIG_KEY_RE.match(value) or value in (".", "..")):
        raise ValueError(f"invalid ConfigMap key {value!r}")
    return value


def _image(value: object) -> object:
    if isinstance(value, str) and (not value or any(c.isspace() for c in value)):
        raise ValueError(f"must be one image reference (repository/name:tag), not {value!r}")
    return value


Quantity = Annotated[str, Before(_quantity)]
ObjectName = Annotated[str, Before(_object_name)]
Port = Annotated[int, Ge(1), Le(65535)]


@model
class TlsFiles(Model):
    #: PEM certificate chain and key (a cert-manager Secret: tls.crt, tls.key)
    cert_file: Annotated[str, Len(1)]
    key_file: Annotated[str, Len(1)]
    #: how often the two files are checked for a change (a renewed certificate)
    reload_interval: Duration = 10.0
    #: a client must complete its TLS handshake within this (a slow handshake holds a socket)
    handshake_timeout: Duration = 10.0


@model
class ListenConfig(Model):
    bind: Bind = "0.0.0.0:17443"
    tls: TlsFiles


@model
class SidecarPorts(Model):
    """The ports the injected sidecar listens on: they must be the binds of the config it
    is given (the ConfigMap), and no container of the pod may use them."""

    inbound: Port = 17006
    outbound: Port = 17001
    api: Port = 17000
    peer: Port = 17020
    admin: Port = 17090

    @check
    def _distinct(self) -> None:
        values = list(dump(self).values())
        if len(set(values)) != len(values):
            raise ValueError(f"the sidecar's ports must differ from each other: {values}")


@model
class ResourceAmounts(Model):
    cpu: Quantity
    memory: Quantity


@model
class Resources(Model):
    # measured: ~63 MiB RSS idle, one core saturated at ~22k requests/s (README)
    requests: ResourceAmounts = ResourceAmounts(cpu="100m", memory="96Mi")
    limits: ResourceAmounts = ResourceAmounts(cpu="1", memory="256Mi")


@model
class InjectConfig(Model):
    #: the gts-sidecar image to inject (the image this injector runs is a fine choice)
    image: Annotated[str, Before(_image)]
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    #: the ConfigMap with the sidecar's config, in the pod's namespace
    config_map: ObjectName = "gts-sidecar-config"
    #: the config's key in that ConfigMap (its file name in /etc/gts-sidecar)
    config_key: Annotated[str, Before(_config_key)] = "sidecar.yaml"
    #: the Secret with the signing key and admin token (mounted at /var/run/secrets/gts);
    #: null for a config that names no secret file
    secret: ObjectName | None = "gts-sidecar-keys"
    #: the app's port when the pod has no sidecar.gts.io/app-port annotation
    default_app_port: Port = 8080
    ports: SidecarPorts = SidecarPorts()
    resources: Resources = Resources()
    #: the journal's emptyDir (a pod's journal lives as long as the pod)
    journal_size_limit: Quantity = "1Gi"
    #: the sidecar's preStop sleep, so endpoints drop the pod before its drain starts
    pre_stop_sleep: Duration = 5.0

    @check
    def _default_port_free(self) -> None:
        if self.default_app_port in dump(self.ports).values():
            raise ValueError(
                f"default_app_port {self.default_app_port} is one of the sidecar's ports"
            )


@model
class InjectorConfig(Model):
    listen: ListenConfig
    inject: InjectConfig
    logging: LoggingConfig = LoggingConfig()
    #: the largest AdmissionReview accepted (a pod with a large spec is still well below)
    max_request_bytes: Annotated[Size, Ge(64 * 1024), Le(64 * 1024 * 1024)] = 8 * 1024 * 1024


def parse(data: object, env: Mapping[str, str] | None = None) -> InjectorConfig:
    return parse_as(InjectorConfig, data, env)


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> InjectorConfig:
    """Read, substitute (${VAR}) and validate one injector config file."""
    return parse(read_yaml(path), env)
