"""Operations surface of a proxy: Prometheus metrics (Istio names), JSON access logs, admin HTTP.

Metrics use Istio's data-plane names and labels so existing dashboards work:
`istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
`istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`, labelled `reporter`
(source|destination), `source_workload`, `source_principal`, `destination_service`,
`destination_principal`, `source_cluster`, `destination_cluster`, `connection_security_policy`.
Label values come from config (workloads, services, identities), never from peers' free text, so
cardinality is bounded by the config. Outlier detection adds `meshfed_endpoint_ejections_total`,
`meshfed_endpoint_ejected` (gauge) and `meshfed_endpoint_outcomes_total` per endpoint of a service;
those series are removed when their endpoint leaves the config (`retain_endpoints`), so a proxy
that runs for months through pod churn keeps only the series of endpoints it can still reach.
The DNS responder counts `meshfed_dns_queries_total` by outcome (a fixed set).
Each proxy gets its own `CollectorRegistry` (several proxies can share a test process);
`_created` series are disabled (prometheus-client adds them by default).

Byte counters are added when a connection closes (not per chunk: the relay hot path stays free of
metric calls). The admin server is a deliberately tiny HTTP/1.0 GET responder on asyncio, bound
to a loopback address only (refused otherwise): `/ready`, `/config_dump`, `/metrics`, `/healthz`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

prometheus_client.disable_created_metrics()

log = logging.getLogger(__name__)
# Without an access log stream (`--access-log off`), one line per connection (and per refused
# connection) at DEBUG, never INFO (a busy proxy would log thousands a second).
access_log = logging.getLogger("ztunnel.access")
PER_CONNECTION_KINDS = frozenset({"access", "refused"})

ISTIO_LABELS = ("reporter", "source_workload", "source_principal", "destination_service",
                "destination_principal", "source_cluster", "destination_cluster",
                "connection_security_policy")


@dataclass(frozen=True, slots=True)
class ConnLabels:
    reporter: str
    source_workload: str = "unknown"
    source_principal: str = "unknown"
    destination_service: str = "unknown"
    destination_principal: str = "unknown"
    source_cluster: str = "unknown"
    destination_cluster: str = "unknown"
    connection_security_policy: str = "mutual_tls"

    def values(self) -> tuple[str, ...]:
        return (self.reporter, self.source_workload, self.source_principal, self.destination_service,
                self.destination_principal, self.source_cluster, self.destination_cluster,
                self.connection_security_policy)


class Telemetry:
    """Metrics and access log of one proxy."""

    def __init__(self, proxy_id: str, access_log: TextIO | None = None) -> None:
        self.proxy_id = proxy_id
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.opened = Counter("istio_tcp_connections_opened", "TCP connections opened", ISTIO_LABELS, registry=r)
        self.closed = Counter("istio_tcp_connections_closed", "TCP connections closed", ISTIO_LABELS, registry=r)
        self.sent = Counter("istio_tcp_sent_bytes", "Bytes sent to the destination", ISTIO_LABELS, registry=r)
        self.received = Counter("istio_tcp_received_bytes", "Bytes received from the destination",
                                ISTIO_LABELS, registry=r)
        self.ejections = Counter("meshfed_endpoint_ejections", "Outlier ejections enforced by this proxy",
                                 ("destination_service", "endpoint", "reason"), registry=r)
        self.ejected = Gauge("meshfed_endpoint_ejected", "1 while this proxy has the endpoint ejected",
                             ("destination_service", "endpoint"), registry=r)
        self.outcomes = Counter("meshfed_endpoint_outcomes", "Connection outcomes per endpoint",
                                ("destination_service", "endpoint", "outcome"), registry=r)
        self.refused = Counter("meshfed_connections_refused", "Connections refused by the proxy",
                               ("reporter", "reason"), registry=r)
        self.requests = Counter("istio_requests", "HTTP requests served by a waypoint or gateway",
                                ("reporter", "source_principal", "destination_service", "response_code"), registry=r)
        self.dns = Counter("meshfed_dns_queries", "DNS queries of pods, by what the node proxy did with them "
                           "(mesh, nodata, unanswered, forwarded, upstream_answered, servfail, truncated, ...)",
                           ("outcome",), registry=r)
        self.access_log = access_log
        # labelled children by label values (bounded like the label values: by the config)
        self._request_children: dict[tuple[str, str, str, int], Any] = {}
        self._outcome_children: dict[tuple[str, str, str], Any] = {}
        # (service, endpoint) -> the per-endpoint series it has: (metric, label values)
        self._endpoint_series: dict[tuple[str, str], set[tuple[Any, tuple[str, ...]]]] = {}

    def _note(self, service: str, endpoint: str, metric: Any, labels: tuple[str, ...]) -> None:
        series = self._endpoint_series.get((service, endpoint))
        if series is None:
            series = self._endpoint_series[(service, endpoint)] = set()
        series.add((metric, labels))

    def retain_endpoints(self, live: set[tuple[str, str]]) -> None:
        """Remove the per-endpoint series of every (service, endpoint) not in `live`, and the cached
        children of those series (a cached child of a removed series would count unseen for ever)."""
        for child_key in [k for k in self._outcome_children if (k[0], k[1]) not in live]:
            del self._outcome_children[child_key]
        for key in [k for k in self._endpoint_series if k not in live]:
            for metric, labels in self._endpoint_series.pop(key):
                try:
                    metric.remove(*labels)
                except KeyError:
                    pass

    def conn_opened(self, labels: ConnLabels) -> None:
        self.opened.labels(*labels.values()).inc()

    def conn_closed(self, labels: ConnLabels, sent_bytes: int, received_bytes: int) -> None:
        v = labels.values()
        self.closed.labels(*v).inc()
        if sent_bytes:
            self.sent.labels(*v).inc(sent_bytes)
        if received_bytes:
            self.received.labels(*v).inc(received_bytes)

    def endpoint_outcome(self, service: str, endpoint: str, outcome: str) -> None:
        key = (service, endpoint, outcome)
        child = self._outcome_children.get(key)
        if child is None:
            child = self._outcome_children[key] = self.outcomes.labels(service, endpoint, outcome)
            self._note(service, endpoint, self.outcomes, key)
        child.inc()

    def endpoint_ejected(self, service: str, endpoint: str, reason: str) -> None:
        self.ejections.labels(service, endpoint, reason).inc()
        self.ejected.labels(service, endpoint).set(1)
        self._note(service, endpoint, self.ejections, (service, endpoint, reason))
        self._note(service, endpoint, self.ejected, (service, endpoint))

    def endpoint_unejected(self, service: str, endpoint: str) -> None:
        self.ejected.labels(service, endpoint).set(0)
        self._note(service, endpoint, self.ejected, (service, endpoint))

    def request_done(self, reporter: str, source_principal: str, destination_service: str, status: int) -> None:
        key = (reporter, source_principal, destination_service, status)
        child = self._request_children.get(key)
        if child is None:  # labels() validates and locks: once per label set, not per request
            child = self._request_children[key] = self.requests.labels(reporter, source_principal,
                                                                       destination_service, str(status))
        child.inc()

    def dns_query(self, outcome: str) -> None:
        self.dns.labels(outcome).inc()

    def refusal(self, reporter: str, reason_code: str) -> None:
        self.refused.labels(reporter, reason_code).inc()

    def log(self, **fields: Any) -> None:
        """A connection's summary (or a proxy event such as an ejection): one JSON object per line on
        the access log stream when there is one (`--access-log stderr`, Envoy's access log), else to
        the `logging` tree (connections at DEBUG on `ztunnel.access`, events at INFO): never both,
        so no line is written twice to the same stderr."""
        fields.setdefault("ts", round(time.time(), 6))
        fields.setdefault("proxy", self.proxy_id)
        if self.access_log is not None:
            try:
                self.access_log.write(json.dumps(fields, separators=(",", ":"), default=str) + "\n")
                self.access_log.flush()
            except (OSError, ValueError):
                pass
            return
        per_conn = fields.get("kind") in PER_CONNECTION_KINDS
        logger, level = (access_log, logging.DEBUG) if per_conn else (log, logging.INFO)
        if logger.isEnabledFor(level):
            from ztunnel.api.logsetup import render_kv

            logger.log(level, f"{fields.get('kind', 'event')}: {render_kv(fields, ('kind', 'ts'))}",
                       extra={"fields": fields})

    def render(self) -> bytes:
        return generate_latest(self.registry)  # type: ignore[no-any-return]


def stderr_log() -> TextIO:
    return sys.stderr


REQUEST_TIMEOUT_S = 5.0
MAX_HEADER_LINES = 64


class AdminServer:
    """GET-only admin endpoints on a loopback address."""

    def __init__(self, host: str, port: int, *, ready: Callable[[], tuple[bool, str]],
                 config_dump: Callable[[], dict[str, Any]], telemetry: Telemetry) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"admin address {host} is not loopback; the admin port exposes config and must "
                             "stay local (use 127.0.0.1)")
        self.host, self.port = host, port
        self._ready = ready
        self._config_dump = config_dump
        self._telemetry = telemetry
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, self.host, self.port)
        sock = self.server.sockets[0]
        self.port = sock.getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # the whole request head within REQUEST_TIMEOUT_S and MAX_HEADER_LINES lines (each line
            # is bounded by the reader's 64 KiB limit): a client cannot hold the handler open
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                line = await reader.readline()
                for _ in range(MAX_HEADER_LINES):
                    if await reader.readline() in (b"\r\n", b"\n", b""):
                        break
                else:
                    return
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else "/"
            status, ctype, body = self.route(parts[0] if parts else "", path)
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, RuntimeError):
            pass  # ValueError: a line over the reader's limit; RuntimeError: uvloop's write after a reset
        finally:
            writer.close()

    def route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if path in ("/ready", "/healthz/ready"):
            ok, why = self._ready()
            return ("200 OK" if ok else "503 Service Unavailable"), "text/plain", (why + "\n").encode()
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/config_dump":
            return "200 OK", "application/json", json.dumps(self._config_dump(), indent=1, default=str).encode()
        if path == "/metrics":
            return "200 OK", prometheus_client.CONTENT_TYPE_LATEST, self._telemetry.render()
        return "404 Not Found", "text/plain", b"endpoints: /ready /healthz /config_dump /metrics\n"
