"""Cross-network through an east-west gateway (double HBONE), on loopback.

east client → ztunnel A ─outer HBONE (pooled)→ west gateway ─raw bytes→ ztunnel W1 → server.
The inner mTLS runs end to end between A (as the client's identity) and W1: the destination checks
the *client's* identity (authorization there), and the gateway never sees the plaintext."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from federation.server.grpc_services import wait_until
from tests.integration import dataplane_topology as topo
from ztunnel.api.bundle import load_pem_certificates
from ztunnel.api.config import Authorization, AuthzMatch, OutlierPolicy, ProxyMode
from ztunnel.proxy.base import LAG_PROBE_IDLE_INTERVAL_S, LAG_PROBE_INTERVAL_S, Credentials, ProxyOptions
from ztunnel.proxy.gateway import GatewayProxy
from ztunnel.proxy.node import NodeProxy
from ztunnel.xds.state import ProxyState

pytestmark = pytest.mark.timeout(60)

EAST, WEST = "east.mesh", "west.mesh"
CLIENT = topo.Pod("east", "a", "client", "127.55.3.101", topo.ident(EAST, "default", "client"), node_address="127.55.3.11")
SERVER = topo.Pod("west", "w1", "server", "127.55.4.102", topo.ident(WEST, "default", "server"), node_address="127.55.4.12")
GW_IP = "127.55.4.250"
GW_ID = topo.ident(WEST, "istio-system", "eastwest")
HOST = "echo.default.svc.clusterset.local"
VIP = "127.55.201.1"


def _opts(ip: str, port: int, resumption: bool = True, max_setups: int = 64, shed_lag_ms: float = 0.0) -> ProxyOptions:
    return ProxyOptions(hbone_host=ip, hbone_port=port, socks_host=ip, socks_port=0, handshake_timeout_s=1.0,
                        tls_resumption=resumption, max_setups_in_flight=max_setups, shed_at_loop_lag_ms=shed_lag_ms)


async def build(deny_client: bool = False, proxy_v2: bool = False, gateway_presents: str = GW_ID,
                gateway_identity: str = GW_ID, resumption: bool = True, gateway_max_setups: int = 64,
                fallback_tier: bool = False, source_max_setups: int = 64, gateway_shed_lag_ms: float = 0.0) -> tuple[NodeProxy, GatewayProxy, NodeProxy, topo.EchoServer]:
    """`gateway_presents`: the identity the gateway's certificate names; `gateway_identity`: the one
    east's config says the gateway has ("" = none rendered); `gateway_max_setups`: the gateway's
    `max_setups_in_flight` (0: saturated for good), `source_max_setups` east's, `gateway_shed_lag_ms`
    the gateway's `shed_at_loop_lag_ms`; `fallback_tier`: east also has the server as a
    tier-1 endpoint reached directly (a stand-in for another cluster to fail over to), and an
    outlier policy that ejects on the first local-origin failure."""
    echo = await topo.EchoServer(SERVER.address, prefix=b"west:").start()
    port = topo.free_port(GW_IP)
    server = dataclasses.replace(SERVER, labels={"networking.meshfed.dev/inbound-proxy-protocol": "v2"}) \
        if proxy_v2 else SERVER
    wl = [CLIENT.workload(), server.workload()]
    local_ep = topo.endpoint(SERVER, echo.port, port)
    remote_ep = topo.endpoint(SERVER, echo.port, port, via_gateway=f"{GW_IP}:{port}", gateway_identity=gateway_identity)
    east_eps = [remote_ep]
    outlier = None
    if fallback_tier:
        east_eps.append(dataclasses.replace(local_ep, workload_uid="west/default/server-direct", tier=1))
        outlier = OutlierPolicy(consecutive_5xx_errors=None, consecutive_local_origin_failures=1,
                                split_external_local_origin_errors=True, max_ejection_percent=100)
    east_svc = topo.service(HOST, VIP, 80, echo.port, east_eps, sans=[SERVER.identity], outlier=outlier)
    west_svc = topo.service(HOST, "", 80, echo.port, [local_ep], sans=[SERVER.identity])
    rule = AuthzMatch(principals=(CLIENT.identity,))
    pol = Authorization("only-east-client", "default", "DENY" if deny_client else "ALLOW", (rule,))
    ca = topo.proxy_config("ztunnel/east/a", "east", EAST, workloads=wl, services=[east_svc],
                           bundles=[EAST, WEST], local_identities=[CLIENT.identity])
    cg = topo.proxy_config("gateway/west", "west", WEST, mode=ProxyMode.GATEWAY, services=[west_svc],
                           bundles=[EAST, WEST], local_identities=[gateway_presents])
    cw = topo.proxy_config("ztunnel/west/w1", "west", WEST, workloads=wl, services=[west_svc],
                           authorizations=[pol], bundles=[EAST, WEST], local_identities=[SERVER.identity])
    proxies = []
    for cfg, ip, cls, ident in ((ca, CLIENT.node_address, NodeProxy, CLIENT.identity),
                                (cg, GW_IP, GatewayProxy, gateway_presents),
                                (cw, SERVER.node_address, NodeProxy, SERVER.identity)):
        st = ProxyState()
        assert st.apply(cfg).applied
        p = cls(st, Credentials({ident: topo.svid(ident)}),
                _opts(ip, port, resumption, gateway_max_setups if cls is GatewayProxy
                      else source_max_setups if cfg is ca else 64,
                      gateway_shed_lag_ms if cls is GatewayProxy else 0.0))
        await p.start()
        proxies.append(p)
    a, g, w = proxies
    return a, g, w, echo  # type: ignore[return-value]


async def _roundtrip(a: NodeProxy, payload: bytes) -> bytes:
    r, w = await topo.socks_connect((CLIENT.node_address, a.opts.socks_port), VIP, 80, CLIENT.address)
    w.write(payload)
    w.write_eof()
    data = await asyncio.wait_for(r.read(), 20)  # generous: the machine running CI is shared
    w.close()
    return data


async def test_double_hbone_end_to_end_identity() -> None:
    a, g, w, echo = await build()
    try:
        assert await _roundtrip(a, b"hello") == b"west:hello"
        big = b"z" * 2_000_000
        assert (await _roundtrip(a, big)).replace(b"west:", b"") == big  # echo prefixes each read
        assert await _roundtrip(a, b"again") == b"west:again"
        assert a.pool.count() == 1                     # one pooled outer tunnel to the gateway
        dest = w.telemetry.render().decode()
        # the destination saw the *client's* identity (end-to-end mTLS), not the gateway's
        assert f'source_principal="{CLIENT.identity}"' in dest
        assert GW_ID not in dest
        gw = g.telemetry.render().decode()
        assert f'source_principal="{CLIENT.identity}"' in gw   # outer tunnel: the client's identity too
    finally:
        for p in (a, g, w):
            await p.drain(0.1)
        await echo.close()


async def test_destination_authorization_applies_through_the_gateway() -> None:
    a, g, w, echo = await build(deny_client=True)
    try:
        with pytest.raises(ConnectionRefusedError):
            await _roundtrip(a, b"hello")
        assert echo.accepted == 0
    finally:
        for p in (a, g, w):
            await p.drain(0.1)
        await echo.close()


async def test_proxy_v2_header_carries_the_clients_identity_through_the_gateway() -> None:
    """Through double HBONE the destination's PROXY v2 header names the *client* (end-to-end mTLS),
    never the gateway."""
    from clusters.lab.demo_server import parse_proxy_v2

    a, g, w, echo = await build(proxy_v2=True)
    try:
        data = (await _roundtrip(a, b"hi")).replace(b"west:", b"")
        n = int.from_bytes(data[14:16], "big")
        info = parse_proxy_v2(data[:16], data[16:16 + n])
        assert info.peer_identity == CLIENT.identity
        assert info.source.startswith(CLIENT.address + ":")
        assert data[16 + n:] == b"hi"
    finally:
        for p in (a, g, w):
            await p.drain(0.1)
        await echo.close()


async def test_finished_connections_release_everything_along_the_path() -> None:
    """After a connection ends, the gateway's relay, the destination's inner session and both ends'
    per-stream state are gone; only the pooled outer tunnel stays (regression: inner sessions and
    gateway relays used to linger until drain, and stream tables grew with every connection)."""
    a, g, w, echo = await build()
    try:
        for i in range(5):
            assert await _roundtrip(a, b"n%d" % i) == b"west:n%d" % i
        for _ in range(100):
            if not g.relays and not w.inbound_sessions and not a.relays:
                break
            await asyncio.sleep(0.02)
        assert (len(g.relays), len(w.inbound_sessions), len(a.relays)) == (0, 0, 0)
        (outer,) = a.pool.all()
        assert outer.usable and not outer.streams and outer.conn.open_stream_count == 0
        (gw_side,) = g.inbound_sessions
        assert not gw_side.streams
    finally:
        for p in (a, g, w):
            await p.drain(0.1)
        await echo.close()


@pytest.mark.parametrize(("presents", "why"), [
    # a west workload (trusted by east, federated) answering at the gateway's address
    (topo.ident(WEST, "default", "server"), "wrong_identity"),
    # east's own workload identity: trusted even more, still not the gateway
    (topo.ident(EAST, "default", "client"), "wrong_identity"),
])
async def test_the_outer_tunnel_is_verified_against_the_gateways_identity(presents: str, why: str) -> None:
    """The outer tunnel used to be dialled with no expected identity: any federated peer at the
    gateway's address was accepted as the gateway (it sees the outer stream's metadata and decides
    where the inner bytes go). Now only the identity the config names for the gateway is."""
    a, g, w, echo = await build(gateway_presents=presents)
    try:
        with pytest.raises(ConnectionRefusedError):
            await _roundtrip(a, b"hello")
        assert echo.accepted == 0
        for _ in range(100):  # the impostor's side of the aborted handshakes closes asynchronously
            if not g.inbound_sessions:
                break
            await asyncio.sleep(0.02)
        assert not g.inbound_sessions
        refused = a.telemetry.render().decode()
        assert 'outcome="ConnectFailure"' in refused
    finally:
        for p in (a, g, w):
            await p.drain(0.1)
        await echo.close()


async def test_an_endpoint_behind_a_gateway_without_a_gateway_identity_is_never_dialled() -> None:
    a, g, w, echo = await build(gateway_identity="")
    try:
        with pytest.raises(ConnectionRefusedError):
            await _roundtrip(a, b"hello")
        assert echo.accepted == 0
        assert a.pool.count() == 0 and not g.inbound_sessions   # refused before any connection
    finally:
        for p in (a, g, w):
            await p.drain(0.1)
        await echo.close()


async def test_the_inner_session_is_resumed_and_still_carries_the_clients_identity() -> None:
    """The second connection through the gateway resumes the inner end-to-end mTLS session with
    the ticket the destination issued on the first (no certificates exchanged again); the
    destination still authorizes the client's own identity, taken from the resumed session."""
    a, g, w, echo = await build()
    try:
        assert await _roundtrip(a, b"one") == b"west:one"
        assert (a.tickets.offered, a.tickets.resumed, len(a.tickets)) == (0, 0, 1)
        assert await _roundtrip(a, b"two") == b"west:two"
        assert await _roundtrip(a, b"three") == b"west:three"
        assert (a.tickets.offered, a.tickets.resumed, len(a.tickets)) == (2, 2, 1)
        dest = w.telemetry.render().decode()
        assert f'source_principal="{CLIENT.identity}"' in dest
    finally:
        for p in (a, g, w):
            await p.drain(0.1)
        await echo.close()


