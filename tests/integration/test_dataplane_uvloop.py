"""The data path on uvloop, the event loop `python -m ztunnel` runs by default.

uvloop's transports are not subclasses of asyncio's (`isinstance(t, asyncio.Transport)` is
False), and the proxies once asserted it: on uvloop every captured or SOCKS5 connection was reset
in `connection_made`, and the TLS adapter silently skipped its write-buffer marks. Tests of the
gateway and waypoint modules — the SOCKS5 listener, the node's inbound and outbound, the gateway's
double HBONE, resumption, shedding, failover and the waypoint's HTTP path — run here again, each
on a uvloop loop of its own."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from tests.integration import test_dataplane_gateway as gateway
from tests.integration import test_dataplane_waypoint as waypoint
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
