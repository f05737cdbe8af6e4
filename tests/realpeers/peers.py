"""What the nginx tests share: nginx configurations (the `http {}` contents the nginx fixture
formats), XIDs, and readers of what nginx and the sidecar saw (nginx's access log, the
kernel's TCP table, the sidecar's metrics)."""

from __future__ import annotations

from typing import Any

from tests.component.servers import sample

GOOD_XID = "10.0.0.1:8091:2001"
TRUNCATED_XID = "10.0.0.1:8091:"


def xid(i: int) -> str:
    """A valid XID of its own for request `i`."""
    return f"10.0.0.1:8091:{3000 + i}"


#: nginx as an ingress in front of the inbound listener, configured as the nginx docs say
#: for upstream keep-alive
INGRESS = """\
    upstream sidecar {{
        server 127.0.0.1:{inbound};
        keepalive 8;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://sidecar;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""

#: nginx's proxy_pass as it comes: HTTP/1.0 to the sidecar, `Connection: close`, a new
#: connection per request
INGRESS_HTTP10 = """\
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{inbound};
        }}
    }}"""

#: an ingress that streams both ways: the request body goes on as it comes (chunked, the
#: length unknown to nginx's upstream side), the answer is passed on unbuffered
INGRESS_STREAMING = """\
    upstream sidecar {{
        server 127.0.0.1:{inbound};
        keepalive 8;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://sidecar;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
        }}
    }}"""

#: nginx as a gRPC ingress: HTTP/2 with prior knowledge on both sides, keep-alive upstream
GRPC_INGRESS = """\
    upstream sidecar {{
        server 127.0.0.1:{inbound};
        keepalive 8;
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        client_max_body_size 0;
        location / {{
            grpc_pass grpc://sidecar;
        }}
    }}"""

#: nginx as a server (the app, or an outbound upstream): answers every request itself
SERVER = """\
    server {{
        listen 127.0.0.1:{port};
        keepalive_timeout {keepalive_timeout};
        keepalive_requests {keepalive_requests};
        location / {{
            return 200 "ok\\n";
        }}
    }}"""

#: the same over HTTP/2 with prior knowledge (h2c)
H2_SERVER = """\
    server {{
        listen 127.0.0.1:{port} http2;
        keepalive_timeout {keepalive_timeout};
        keepalive_requests {keepalive_requests};
        location / {{
            return 200 "ok\\n";
        }}
    }}"""


#: an ingress that speaks TLS to the inbound listener, verifying its certificate
TLS_INGRESS = """\
    upstream sidecar {{
        server 127.0.0.1:{inbound};
        keepalive 8;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass https://sidecar;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
        }}
    }}"""

#: nginx as a server terminating TLS, HTTP/1.1 or (`{http2}` = "http2") HTTP/2 by ALPN
TLS_SERVER = """\
    server {{
        listen 127.0.0.1:{port} ssl {http2};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        keepalive_timeout {keepalive_timeout};
        keepalive_requests {keepalive_requests};
        location / {{
            return 200 "ok\\n";
        }}
    }}"""


def connections_to(port: int) -> set[int]:
    """The local ports of every IPv4 TCP socket on this host whose peer is 127.0.0.1:`port`,
    in any state (TIME_WAIT included): the client side of each connection ever made to it
    that the kernel still remembers."""
    found = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            local, remote = line.split()[1:3]
            if remote == f"0100007F:{port:04X}":
                found.add(int(local.split(":")[1], 16))
    return found


def fields(line: str) -> dict[str, str]:
    """The key=value fields of one access log line (see conftest.LOG_FORMAT)."""
    out = {"method": line.split(" ", 1)[0]}
    for part in line.split(" ")[2:]:
        key, _, value = part.partition("=")
        out[key] = value.strip('"')
    return out


def retries(sc: Any, upstream: str = "app") -> float:
    return sample(sc, "gts_sidecar_upstream_retries_total", upstream=upstream)


def declarative(sc: Any, name: str, status: str) -> float:
    labels = {"name": name, "status": status}
    value = sc.metrics.registry.get_sample_value(
        "gts_sidecar_declarative_transactions_total", labels
    )
    return 0.0 if value is None else float(value)


def idle(sc: Any, upstream: str = "app") -> float:
    return sample(sc, "gts_sidecar_pool_connections_idle", upstream=upstream)
