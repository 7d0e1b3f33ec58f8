"""What one connection may hold of the controller's gRPC server (issue 11, item 15), on loopback
with TLS and the example fleet's CAs: the limits of `ConnectionLimits`, shortened so the tests
take seconds (the production values are minutes: a 10 s handshake, 5 min idle).

- a connection that never finishes its TLS handshake (silent, or a ClientHello cut short) is
  closed after the handshake timeout, on the config port and on the bootstrap port (which anyone
  may reach: it asks for no client certificate);
- a connection that opens no RPC is sent GOAWAY and closed after the idle limit, while a proxy's
  config stream, open for longer than that, is not touched;
- each connection is told how many RPCs it may have open (SETTINGS_MAX_CONCURRENT_STREAMS), and
  a client with more waits: the excess RPC reaches the server only when another one ends.

Each limit, removed from `server_options`, leaves grpc's default (a 120 s handshake, no idle
limit, no stream cap), which these tests tell from the shortened one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from federation.server.grpc_services import ConnectionLimits, wait_until
from tests.integration.controller.test_mtls import EAST_NAME, Ctl, serving_controller
from ztunnel.api.codec import HEALTH_METHOD
from ztunnel.api.proto import meshfed_pb2 as pb

pytestmark = pytest.mark.timeout(120)

LIMITS = ConnectionLimits(handshake_timeout_ms=1000, max_connection_idle_ms=2000, max_streams_per_connection=2)
CLOSED_WITHIN_S = 8.0        # well under grpc's defaults (120 s handshake, no idle limit)

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, GOAWAY = 0x4, 0x7
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
ACK = 0x1
# a TLS record header announcing a 512-byte ClientHello, and its first 6 bytes: never completed
PARTIAL_CLIENT_HELLO = bytes.fromhex("1603010200") + bytes.fromhex("010001fc0303")


@pytest.fixture()
async def ctl(tmp_path: Path) -> AsyncIterator[Ctl]:
    async with serving_controller(tmp_path, LIMITS) as c:
        yield c


async def seconds_until_closed(reader: asyncio.StreamReader) -> tuple[float, bytes]:
    """Read until the server closes the connection (or `CLOSED_WITHIN_S` passed): (seconds it took,
    everything it sent)."""
    started, got = time.monotonic(), b""
    with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
        while chunk := await asyncio.wait_for(reader.read(65536), started + CLOSED_WITHIN_S - time.monotonic()):
            got += chunk
    return time.monotonic() - started, got


def frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """HTTP/2 frames (type, flags, payload) in what a server sent."""
    out, pos = [], 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos:pos + 3], "big")
        ftype, flags = data[pos + 3], data[pos + 4]
        out.append((ftype, flags, data[pos + 9:pos + 9 + length]))
        pos += 9 + length
    return out


def settings_of(payload: bytes) -> dict[int, int]:
    return {k: v for k, v in (struct.unpack("!HI", payload[i:i + 6]) for i in range(0, len(payload), 6))}


async def h2_over_tls(port: int, roots_pem: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection to the bootstrap port (no client certificate) that speaks the HTTP/2
    preface and an empty SETTINGS, then nothing: a connection without any RPC."""
    ctx = ssl.create_default_context(cadata=roots_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=EAST_NAME)
    writer.write(H2_PREFACE + bytes([0, 0, 0, SETTINGS, 0, 0, 0, 0, 0]))
    await writer.drain()
    return reader, writer


@pytest.mark.parametrize("sends", [b"", PARTIAL_CLIENT_HELLO], ids=["silent", "partial-client-hello"])
@pytest.mark.parametrize("port", ["config", "bootstrap"])
async def test_a_connection_that_never_finishes_its_tls_handshake_is_closed_at_the_timeout(
        ctl: Ctl, port: str, sends: bytes) -> None:
    target = ctl.server.port if port == "config" else ctl.server.bootstrap_port
    reader, writer = await asyncio.open_connection("127.0.0.1", target)
    try:
        writer.write(sends)
        await writer.drain()
        took_s, got = await seconds_until_closed(reader)
    finally:
        writer.close()
    timeout_s = LIMITS.handshake_timeout_ms / 1000
    assert timeout_s * 0.8 <= took_s < CLOSED_WITHIN_S, f"closed after {took_s:.1f} s (timeout {timeout_s:g} s)"
    print(f"{port} port, {len(sends)} bytes of handshake: closed after {took_s:.2f} s ({got[:16]!r})")


async def test_a_connection_without_rpcs_is_sent_goaway_and_closed_after_the_idle_limit(ctl: Ctl) -> None:
    reader, writer = await h2_over_tls(ctl.server.bootstrap_port, ctl.roots)
    try:
        took_s, got = await seconds_until_closed(reader)
    finally:
        writer.close()
    idle_s = LIMITS.max_connection_idle_ms / 1000
    assert idle_s * 0.8 <= took_s < CLOSED_WITHIN_S, f"closed after {took_s:.1f} s (idle limit {idle_s:g} s)"
    goaways = [payload for ftype, _flags, payload in frames(got) if ftype == GOAWAY]
    assert goaways, frames(got)
    assert b"idle" in goaways[-1][8:], goaways   # the debug data: why (grpc's words)


async def test_an_open_config_stream_outlives_the_idle_limit(ctl: Ctl) -> None:
    """The idle limit closes connections without RPCs, never a proxy's long-lived config stream."""
    async with ctl.synced_proxy("ztunnel/east/node-1") as (proxy, _svid):
        connects = proxy.client.connects
        await asyncio.sleep(2.5 * LIMITS.max_connection_idle_ms / 1000)
        assert proxy.client.connected.is_set() and proxy.client.connects == connects


async def test_each_connection_is_told_its_stream_cap(ctl: Ctl) -> None:
    reader, writer = await h2_over_tls(ctl.server.bootstrap_port, ctl.roots)
    try:
        got = b""
        while not any(t == SETTINGS and not f & ACK for t, f, _p in frames(got)):
            got += await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()
    (server_settings,) = [settings_of(p) for t, f, p in frames(got) if t == SETTINGS and not f & ACK]
    assert server_settings.get(SETTINGS_MAX_CONCURRENT_STREAMS) == LIMITS.max_streams_per_connection


async def test_rpcs_beyond_the_stream_cap_wait_for_a_free_stream(ctl: Ctl) -> None:
    pid = "ztunnel/east/node-1"
    svid = await ctl.svid(pid)
    async with ctl.channel(svid.key_pem, svid.chain_pem) as ch:
        def health_stream() -> Any:
            return ch.stream_unary(HEALTH_METHOD, request_serializer=pb.HealthReport.SerializeToString,
                                   response_deserializer=pb.HealthSummary.FromString)(timeout=30)

        calls = [health_stream() for _ in range(LIMITS.max_streams_per_connection + 1)]
        writes = [asyncio.ensure_future(c.write(pb.HealthReport(proxy_id=pid))) for c in calls]
        try:
            assert await wait_until(lambda: ctl.server.health_reports == LIMITS.max_streams_per_connection, 10)
            await asyncio.sleep(1.0)   # the one beyond the cap does not get through meanwhile
            assert ctl.server.health_reports == LIMITS.max_streams_per_connection
            # one that got through ends: its stream is free, and the waiting RPC goes through on it
            through = next(c for c, w in zip(calls, writes, strict=True) if w.done())
            await through.done_writing()
            assert await wait_until(lambda: ctl.server.health_reports == LIMITS.max_streams_per_connection + 1, 10)
        finally:
            for c in calls:
                c.cancel()
            for w in writes:
                w.cancel()
                with contextlib.suppress(BaseException):
                    await w