async def test_a_resumed_session_with_another_peer_identity_is_refused() -> None:
    """Resumption skips the certificate exchange, never the identity check: a ticket earned from
    the server identity, offered on a dial that expects another identity (the config now names
    `other` for the endpoint, and the ticket is filed under that dial's key as a cache mix-up
    would), is resumed by the destination — and then refused by the check, the ticket dropped."""
    a, g, w, echo = await build()
    try:
        assert await _roundtrip(a, b"one") == b"west:one"
        (key,) = a.tickets._tickets
        other = topo.ident(WEST, "default", "other")
        cfg = a.cfg
        (svc,) = cfg.services
        moved = dataclasses.replace(svc, subject_alt_names=(other,))
        assert a.state.apply(topo.with_version(dataclasses.replace(cfg, services=(moved,)), 2)).applied
        a.on_config_applied()
        ctx, store = a.creds.client_ctx(CLIENT.identity), a.creds.store
        other_key = (*key[:3], (other,), key[4])
        now = time.monotonic()
        a.tickets.remember(other_key, a.tickets.find(key, ctx, store, now), ctx, store, now)
        accepted_before = echo.accepted
        with pytest.raises(ConnectionRefusedError):
            await _roundtrip(a, b"two")
        assert a.tickets.resumed == 0 and a.tickets.refused_after_resume == 1
        assert other_key not in a.tickets._tickets
        assert echo.accepted == accepted_before
        assert 'outcome="ConnectFailure"' in a.telemetry.render().decode()
    finally:
        for p in (a, g, w):
            await p.drain(0.1)
        await echo.close()


