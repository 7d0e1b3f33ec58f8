"""Waypoint on loopback: app → ztunnel A → (HBONE, as the app) → waypoint → (HBONE, as the waypoint,
naming the caller) → ztunnel B → demo echo servers. Real sockets, real mTLS, in this event loop.

What is proven: the node sends a service with a waypoint to it; routing and the 80/20 split happen
per request (on one keep-alive connection); a request-level DENY refuses DELETE with the policy in
the access log; the pod sees the caller's identity, not the waypoint's; a backend answering 503
is retried elsewhere and ejected by 5xx outlier detection (0 failed requests); connectionPool limits
overflow with 503; h2c requests work; no ready waypoint pod means refusal, not a bypass."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest

from clusters.lab.demo_server import PROXY_LABEL, DemoServer
from tests.integration import dataplane_topology as topo
from ztunnel.api.config import (
    Authorization,
    AuthzMatch,
    ConnectionPoolPolicy,
    Header,
    HeaderModifier,
    HttpBackend,
    HttpMatch,
    HttpRoute,
    HttpRouteRule,
    NamedMatch,
    OutlierPolicy,
    ProxyConfig,
    ProxyMode,
    RetryPolicy,
    StringMatch,
    UrlRewrite,
    WaypointRef,
)
from ztunnel.proxy.admin import Telemetry
from ztunnel.proxy.base import Credentials, ProxyOptions
from ztunnel.proxy.node import NodeProxy
from ztunnel.proxy.waypoint import L7Proxy
from ztunnel.xds.state import ProxyState

pytestmark = pytest.mark.timeout(90)

TD = "east.mesh"
NS = "shop"
CLIENT = topo.Pod("east", "a", "frontend", "127.55.1.101", topo.ident(TD, NS, "frontend"), NS, node_address="127.55.1.11")
V1 = [topo.Pod("east", "b", f"checkout-{i}", f"127.55.1.{110 + i}", topo.ident(TD, NS, "checkout"), NS,
               node_address="127.55.1.12", labels={PROXY_LABEL: "v2", "app": "checkout"}) for i in range(2)]
V2 = topo.Pod("east", "b", "checkout-v2-0", "127.55.1.120", topo.ident(TD, NS, "checkout"), NS,
              node_address="127.55.1.12", labels={PROXY_LABEL: "v2", "app": "checkout-v2"})
WP_ADDR = "127.55.1.50"
WP_ID = topo.ident(TD, NS, "waypoint")
HOST = "checkout.shop.svc.clusterset.local"
HOST_V2 = "checkout-v2.shop.svc.clusterset.local"
VIP = "127.55.200.1"
PORT = 8080


@dataclass
class Mesh:
    a: NodeProxy
    b: NodeProxy
    wp: L7Proxy
    servers: dict[str, DemoServer]
    log: io.StringIO
    a_log: io.StringIO       # the client's node ztunnel's access log

    @property
    def socks(self) -> tuple[str, int]:
        return (CLIENT.node_address, self.a.opts.socks_port)

    def requests_logged(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.getvalue().splitlines() if '"kind":"request"' in line]


def configs(hbone: int, *, wp_addresses: tuple[str, ...] = (), outlier: OutlierPolicy | None = None,
            pool: ConnectionPoolPolicy | None = None, routes: tuple[HttpRoute, ...] = (),
            authz: tuple[Authorization, ...] = (), retry: RetryPolicy | None = None) -> tuple[ProxyConfig, ...]:
    wp = WaypointRef("waypoint", NS, WP_ID, wp_addresses or (f"{WP_ADDR}:{hbone}",), (WP_ID,))
    checkout = replace(topo.service(HOST, VIP, 80, PORT, [topo.endpoint(p, PORT, hbone) for p in V1],
                                    outlier=outlier), waypoint=wp, connection_pool=pool)
    v2 = replace(topo.service(HOST_V2, "127.55.200.2", 80, PORT, [topo.endpoint(V2, PORT, hbone)], outlier=outlier),
                 waypoint=wp)
    pods = [CLIENT, *V1, V2]
    wl = [p.workload() for p in pods]
    if routes and retry is not None:
        routes = tuple(replace(r, rules=tuple(replace(x, retry=retry) for x in r.rules)) for r in routes)
    a = topo.proxy_config("ztunnel/east/a", "east", TD, workloads=wl, services=[checkout, v2], bundles=[TD],
                          local_identities=[CLIENT.identity])
    b = topo.proxy_config("ztunnel/east/b", "east", TD, workloads=wl, services=[checkout, v2], bundles=[TD],
                          local_identities=[V1[0].identity])
    w = replace(topo.proxy_config(f"waypoint/east/{NS}/waypoint", "east", TD, mode=ProxyMode.WAYPOINT,
                                  services=[checkout, v2], bundles=[TD], local_identities=[WP_ID],
                                  authorizations=authz),
                http_routes=routes)
    return a, b, w


SPLIT = HttpRoute(NS, "canary", "HTTPRoute", (f"Service/{HOST}:80",), (
    HttpRouteRule(name="pinned", matches=(HttpMatch(headers=(NamedMatch("x-canary", "always"),)),),
                  backends=(HttpBackend("Service", HOST_V2, 80),)),
    HttpRouteRule(name="split", backends=(HttpBackend("Service", HOST, 80, 80), HttpBackend("Service", HOST_V2, 80, 20))),
))
DENY_DELETE = Authorization("no-delete", NS, "DENY", (AuthzMatch(methods=("DELETE",)),), targets=(f"Service/{NS}/checkout",))


async def start_mesh(hbone: int, **kw: object) -> Mesh:
    servers: dict[str, DemoServer] = {}
    for p in [*V1, V2]:
        s = DemoServer("east", NS, p.name, p.node)
        s.address = p.address
        s.server = await asyncio.start_server(s.handle, p.address, PORT)  # type: ignore[attr-defined]
        servers[p.name] = s
    ca, cb, cw = configs(hbone, **kw)  # type: ignore[arg-type]

    def node(cfg: ProxyConfig, ip: str, ident: str, access_log: io.StringIO | None = None) -> NodeProxy:
        st = ProxyState()
        assert st.apply(cfg).applied
        return NodeProxy(st, Credentials({ident: topo.svid(ident)}),
                         ProxyOptions(hbone_host=ip, hbone_port=hbone, socks_host=ip, socks_port=0, handshake_timeout_s=1.0),
                         Telemetry(cfg.proxy_id, access_log) if access_log is not None else None)

    a_log = io.StringIO()
    a = node(ca, CLIENT.node_address, CLIENT.identity, a_log)
    b = node(cb, V1[0].node_address, V1[0].identity)
    st = ProxyState()
    assert st.apply(cw).applied
    log = io.StringIO()
    wp = L7Proxy(st, Credentials({WP_ID: topo.svid(WP_ID)}),
                 ProxyOptions(hbone_host=WP_ADDR, hbone_port=hbone, socks_host=None, handshake_timeout_s=1.0),
                 Telemetry(cw.proxy_id, log))
    for p in (a, b, wp):
        await p.start()  # type: ignore[attr-defined]
    return Mesh(a, b, wp, servers, log, a_log)


async def stop_mesh(m: Mesh) -> None:
    for p in (m.a, m.wp, m.b):
        await p.drain(0.1)
    for s in m.servers.values():
        s.server.close()  # type: ignore[attr-defined]


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    m = await start_mesh(topo.free_port(CLIENT.node_address), routes=(SPLIT,), authz=(DENY_DELETE,),
                         outlier=OutlierPolicy(consecutive_5xx_errors=3, max_ejection_percent=100,
                                               base_ejection_time_s=30.0))
    yield m
    await stop_mesh(m)


class Client:
    """One keep-alive HTTP/1.1 connection through the client's ztunnel (SOCKS)."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w = r, w

    @classmethod
    async def open(cls, m: Mesh, host: str = HOST) -> Client:
        r, w = await topo.socks_connect(m.socks, host, 80, CLIENT.address)
        return cls(r, w)

    async def request(self, method: str = "GET", path: str = "/", headers: dict[str, str] | None = None,
                      body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        hs = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.w.write(f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n{hs}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await asyncio.wait_for(self.r.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        rh = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        data = await self.r.readexactly(int(rh.get("content-length", "0")))
        return status, rh, data

    def close(self) -> None:
        self.w.close()


async def test_a_connection_sent_to_the_waypoint_closes_cleanly_and_is_logged(mesh: Mesh) -> None:
    """The source's access log names the waypoint and its address (`via`). Its `via` was once
    passed twice (the endpoint's and the route's), which raised in the relay's close callback: no
    access log line, the inner session never drained, and the client's socket reset by asyncio."""
    errors: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    try:
        c = await Client.open(mesh)
        status, _, _ = await c.request()
        assert status == 200
        c.close()
        for _ in range(100):
            if '"direction":"outbound"' in mesh.a_log.getvalue():
                break
            await asyncio.sleep(0.02)
    finally:
        loop.set_exception_handler(None)
    lines = [json.loads(ln) for ln in mesh.a_log.getvalue().splitlines()]
    out = [ln for ln in lines if ln.get("kind") == "access" and ln.get("direction") == "outbound"]
    assert [(ln["waypoint"], ln["via"]) for ln in out] == [(f"{NS}/waypoint", f"{WP_ADDR}:{mesh.wp.opts.hbone_port}")], lines
    assert errors == []


async def test_per_request_split_caller_identity_and_policy(mesh: Mesh) -> None:
    c = await Client.open(mesh)
    served: dict[str, int] = {}
    n = 1000
    for _ in range(n):
        status, _h, body = await c.request()
        assert status == 200
        info = json.loads(body)
        served[info["pod"]] = served.get(info["pod"], 0) + 1
        # the pod sees the caller (through the waypoint), not the waypoint
        assert info["peer_identity"] == CLIENT.identity
    v2 = served.get(V2.name, 0)
    assert abs(v2 / n - 0.2) < 0.045, served   # one connection, per-request split
    assert set(served) == {V1[0].name, V1[1].name, V2.name}
    status, _h, body = await c.request(headers={"x-canary": "always"})
    assert status == 200 and json.loads(body)["pod"] == V2.name
    status, _h, body = await c.request("DELETE", "/orders/1")
    assert status == 403 and body == b"RBAC: access denied"
    c.close()
    denied = [r for r in mesh.requests_logged() if r.get("status") == 403]
    assert denied and denied[-1]["policy"] == f"{NS}/no-delete" and "denied by DENY policy" in str(denied[-1]["reason"])
    metrics = mesh.wp.telemetry.render().decode()
    assert 'istio_requests_total{destination_service="checkout.shop.svc.clusterset.local",reporter="waypoint",' in metrics


async def test_503_backend_is_retried_then_ejected_without_failed_requests(mesh: Mesh) -> None:
    mesh.servers[V1[0].name].set_behaviour("Error503")
    c = await Client.open(mesh)
    statuses = [(await c.request(headers={"x-canary": "never"}))[0] for _ in range(60)]
    c.close()
    assert statuses == [200] * 60   # retried on the other hosts (Istio's default: 503 is retriable)
    assert f"east/{NS}/{V1[0].name}" in mesh.wp.ejected(HOST)
    assert f"east/{NS}/{V1[1].name}" not in mesh.wp.ejected(HOST)
    retried = [r for r in mesh.requests_logged() if r.get("retried")]
    assert retried and all(r["status"] == 200 for r in retried)


async def test_h2c_through_the_waypoint(mesh: Mesh) -> None:
    import h2.config
    import h2.connection
    import h2.events

    r, w = await topo.socks_connect(mesh.socks, HOST, 80, CLIENT.address)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    for sid in (1, 3):
        conn.send_headers(sid, [(":method", "GET"), (":path", f"/h2/{sid}"), (":authority", HOST), (":scheme", "http")],
                          end_stream=True)
    w.write(conn.data_to_send())
    bodies: dict[int, bytes] = {}
    ended: set[int] = set()
    while ended != {1, 3}:
        data = await asyncio.wait_for(r.read(65536), 10)
        assert data
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.DataReceived):
                bodies[ev.stream_id] = bodies.get(ev.stream_id, b"") + ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                ended.add(ev.stream_id)
        w.write(conn.data_to_send())
    w.close()
    assert json.loads(bodies[1])["path"] == "/h2/1" and json.loads(bodies[3])["path"] == "/h2/3"


async def test_connection_pool_overflow() -> None:
    # every request is slow; one upstream connection, one waiter: the third concurrent one overflows
    m = await start_mesh(topo.free_port(CLIENT.node_address),
                         pool=ConnectionPoolPolicy(max_connections=1, http1_max_pending_requests=1))
    try:
        for s in m.servers.values():
            s.set_behaviour("Slow")
            s.slow_ms = 300
        clients = [await Client.open(m) for _ in range(3)]
        results = await asyncio.gather(*(c.request() for c in clients))
        codes = sorted(status for status, _h, _b in results)
        assert codes == [200, 200, 503], codes
        overflow = next(h for status, h, _b in results if status == 503)
        assert overflow.get("x-envoy-overloaded") == "true"
        assert m.wp.budgets[HOST].overflows == 1 and m.wp.budgets[HOST].active <= 1
        for c in clients:
            c.close()
    finally:
        await stop_mesh(m)


async def test_no_ready_waypoint_pod_refuses_instead_of_bypassing() -> None:
    hbone = topo.free_port(CLIENT.node_address)
    m = await start_mesh(hbone)
    try:
        ca, _cb, _cw = configs(hbone)
        none_ready = replace(ca, stamp=replace(ca.stamp, version=2), services=tuple(
            replace(s, waypoint=replace(s.waypoint, addresses=())) if s.waypoint else s for s in ca.services))
        assert m.a.state.apply(none_ready).applied
        m.a.on_config_applied()
        with pytest.raises(ConnectionRefusedError):
            await topo.socks_connect(m.socks, HOST, 80, CLIENT.address)
        assert all(s.served == 0 for s in m.servers.values())
    finally:
        await stop_mesh(m)


async def test_filters_reach_the_pod_and_retries_off_let_503_through() -> None:
    route = HttpRoute(NS, "rewrite", "HTTPRoute", (f"Service/{HOST}:80",), (
        HttpRouteRule(name="api", matches=(HttpMatch(path=StringMatch("PathPrefix", "/api")),),
                      request_headers=HeaderModifier(set=(Header("x-tenant", "acme"),), remove=("x-debug",)),
                      rewrite=UrlRewrite(path_kind="ReplacePrefixMatch", path="/v2"),
                      backends=(HttpBackend("Service", HOST, 80),)),))
    m = await start_mesh(topo.free_port(CLIENT.node_address), routes=(route,), retry=RetryPolicy(attempts=0))
    try:
        c = await Client.open(m)
        status, _h, body = await c.request(path="/api/items?x=1", headers={"x-tenant": "other", "x-debug": "1"})
        info = json.loads(body)
        assert status == 200 and info["path"] == "/v2/items?x=1"
        assert info["headers"]["x-tenant"] == "acme" and "x-debug" not in info["headers"]
        status, _h, _b = await c.request(path="/elsewhere")
        assert status == 404  # the service has a route and no rule matches
        for s in m.servers.values():
            s.set_behaviour("Error503")
        status, _h, _b = await c.request(path="/api/x")
        assert status == 503  # attempts: 0, the pod's own 503 reaches the client
        c.close()
        assert [r["attempts"] for r in m.requests_logged() if r.get("status") == 503] == [1]
    finally:
        await stop_mesh(m)


async def test_idle_upstream_connections_to_removed_endpoints_are_closed() -> None:
    hbone = topo.free_port(CLIENT.node_address)
    m = await start_mesh(hbone, pool=ConnectionPoolPolicy(max_connections=4))
    try:
        c = await Client.open(m)
        for _ in range(4):
            assert (await c.request())[0] == 200
        c.close()
        assert m.wp.budgets[HOST].active >= 1 and any(k[0].startswith(f"east/{NS}/checkout-") for k in m.wp.idle)
        _a, _b, cw = configs(hbone, pool=ConnectionPoolPolicy(max_connections=4))
        gone = replace(cw, stamp=replace(cw.stamp, version=2), services=tuple(
            replace(s, endpoints=()) if s.hostname == HOST else s for s in cw.services))
        assert m.wp.state.apply(gone).applied
        m.wp.on_config_applied()
        assert not any(k[0].startswith(f"east/{NS}/checkout-") and "v2" not in k[0] for k in m.wp.idle)
        assert m.wp.budgets[HOST].active == 0
    finally:
        await stop_mesh(m)


async def test_path_and_host_spellings_cannot_bypass_a_deny_and_the_pod_sees_the_normalized_request() -> None:
    """Security review finding 1, through real processes: the waypoint decides on the normalized
    request and forwards exactly that (the demo pod echoes the path and Host it received)."""
    deny = (Authorization("no-admin", NS, "DENY", (AuthzMatch(paths=("/admin*",)),), targets=(f"Service/{NS}/checkout",)),
            Authorization("no-internal", NS, "DENY", (AuthzMatch(hosts=("internal.example.com",)),),
                          targets=(f"Service/{NS}/checkout",)))
    m = await start_mesh(topo.free_port(CLIENT.node_address), authz=deny)
    try:
        c = await Client.open(m)
        for target in ("/admin/users", "//admin/users", "/./admin", "/x/../admin", "/%61dmin", "/%2e/admin",
                       f"http://{HOST}/admin"):
            status, _h, body = await c.request(path=target)
            assert (status, body) == (403, b"RBAC: access denied"), target
        status, _h, body = await c.request(path="/public//a/./b/../c?q=%2F")
        info = json.loads(body)
        assert status == 200 and info["path"] == "/public/a/c?q=%2F"
        c.close()
        for raw, want in ((f"GET /%2Fadmin HTTP/1.1\r\nHost: {HOST}\r\n\r\n", 400),
                          ("GET / HTTP/1.1\r\nHost: INTERNAL.example.com.:80\r\n\r\n", 403),
                          (f"GET / HTTP/1.1\r\nHost: {HOST}\r\nHost: internal.example.com\r\n\r\n", 400),
                          (f"GET / HTTP/1.1\r\nHost: {HOST.upper()}.\r\n\r\n", 200)):
            r, w = await topo.socks_connect(m.socks, HOST, 80, CLIENT.address)
            w.write(raw.encode())
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            assert int(head.split()[1]) == want, raw
            if want == 200:
                length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")))
                assert json.loads(await r.readexactly(length))["headers"]["host"] == HOST
            w.close()
        refused = [r for r in m.requests_logged() if r.get("status") == 400]
        assert any("encoded slash" in str(r.get("reason")) for r in refused)
        assert sum(s.served for s in m.servers.values()) == 2   # only the two allowed requests reached a pod
    finally:
        await stop_mesh(m)
