"""A node ztunnel under abuse, on loopback with real sockets and TLS: what one peer can make it do
and hold is bounded.

- "MadeYouReset": an authenticated peer opens CONNECT after CONNECT and makes the proxy reset each
  one (a WINDOW_UPDATE of 0). Before, every CONNECT dialled the backend (5,000 CONNECTs, 5,000
  dials); now the resets count toward the rapid-reset limit, the peer gets GOAWAY
  ENHANCE_YOUR_CALM and the backend sees at most the limit's worth of dials.
- Handshakes in flight are capped per peer address and in total: connections over the cap are
  dropped at once, before any TLS work; idle handshakes time out.
- The admin server does not wait forever for a request head.
- The SOCKS5 door: a client that never sends its request is refused after the handshake timeout;
  bytes an application sends before its tunnel is up are held up to a bound, then the socket is
  no longer read (the client feels back-pressure) instead of the proxy buffering all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from typing import Any

import pytest

from tests.integration import dataplane_topology as topo
from tests.integration.test_dataplane_node import CLIENT, SERVER, SERVER2, VIP, configs, start_node
from ztunnel.api.verify import TrustStore
from ztunnel.hbone.framer import GOAWAY, WINDOW_UPDATE, ErrorCode, HboneConnection, Role, frames_of
from ztunnel.identity.tls import client_context
from ztunnel.proxy import relay as relay_mod
from ztunnel.proxy.admin import AdminServer, Telemetry
from ztunnel.proxy.base import Credentials, ProxyOptions
from ztunnel.proxy.node import NodeProxy
from ztunnel.proxy.plan import sni_for_identity
from ztunnel.xds.state import ProxyState

pytestmark = pytest.mark.timeout(90)

TD = "east.mesh"
OTHER_PEER = SERVER2.node_address   # a second source address on loopback


async def mtls_to(node: NodeProxy, identity: str, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    chain, key = topo.svid(identity)
    ctx = client_context(chain, key, TrustStore.from_bundles([topo.bundle(TD)]))
    return await asyncio.wait_for(asyncio.open_connection(
        node.opts.hbone_host, node.opts.hbone_port, ssl=ctx, server_hostname=sni_for_identity(SERVER.identity),
        local_addr=(source, 0)), 5)


async def closed_within(r: asyncio.StreamReader, timeout_s: float) -> bool:
    """True when the peer closes (EOF or reset) within `timeout_s`."""
    try:
        while await asyncio.wait_for(r.read(65536), timeout_s):
            pass
    except TimeoutError:
        return False
    except (ConnectionError, OSError, ssl.SSLError):
        pass
    return True


async def test_made_you_reset_connects_do_not_dial_a_backend_each() -> None:
    echo = await topo.EchoServer(SERVER.address).start()
    port = topo.free_port(SERVER.node_address)
    _, cb = configs(echo.port, port)
    b = start_node(cb, SERVER.node_address, port, {SERVER.identity: topo.svid(SERVER.identity)})
    await b.start()
    try:
        r, w = await mtls_to(b, CLIENT.identity, CLIENT.node_address)
        received = bytearray()

        async def read_all() -> None:
            with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
                while chunk := await r.read(65536):
                    received.extend(chunk)

        reader = asyncio.ensure_future(read_all())
        h2 = HboneConnection(Role.CLIENT)
        h2.initiate(0.0)
        h2._peer_max_streams = None
        w.write(h2.data_to_send())
        with contextlib.suppress(ConnectionError, OSError):
            for i in range(5000):
                sid = h2.open_stream(f"{SERVER.address}:{echo.port}")
                h2._frame(WINDOW_UPDATE, 0, sid, (0).to_bytes(4, "big"))   # the server must reset it
                w.write(h2.data_to_send())
                if i % 50 == 0:
                    await w.drain()
                    await asyncio.sleep(0)   # let the proxy read (and dial) between bursts
        await asyncio.wait_for(reader, 10)   # the proxy ends the connection
        await asyncio.sleep(0.5)             # dials already started land
        assert b.opts.hbone.rapid_reset_max == 200
        assert echo.accepted <= 201, f"{echo.accepted} backend dials for 5000 reset CONNECTs"
        goaways = [p for t, _f, _s, p in frames_of(bytes(received)) if t == GOAWAY]
        assert goaways and int.from_bytes(goaways[0][4:8], "big") == ErrorCode.ENHANCE_YOUR_CALM, goaways
        assert b"rapid reset" in goaways[0]
        w.close()
    finally:
        await b.drain(0.1)
        await echo.close()


async def test_handshakes_in_flight_are_capped_per_peer_and_in_total() -> None:
    port = topo.free_port(SERVER.node_address)
    _, cb = configs(9, port)
    st = ProxyState()
    assert st.apply(cb).applied
    b = NodeProxy(st, Credentials({SERVER.identity: topo.svid(SERVER.identity)}),
                  ProxyOptions(hbone_host=SERVER.node_address, hbone_port=port, socks_host=None,
                               handshake_timeout_s=2.0, max_handshakes_per_peer=3, max_handshakes_total=5))
    await b.start()
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        async def raw(source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            c = await asyncio.open_connection(SERVER.node_address, port, local_addr=(source, 0))
            conns.append(c)
            return c

        held = [await raw(CLIENT.node_address) for _ in range(3)]      # send nothing: handshakes in flight
        await asyncio.sleep(0.1)
        over_peer = await raw(CLIENT.node_address)
        assert await closed_within(over_peer[0], 0.5), "a 4th handshake from one peer was admitted"
        others = [await raw(OTHER_PEER) for _ in range(2)]               # total 5: admitted
        await asyncio.sleep(0.1)
        over_total = await raw(OTHER_PEER)
        assert await closed_within(over_total[0], 0.5), "a 6th handshake in total was admitted"
        assert b.handshakes.total == 5
        assert not any(r.at_eof() for r, _w in held + others)            # still waiting for their hello
        for r, _w in held + others:                                      # idle handshakes time out (2 s)
            assert await closed_within(r, 3.0)
        assert b.handshakes.total == 0 and b.handshakes.per_peer == {}
        # and a real peer gets through afterwards
        r, w = await mtls_to(b, CLIENT.identity, CLIENT.node_address)
        w.close()
        refused = b.telemetry.render().decode()
        assert 'reason="handshakes_per_peer_cap"' in refused and 'reason="handshakes_total_cap"' in refused
    finally:
        for _r, w in conns:
            w.close()
        await b.drain(0.1)


async def test_socks5_client_that_never_sends_its_request_is_refused_after_the_timeout() -> None:
    port = topo.free_port(CLIENT.node_address)
    ca, _ = configs(9, port)
    a = start_node(ca, CLIENT.node_address, port, {CLIENT.identity: topo.svid(CLIENT.identity)})
    await a.start()
    try:
        r, w = await asyncio.open_connection(CLIENT.node_address, a.opts.socks_port, local_addr=(CLIENT.address, 0))
        w.write(b"\x05\x01\x00")                          # greeting, then silence
        assert await asyncio.wait_for(r.readexactly(2), 2) == b"\x05\x00"
        started = time.monotonic()
        reply = await asyncio.wait_for(r.read(), 5)       # handshake_timeout_s = 1.0
        assert reply[:2] == b"\x05\x01" and time.monotonic() - started < 3.0
        assert a.handshakes.total == 0
        w.close()
    finally:
        await a.drain(0.1)


async def test_bytes_sent_before_the_tunnel_is_up_are_bounded() -> None:
    """The tunnel takes a while (the destination node accepts TCP but never answers TLS); the
    application floods meanwhile. The proxy holds at most EARLY_BUFFER_BYTES (+ one read) and stops
    reading: the client's writes back up instead of the proxy's memory growing."""
    stall = await asyncio.start_server(lambda r, w: None, SERVER.node_address, 0)   # accepts, never answers
    stall_port = stall.sockets[0].getsockname()[1]
    ca, _ = configs(9, stall_port)
    a = start_node(ca, CLIENT.node_address, stall_port, {CLIENT.identity: topo.svid(CLIENT.identity)})
    await a.start()
    caps: list[Any] = []
    original = a.handle_outbound

    async def spy(cap: Any, *args: Any) -> None:
        caps.append(cap)
        await original(cap, *args)

    a.handle_outbound = spy  # type: ignore[method-assign]
    try:
        _r, w = await _socks_request_only((CLIENT.node_address, a.opts.socks_port), VIP, 80)
        chunk = b"x" * (1024 * 1024)
        sent = 0
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(1.0):
                while sent < 64 * 1024 * 1024:
                    w.write(chunk)
                    await w.drain()
                    sent += len(chunk)
        assert caps, "the proxy never started the tunnel"
        assert sent < 32 * 1024 * 1024, f"the proxy read {sent} bytes ahead of the tunnel"
        held = sum(len(c) for c in caps[0].relay._early)
        assert held <= relay_mod.EARLY_BUFFER_BYTES + relay_mod.READ_CHUNK_BYTES, held
        w.close()
    finally:
        a.handle_outbound = original  # type: ignore[method-assign]
        await a.drain(0.1)
        stall.close()


async def _socks_request_only(socks: tuple[str, int], host: str,
                              port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A SOCKS5 CONNECT whose reply we do not wait for (the tunnel is still being set up)."""
    import socket as _socket

    r, w = await asyncio.open_connection(*socks, local_addr=(CLIENT.address, 0))
    w.write(b"\x05\x01\x00\x05\x01\x00\x01" + _socket.inet_aton(host) + port.to_bytes(2, "big"))
    assert await asyncio.wait_for(r.readexactly(2), 2) == b"\x05\x00"
    return r, w


async def test_admin_server_drops_a_request_head_that_never_ends() -> None:
    telemetry = Telemetry("p")
    srv = AdminServer("127.0.0.1", 0, ready=lambda: (True, "ok"), config_dump=dict, telemetry=telemetry)
    await srv.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        w.write(b"GET /healthz HTTP/1.0\r\n" + b"X-Pad: y\r\n" * 200)   # never the blank line
        await w.drain()
        assert await asyncio.wait_for(r.read(), 2) == b""                # closed, no answer
        w.close()
    finally:
        await srv.close()
