"""What a proxy keeps per endpoint, per peer and per connection is bounded (no sockets here; the
socket-level abuse tests are in tests/integration/test_dataplane_abuse.py):

- per-endpoint metric series, outlier detectors and health-report state leave with the endpoint;
- the handshake gate counts per peer and in total, and gives back what it admitted;
- back-pressure: a TLS connection whose peer does not read pauses the relays that feed it, and
  bytes that arrive ahead of a tunnel are held up to a bound (then the socket is not read).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from tests.integration import dataplane_topology as topo
from ztunnel.api.config import OutlierPolicy
from ztunnel.api.outlier import EjectReason, EndpointEjected, Outcome
from ztunnel.hbone.framer import Role
from ztunnel.proxy import relay as relay_mod
from ztunnel.proxy.admin import Telemetry
from ztunnel.proxy.base import Credentials, HandshakeGate
from ztunnel.proxy.node import NodeProxy
from ztunnel.proxy.relay import HboneSession, PlainRelay
from ztunnel.xds.controlplane import HealthReporter
from ztunnel.xds.state import ProxyState

TD = "east.mesh"
HOST = "echo.default.svc.clusterset.local"


def pod(name: str, ip: str) -> topo.Pod:
    return topo.Pod("east", "b", name, ip, topo.ident(TD, "default", name), node_address="127.55.1.12")


def config(*pods: topo.Pod, version: int = 1) -> Any:
    svc = topo.service(HOST, "127.55.200.1", 80, 8080, [topo.endpoint(p, 8080, 15008) for p in pods],
                       outlier=OutlierPolicy(consecutive_5xx_errors=None, consecutive_gateway_errors=1,
                                             max_ejection_percent=100))
    return topo.proxy_config("ztunnel/east/a", "east", TD, services=[svc], bundles=[TD], version=version)


def series_of(t: Telemetry, endpoint: str) -> list[str]:
    return [line for line in t.render().decode().splitlines() if f'endpoint="{endpoint}"' in line]


def test_per_endpoint_series_and_state_leave_with_the_endpoint() -> None:
    p0, p1 = pod("p0", "127.55.1.100"), pod("p1", "127.55.1.101")
    st = ProxyState()
    assert st.apply(config(p0, p1)).applied
    telemetry, health = Telemetry("ztunnel/east/a"), HealthReporter()
    health.counter = telemetry.outcomes
    proxy = NodeProxy(st, Credentials({}), telemetry=telemetry, health=health)
    gone = p1.workload().uid
    proxy.record_outcome(HOST, gone, Outcome.CONNECT_FAILURE)   # ejects (1 gateway error)
    proxy.record_outcome(HOST, p0.workload().uid, Outcome.SUCCESS)
    health.drain_outcomes()
    assert series_of(telemetry, gone) and gone in health._service_of and gone in health.ejected_until_mono_s
    # the pod goes away: the next config no longer routes to it
    assert st.apply(config(p0, version=2)).applied
    proxy.on_config_applied()
    assert series_of(telemetry, gone) == []
    assert series_of(telemetry, p0.workload().uid)               # the live endpoint keeps its series
    assert gone not in health._service_of and gone not in health.ejected_until_mono_s
    assert all(k[1] != gone for k in health._last)
    assert gone not in proxy.detectors[HOST].ejected_keys(0.0)
    # a pod that comes back (same uid) is counted again: no cached child of a removed series
    assert st.apply(config(p0, p1, version=3)).applied
    proxy.on_config_applied()
    proxy.record_outcome(HOST, gone, Outcome.CONNECT_FAILURE)
    assert [line for line in series_of(telemetry, gone) if line.startswith("meshfed_endpoint_outcomes_total")]
    # and a service that leaves takes its detector with it
    assert st.apply(replace(config(p0, version=4), services=())).applied
    proxy.on_config_applied()
    assert proxy.detectors == {} and series_of(telemetry, p0.workload().uid) == []


def test_handshake_gate_counts_per_peer_and_in_total() -> None:
    g = HandshakeGate(per_peer_max=2, total_max=3)
    assert [g.admit("a"), g.admit("a"), g.admit("a")] == ["", "", "handshakes_per_peer_cap"]
    assert [g.admit("b"), g.admit("c")] == ["", "handshakes_total_cap"]
    g.release("a")
    assert g.admit("c") == ""
    for peer in ("a", "b", "c"):
        g.release(peer)
    g.release("never-admitted")   # a stray release cannot make room for more
    assert g.total == 0 and g.per_peer == {}


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.written = 0

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def write(self, data: Any) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def test_a_peer_that_does_not_read_pauses_the_relays_feeding_it() -> None:
    """The session's transport is over its high-water mark (the TLS adapter passes the raw
    socket's pause_writing on): the relay stops reading its source, and resumes once it drains."""
    loop = asyncio.get_running_loop()
    client, server = HboneSession(Role.CLIENT, loop), HboneSession(Role.SERVER, loop)
    ct, stt = FakeTransport(), FakeTransport()
    client.connection_made(ct)
    server.connection_made(stt)
    stream = client.open_stream("10.0.0.1:80")
    relay, plain = PlainRelay(), FakeTransport()
    relay.connection_made(plain)
    relay.bind(stream)
    relay.data_received(b"x" * 1000)
    assert not plain.paused
    client.pause_writing()
    relay.data_received(b"x" * 1000)
    assert plain.paused, "the relay kept reading for a peer that does not read"
    client.resume_writing()
    assert not plain.paused


async def test_bytes_ahead_of_the_tunnel_are_bounded() -> None:
    relay, plain = PlainRelay(), FakeTransport()
    relay.connection_made(plain)
    chunk = b"x" * 65536
    for _ in range(64):                      # 4 MiB before any tunnel exists
        if plain.paused:
            break
        relay.data_received(chunk)
    assert plain.paused
    assert sum(map(len, relay._early)) <= relay_mod.EARLY_BUFFER_BYTES + len(chunk)


async def test_tls_adapter_passes_back_pressure_to_its_app() -> None:
    from federation.controller.ca import TrustDomainCA
    from ztunnel.api.verify import TrustStore
    from ztunnel.identity import tls
    from ztunnel.identity.tls_transport import TlsAdapter

    ca = TrustDomainCA.create(TD)
    svid = ca.issue_svid(f"spiffe://{TD}/ns/a/sa/x")
    app = HboneSession(Role.SERVER, asyncio.get_running_loop())
    a = TlsAdapter(asyncio.get_running_loop(), tls.server_context(svid.chain_pem, svid.key_pem,
                                                                   TrustStore.from_bundles(ca.trust_bundle())),
                   app, server_side=True)
    a._app_connected = True                  # as after a handshake
    a.pause_writing()
    assert app.write_paused
    a.resume_writing()
    assert not app.write_paused


def test_health_reporter_is_told_what_to_forget() -> None:
    rep = HealthReporter()
    rep.report("p", EndpointEjected("east/x", EjectReason.CONSECUTIVE_GATEWAY_ERRORS, 1, 1e12, True))
    rep.retain_endpoints({(HOST, "east/y")})
    assert rep.ejected_until_mono_s == {} and rep.drain_outcomes() == []
