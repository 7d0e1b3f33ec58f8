"""The data path on uvloop, the event loop `python -m ztunnel` runs by default.

uvloop's transports are not subclasses of asyncio's (`isinstance(t, asyncio.Transport)` is
False), and the proxies once asserted it: on uvloop every captured or SOCKS5 connection was reset
in `connection_made`, and the TLS adapter silently skipped its write-buffer marks. And uvloop
raises on a write to a connection the peer has reset (asyncio drops it), which the DNS responder
let escape as an ERROR with a traceback, for any client to trigger. Tests of the
gateway and waypoint modules — the SOCKS5 listener, the node's inbound and outbound, the gateway's
double HBONE, resumption, shedding, failover and the waypoint's HTTP path — run here again, each
on a uvloop loop of its own."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import dns.message
import pytest
import uvloop

from tests.integration import test_dataplane_gateway as gateway
from tests.integration import test_dataplane_waypoint as waypoint
from tests.integration.test_dns_proxy import TABLE
from ztunnel.dns.server import DnsOptions, DnsServer
from ztunnel.identity.tls_transport import is_write_transport

pytestmark = pytest.mark.timeout(60)

CASES: list[Callable[[], Coroutine[Any, Any, None]]] = [
    gateway.test_double_hbone_end_to_end_identity,
    gateway.test_destination_authorization_applies_through_the_gateway,
    gateway.test_finished_connections_release_everything_along_the_path,
    gateway.test_the_inner_session_is_resumed_and_still_carries_the_clients_identity,
    gateway.test_a_saturated_gateway_sheds_at_once_and_nothing_fails_over,
    gateway.test_a_failing_gateway_path_still_fails_over,
    waypoint.test_connection_pool_overflow,
    waypoint.test_filters_reach_the_pod_and_retries_off_let_503_through,
    waypoint.test_path_and_host_spellings_cannot_bypass_a_deny_and_the_pod_sees_the_normalized_request,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.removeprefix("test_") for c in CASES])
def test_on_uvloop(case: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def on_uvloop() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        await case()
    uvloop.run(on_uvloop())


def test_a_uvloop_transport_counts_as_one_with_a_write_buffer() -> None:
    async def probe() -> bool:
        server = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await asyncio.get_running_loop().create_connection(asyncio.Protocol, "127.0.0.1", port)
        try:
            assert not isinstance(transport, asyncio.WriteTransport)   # why `is_write_transport` exists
            return is_write_transport(transport)
        finally:
            transport.close()
            server.close()
    assert uvloop.run(probe())


def test_a_dns_client_that_resets_while_upstream_answers_is_no_error() -> None:
    async def scenario() -> list[dict[str, Any]]:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))

        async def slow_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            n = int.from_bytes(await reader.readexactly(2), "big")
            query = dns.message.from_wire(await reader.readexactly(n))
            await asyncio.sleep(0.3)                       # the client resets meanwhile
            wire = dns.message.make_response(query).to_wire()
            writer.write(len(wire).to_bytes(2, "big") + wire)
            await writer.drain()
            writer.close()

        up = await asyncio.start_server(slow_upstream, "127.0.0.1", 0)
        server = DnsServer(lambda: TABLE, DnsOptions(upstreams=(("127.0.0.1", up.sockets[0].getsockname()[1]),)))
        await server.start("127.0.0.1", 0)
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            wire = dns.message.make_query("www.example.", "A").to_wire()
            writer.write(len(wire).to_bytes(2, "big") + wire)
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()                       # a reset, not a close
            await asyncio.sleep(0.5)
        finally:
            await server.close()
            up.close()
        return errors

    assert uvloop.run(scenario()) == []
