"""Ingress gateway on loopback: an HTTP client → the ingress (plain HTTP on a Gateway listener) →
(HBONE, as the gateway) → ztunnel B → model servers (the lab's demo server in model-server mode).

What is proven: the InferencePool's built-in picker sends requests to the pod with the shortest
queue (a slow pod gets few), honours the model name (a v2 request goes to the v2 pod only; an
unknown model is 404), reads the pods' metrics endpoint; a Service backend is routed by weight;
a route on another hostname does not take the request."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from clusters.lab.demo_server import PROXY_LABEL, DemoServer
from tests.integration import dataplane_topology as topo
from ztunnel.api.config import (
    HttpBackend,
    HttpMatch,
    HttpRoute,
    HttpRouteRule,
    InferencePool,
    Listener,
    ProxyMode,
    StringMatch,
)
from ztunnel.proxy.base import Credentials, ProxyOptions
from ztunnel.proxy.node import NodeProxy
from ztunnel.proxy.waypoint import L7Proxy
from ztunnel.xds.state import ProxyState

pytestmark = pytest.mark.timeout(90)

TD = "east.mesh"
NS = "ai"
PORT = 8000
PODS = [topo.Pod("east", "b", name, f"127.55.3.{110 + i}", topo.ident(TD, NS, name.rsplit("-", 1)[0]), NS,
                 node_address="127.55.3.12", labels={PROXY_LABEL: "v2", "pool": "llm"})
        for i, name in enumerate(["v1-0", "v1-1", "v2-0"])]
INGRESS_IP = "127.55.3.60"
INGRESS_ID = topo.ident(TD, NS, "gw-istio")


@dataclass
class Mesh:
    ingress: L7Proxy
    b: NodeProxy
    servers: dict[str, DemoServer]
    port: int


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    hbone = topo.free_port(INGRESS_IP)
    listen = topo.free_port(INGRESS_IP)
    servers = {}
    for p in PODS:
        model = "llm-v2" if p.name.startswith("v2") else "llm-v1"
        s = DemoServer("east", NS, p.name, p.node, model=model, model_latency_ms=300.0 if p.name == "v1-0" else 20.0)
        s.server = await asyncio.start_server(s.handle, p.address, PORT)  # type: ignore[attr-defined]
        servers[p.name] = s
    pool = InferencePool(NS, "pool", (PORT,), tuple(topo.endpoint(p, PORT, hbone) for p in PODS), "epp", "FailClose")
    v1 = topo.service("v1.ai.svc.clusterset.local", "", 80, PORT, [topo.endpoint(p, PORT, hbone) for p in PODS[:2]])
    routes = (
        HttpRoute(NS, "chat", "HTTPRoute", ("Gateway/ai/gw/",), (HttpRouteRule(
            matches=(HttpMatch(path=StringMatch("PathPrefix", "/v1/chat")),),
            backends=(HttpBackend("InferencePool", "ai/pool", PORT),)),), hostnames=("llm.example.com",)),
        HttpRoute(NS, "svc", "HTTPRoute", ("Gateway/ai/gw/",), (HttpRouteRule(
            backends=(HttpBackend("Service", "v1.ai.svc.clusterset.local", 80),)),)),
    )
    from dataclasses import replace
    cfg = replace(topo.proxy_config(f"ingress/east/{NS}/gw", "east", TD, mode=ProxyMode.INGRESS, services=[v1],
                                    bundles=[TD], local_identities=[INGRESS_ID]),
                  http_routes=routes, listeners=(Listener("ai/gw", "http", listen),), inference_pools=(pool,))
    st = ProxyState()
    assert st.apply(cfg).applied
    ingress = L7Proxy(st, Credentials({INGRESS_ID: topo.svid(INGRESS_ID)}),
                      ProxyOptions(hbone_host=INGRESS_IP, hbone_port=hbone, socks_host=None, handshake_timeout_s=1.0))
    cb = topo.proxy_config("ztunnel/east/b", "east", TD, workloads=[p.workload() for p in PODS], services=[v1],
                           bundles=[TD], local_identities=sorted({p.identity for p in PODS}))
    stb = ProxyState()
    assert stb.apply(cb).applied
    b = NodeProxy(stb, Credentials({i: topo.svid(i) for i in cb.local_identities}),
                  ProxyOptions(hbone_host=PODS[0].node_address, hbone_port=hbone, socks_host=None,
                               handshake_timeout_s=1.0))
    await b.start()
    await ingress.start()
    yield Mesh(ingress, b, servers, listen)
    await ingress.drain(0.1)
    await b.drain(0.1)
    for s in servers.values():
        s.server.close()  # type: ignore[attr-defined]


async def post(m: Mesh, path: str, body: dict[str, object], host: str = "llm.example.com") -> tuple[int, dict[str, object]]:
    r, w = await asyncio.open_connection(INGRESS_IP, m.port)
    data = json.dumps(body).encode()
    w.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    raw = await asyncio.wait_for(r.read(), 15)
    w.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, {"text": payload.decode(errors="replace")}


async def test_the_picker_prefers_short_queues_and_honours_the_model(mesh: Mesh) -> None:
    for _ in range(100):  # the picker has read every pod's /metrics
        if len(mesh.ingress.metrics) == 3:
            break
        await asyncio.sleep(0.05)
    assert {uid.rsplit("/", 1)[-1]: sorted(m.models) for uid, m in mesh.ingress.metrics.items()} == {
        "v1-0": ["llm-v1"], "v1-1": ["llm-v1"], "v2-0": ["llm-v2"]}
    served: Counter[str] = Counter()

    async def client() -> None:
        for _ in range(6):
            status, body = await post(mesh, "/v1/chat/completions", {"model": "llm-v1", "messages": []})
            assert status == 200, body
            served[str(body["pod"])] += 1

    await asyncio.gather(*(client() for _ in range(6)))
    # v1-0 takes 300 ms a request, v1-1 20 ms: its queue stays short, it serves most
    assert served["v1-1"] >= 0.7 * sum(served.values()) and "v2-0" not in served, served
    status, body = await post(mesh, "/v1/chat/completions", {"model": "llm-v2", "messages": []})
    assert status == 200 and body["pod"] == "v2-0"
    status, body = await post(mesh, "/v1/chat/completions", {"model": "gpt-9"})
    assert status == 404 and "gpt-9" in str(body["text"])


async def test_service_backend_and_hostnames(mesh: Mesh) -> None:
    # the chat route admits llm.example.com only: another host falls to the Service route
    status, body = await post(mesh, "/v1/chat/completions", {"prompt": "x"}, host="other.example.com")
    assert status == 200 and body["pod"] in ("v1-0", "v1-1")
    status, body = await post(mesh, "/v1/completions", {"prompt": "x"})
    assert status == 200 and body["model"] == "llm-v1"
    assert mesh.ingress.requests_served >= 2


async def test_slow_and_idle_clients_lose_their_connection_slot(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    """Security review finding 2 (slowloris at an ingress gateway), over real sockets: a head dripped
    byte by byte gets 408, a connection that says nothing and one left idle after its answer are
    closed, and their slots come back. The timeouts are shortened for the test (same code path)."""
    from ztunnel.proxy import waypoint
    from ztunnel.proxy.l7 import http1
    monkeypatch.setattr(http1, "REQUEST_HEADERS_TIMEOUT_S", 0.4)
    monkeypatch.setattr(http1, "IDLE_TIMEOUT_S", 0.4)
    monkeypatch.setattr(waypoint, "IDLE_TIMEOUT_S", 0.4)
    before = mesh.ingress.downstream_connections
    drip_r, drip_w = await asyncio.open_connection(INGRESS_IP, mesh.port)
    silent_r, _silent_w = await asyncio.open_connection(INGRESS_IP, mesh.port)
    idle_r, idle_w = await asyncio.open_connection(INGRESS_IP, mesh.port)
    idle_w.write(b"GET /v1/models HTTP/1.1\r\nHost: other.example.com\r\n\r\n")
    drip_w.write(b"GET / HTTP/1.1\r\nX-a: ")

    async def drip() -> None:
        for _ in range(20):
            await asyncio.sleep(0.1)
            drip_w.write(b"a")

    dripping = asyncio.ensure_future(drip())
    answer = await asyncio.wait_for(drip_r.read(), 5)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer
    assert await asyncio.wait_for(silent_r.read(), 5) == b""
    idle_answer = await asyncio.wait_for(idle_r.read(), 5)       # the answer, then EOF when idle
    assert idle_answer.startswith(b"HTTP/1.1 ") and b"content-length" in idle_answer
    dripping.cancel()
    await asyncio.sleep(0.05)
    assert mesh.ingress.downstream_connections == before
    metrics = mesh.ingress.telemetry.render().decode()
    assert 'reason="request_timeout"' in metrics and 'reason="idle_timeout"' in metrics


async def test_pipelined_requests_then_a_half_close_are_all_answered(mesh: Mesh) -> None:
    r, w = await asyncio.open_connection(INGRESS_IP, mesh.port)
    w.write(b"".join(b"GET /p%d HTTP/1.1\r\nHost: other.example.com\r\n\r\n" % i for i in range(3)))
    w.write_eof()
    raw = await asyncio.wait_for(r.read(), 15)
    w.close()
    assert raw.count(b"HTTP/1.1 ") == 3 and b"connection: close" not in raw.split(b"HTTP/1.1 ")[1]