async def test_a_resumed_session_whose_peer_certificate_has_since_expired_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A ticket outlives nothing: the calendar moves past the destination's not-after (+ skew)
    after the full handshake that earned the ticket; the next dial resumes (no certificate sent)
    and the source still judges the certificate the session carries on today's date — refused,
    ticket dropped, nothing reaches the server. (The verified-peer cache must not answer either:
    its entries end at the leaf's not-after.)"""
    a, g, w, echo = await build()
    try:
        assert await _roundtrip(a, b"one") == b"west:one"
        assert len(a.tickets) == 1
        chain_pem, _key = w.creds._svids[SERVER.identity]
        not_after = load_pem_certificates(chain_pem)[0].not_valid_after_utc.timestamp()
        later = not_after + 3600.0
        monkeypatch.setattr("ztunnel.proxy.base.wall_s", lambda: later)
        accepted_before = echo.accepted
        with pytest.raises(ConnectionRefusedError):
            await _roundtrip(a, b"two")
        assert a.tickets.resumed == 0 and a.tickets.refused_after_resume == 1 and len(a.tickets) == 0
        assert echo.accepted == accepted_before
    finally:
        for p in (a, g, w):
            await p.drain(0.1)
        await echo.close()


async def test_resumption_can_be_switched_off() -> None:
    a, g, w, echo = await build(resumption=False)
    try:
        for i in range(3):
            assert await _roundtrip(a, b"n%d" % i) == b"west:n%d" % i
        assert (a.tickets.offered, len(a.tickets)) == (0, 0)
    finally:
        for p in (a, g, w):
            await p.drain(0.1)
        await echo.close()


async def test_a_saturated_gateway_sheds_at_once_and_nothing_fails_over() -> None:
    """A gateway past its setup cap answers 503 marked overloaded. The source refuses the client
    at once and takes it as what it is — the gateway's saturation, not the endpoint's failure: no
    outcome for the endpoint (so no ejection) and no attempt on the tier-1 endpoint (no failover)."""
    a, g, w, echo = await build(gateway_max_setups=0, fallback_tier=True)
    try:
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            await _roundtrip(a, b"hello")
        assert time.monotonic() - started < 0.5   # not after the 0.5 s connect timeout: at once
        assert echo.accepted == 0                  # the tier-1 endpoint was not tried
        east, gw = a.telemetry.render().decode(), g.telemetry.render().decode()
        assert 'reason="upstream_overloaded"' in east and 'reason="overloaded"' in gw
        assert "ConnectFailure" not in east and "meshfed_endpoint_ejections_total{" not in east
        assert not a.ejected(HOST)
    finally:
        for p in (a, g, w):
            await p.drain(0.1)
        await echo.close()


async def test_a_failing_gateway_path_still_fails_over() -> None:
    """The control of the test above: the same topology with the gateway path *failing* (the
    gateway cannot reach the node: a real endpoint failure) ejects and fails over to tier 1."""
    a, g, w, echo = await build(fallback_tier=True)
    try:
        (svc,) = g.cfg.services
        dead = dataclasses.replace(svc.endpoints[0], hbone_address=f"{SERVER.node_address}:1")
        assert g.state.apply(topo.with_version(dataclasses.replace(g.cfg, services=(
            dataclasses.replace(svc, endpoints=(dead,)),)), 2)).applied
        g.on_config_applied()
        assert await _roundtrip(a, b"hello") == b"west:hello"   # served by the tier-1 endpoint
        assert echo.accepted == 1
        assert 'outcome="ConnectFailure"' in a.telemetry.render().decode()
        assert a.ejected(HOST)
    finally:
        for p in (a, g, w):
            await p.drain(0.1)
        await echo.close()


async def test_a_saturated_source_proxy_refuses_at_once_and_dials_nothing() -> None:
    """East's own proxy past its setup cap refuses the application at once (a SOCKS failure) and
    dials nothing: its saturation is no endpoint's failure, so it reaches no outlier detector."""
    a, g, w, echo = await build(source_max_setups=0, fallback_tier=True)
    try:
        with pytest.raises(ConnectionRefusedError) as refused:
            await _roundtrip(a, b"hello")
        assert refused.value.args[0] == 1                     # SOCKS "general failure"
        assert echo.accepted == 0 and a.pool.count() == 0     # nothing dialled
        east = a.telemetry.render().decode()
        assert 'meshfed_connections_refused_total{reason="overloaded",reporter="source"}' in east, [x for x in east.splitlines() if "refused" in x]
        assert "meshfed_endpoint_outcomes_total{" not in east and not a.ejected(HOST)
    finally:
        for p in (a, g, w):
            await p.drain(0.1)
        await echo.close()


def _record_probe_intervals(p: GatewayProxy) -> list[float]:
    """The interval of every loop-lag probe `p` schedules from now on (asserted on these, not on
    wall time: a loaded machine may run the loop late at any point)."""
    intervals: list[float] = []
    schedule = p._schedule_lag_probe

    def recording(loop: asyncio.AbstractEventLoop, now: float, interval_s: float) -> None:
        intervals.append(interval_s)
        schedule(loop, now, interval_s)

    p._schedule_lag_probe = recording  # type: ignore[method-assign]
    return intervals


async def _probes(intervals: list[float], n: int) -> None:
    """Until `n` more probes were scheduled."""
    target = len(intervals) + n
    assert await wait_until(lambda: len(intervals) >= target, 5.0), f"the lag probe stopped: {intervals}"


async def test_the_lag_probe_idles_slowly_and_quickens_without_losing_a_late_sample() -> None:
    """Idle, the loop-lag probe runs at its idle rate (its wakeups were most of an idle proxy's
    CPU); the first setup or handshake admitted brings it back to the busy rate at once, and it
    stays there while one is in flight. A probe already overdue (the loop is running late) is left
    to run rather than replaced, so the lag it measures still reaches the history that judges
    failed attempts."""
    a, g, w, echo = await build(fallback_tier=True)
    loop = asyncio.get_running_loop()
    intervals = _record_probe_intervals(g)
    try:
        await _probes(intervals, 1)                          # nothing in flight
        assert intervals[-1] == LAG_PROBE_IDLE_INTERVAL_S
        n = len(intervals)
        assert g.admit_setup("192.0.2.1", "destination")
        assert intervals[n:] == [LAG_PROBE_INTERVAL_S]       # rescheduled at once, not at the idle due time
        await _probes(intervals, 2)                          # still in flight: the busy rate
        assert intervals[-2:] == [LAG_PROBE_INTERVAL_S] * 2
        g.setups.release("192.0.2.1")
        await _probes(intervals, 1)
        assert intervals[-1] == LAG_PROBE_IDLE_INTERVAL_S
        n = len(intervals)
        assert g.admit_handshake("192.0.2.2", "destination")  # a TLS handshake quickens it too
        assert intervals[n:] == [LAG_PROBE_INTERVAL_S]
        g.handshakes.release("192.0.2.2")
        await _probes(intervals, 1)
        assert intervals[-1] == LAG_PROBE_IDLE_INTERVAL_S
        n, before = len(intervals), time.monotonic()
        assert g._lag_probe is not None
        time.sleep(max(0.0, g._lag_probe.when() - loop.time()) + 0.15)  # noqa: ASYNC251 -- the loop runs late on purpose
        assert g.admit_setup("192.0.2.1", "destination")    # the overdue idle probe is not replaced ...
        assert len(intervals) == n
        await _probes(intervals, 1)
        assert g.lag_history.max_since(before) >= 0.1       # ... and its late sample was kept
        g.setups.release("192.0.2.1")
    finally:
        for p in (a, g, w):
            await p.drain(0.1)
        await echo.close()


async def test_a_proxy_that_sheds_by_lag_probes_at_the_busy_rate_even_when_idle() -> None:
    """Between two idle samples a short stall would go unseen (or be measured short by up to the
    idle interval), and the shedder would admit what queued behind it."""
    a, g, w, echo = await build(gateway_shed_lag_ms=300, fallback_tier=True)
    intervals = _record_probe_intervals(g)
    try:
        await _probes(intervals, 3)
        assert intervals[-3:] == [LAG_PROBE_INTERVAL_S] * 3
    finally:
        for p in (a, g, w):
            await p.drain(0.1)
        await echo.close()
    assert g._lag_probe is None   # a drained proxy leaves no probe behind (it probed through the drain)


async def test_a_gateway_whose_loop_runs_late_sheds_until_it_recovers() -> None:
    """Lag-based shedding: the gateway's event loop blocked for 600 ms (saturation, as the loop sees
    it; the threshold is 300 ms so that a loaded CI machine's own lag does not trigger it) puts it in SHEDDING: the next connection is refused at once as overloaded, with no outcome
    and no failover at the source; once the loop is calm again, connections are admitted."""
    a, g, w, echo = await build(gateway_shed_lag_ms=300, fallback_tier=True)
    try:
        assert await _roundtrip(a, b"before") == b"west:before"
        time.sleep(0.6)  # noqa: ASYNC251 -- blocking on purpose: the loop all three proxies share runs late; only the gateway sheds
        await asyncio.sleep(0.02)   # its lag probe runs (late)
        assert g.shedder is not None and g.shedder.shedding
        with pytest.raises(ConnectionRefusedError):
            await _roundtrip(a, b"during")
        assert echo.accepted == 1                       # tier 1 untried: no failover
        east = a.telemetry.render().decode()
        assert 'reason="upstream_overloaded"' in east and 'outcome="ConnectFailure"' not in east
        for _ in range(250):
            if not g.shedder.shedding:
                break
            await asyncio.sleep(0.02)
        assert await _roundtrip(a, b"after") == b"west:after"
    finally:
        for p in (a, g, w):
            await p.drain(0.1)
        await echo.close()
