"""What one peer connection can make a proxy hold, with the defaults (issue 11, item 14: "each
connection may hold 16 MiB + 64 MiB of buffers"). The worst case per connection is worked out in
`ztunnel.proxy.base`'s docstring; these tests hold its two large terms to the defaults, without
overriding any constant:

- what a peer sends us and we have not taken: at most the connection window we advertise
  (16 MiB). A peer that ignores flow control and sends one byte more — even on a stream whose
  own window is open — ends its connection with FLOW_CONTROL_ERROR;
- and window goes back to the peer only when its bytes have left: a tunnel whose backend does
  not read gets none, so the peer cannot push more than the stream's window into it;
- what we have for a peer that does not read: the default cap on unsent ciphertext (8 MiB since
  commit 132a0ab, was 64 MiB), the same for a bare TLS adapter and for the proxies' options.

In-memory peers: no sockets, no clock.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.unit.dataplane.test_hbone import open_tunnel, pair
from tests.unit.dataplane.test_tlsproto import echo_pair
from ztunnel.hbone.framer import DATA, DataReceived, ErrorCode, HboneConnection, HboneSettings, Role
from ztunnel.identity import tls_transport as tlsproto
from ztunnel.proxy.base import ProxyOptions
from ztunnel.proxy.relay import HboneSession, HboneStream, PlainRelay

MiB = 1024 * 1024
CHUNK = 16_000   # one DATA frame, under the default max frame size


def test_the_defaults_are_the_documented_ones() -> None:
    """ztunnel.proxy.base's worst case is computed from these; changing one changes it."""
    assert HboneSettings().connection_window_bytes == 16 * MiB
    assert HboneSettings().stream_window_bytes == 4 * MiB
    assert tlsproto.MAX_UNSENT_BYTES == ProxyOptions().max_unsent_bytes == 8 * MiB


def test_a_peer_cannot_make_us_hold_more_than_the_connection_window() -> None:
    window = HboneSettings().connection_window_bytes
    per_stream = HboneSettings().stream_window_bytes
    c, s = pair()    # both with the defaults
    sids = [open_tunnel(c, s) for _ in range(window // per_stream + 1)]
    held = 0
    for sid in sids[:-1]:     # fill each stream's own window, never acknowledged: nothing is read
        sent = 0
        while sent < per_stream:
            n = min(CHUNK, per_stream - sent)
            c._frame(DATA, 0, sid, b"x" * n)   # a peer that writes frames itself, ignoring our windows
            sent += n
        held += sum(e.flow_controlled_bytes for e in s.receive_data(c.data_to_send(), 0.0)
                    if isinstance(e, DataReceived))
    assert held == window and not s.closed
    # one byte more, on a stream whose own window is untouched: past the connection's window
    c._frame(DATA, 0, sids[-1], b"x")
    events = s.receive_data(c.data_to_send(), 0.0)
    assert not [e for e in events if isinstance(e, DataReceived)]
    assert s.closed and s.terminated is not None and s.terminated.error_code == ErrorCode.FLOW_CONTROL_ERROR


@pytest.mark.parametrize("cap", ["adapter default", "proxy options default"])
async def test_a_peer_that_does_not_read_is_cut_off_at_the_default_unsent_cap(cap: str) -> None:
    limit = {"adapter default": None, "proxy options default": ProxyOptions().max_unsent_bytes}[cap]
    p = await echo_pair(server_max_unsent_bytes=limit)
    client, to_client, server_app = p.client, p.to_client, p.server_app
    to_client.stalled = True            # the client's socket buffer is full: it reads nothing more
    block = b"x" * (256 * 1024)         # what the client sends, the server echoes back unread

    async def send(n_bytes: int) -> None:
        for _ in range(n_bytes // len(block)):
            client.transport.write(block)
            for _ in range(3):
                await asyncio.sleep(0)

    await send(7 * MiB)                 # below the cap: kept, however long the peer takes
    assert not to_client.aborted and 6 * MiB < to_client.held <= 8 * MiB
    await send(2 * MiB)                 # past 8 MiB: cut off
    for _ in range(5):
        await asyncio.sleep(0)
    assert to_client.aborted, f"the server still holds {to_client.held} unsent bytes for a peer that does not read"
    assert to_client.held <= 8 * MiB + 2 * len(block)
    assert server_app.lost and isinstance(server_app.lost[0], ConnectionError)


class Wire(asyncio.Transport):
    """The server session's socket: keeps what it writes for the test to hand to the client."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[bytes] = []

    def write(self, data: Any) -> None:
        self.out.append(bytes(data))

    def take(self) -> bytes:
        data, self.out = b"".join(self.out), []
        return data

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class SlowBackend(asyncio.Transport):
    """A backend socket whose application reads nothing: past asyncio's high-water mark the
    transport tells its protocol to stop writing (`pause_writing`), as a real one does."""

    HIGH_WATER_BYTES = 64 * 1024

    def __init__(self) -> None:
        super().__init__()
        self.protocol: PlainRelay | None = None
        self.buffered = self.delivered = 0
        self.paused = False

    def write(self, data: Any) -> None:
        self.buffered += len(data)
        if self.buffered > self.HIGH_WATER_BYTES and not self.paused and self.protocol is not None:
            self.paused = True
            self.protocol.pause_writing()

    def drain(self) -> None:
        """The application read everything: the buffer empties and writing resumes."""
        self.delivered += self.buffered
        self.buffered = 0
        if self.paused and self.protocol is not None:
            self.paused = False
            self.protocol.resume_writing()

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def test_a_tunnel_whose_backend_does_not_read_gets_no_more_window() -> None:
    """The connection window bounds what a peer makes us hold only if window is returned when
    the bytes have left: a relay whose backend socket is paused returns none, so the peer can
    send at most the stream's window into it, however much it has queued."""
    loop = asyncio.get_running_loop()
    streams: list[HboneStream] = []
    wire = Wire()
    server = HboneSession(Role.SERVER, loop, on_connect=lambda _s, st: streams.append(st))
    server.connection_made(wire)
    peer = HboneConnection(Role.CLIENT)
    peer.initiate(0.0)

    def exchange() -> None:
        for _ in range(100):
            to_server = peer.data_to_send()
            if to_server:
                server.data_received(to_server)
            to_peer = wire.take()
            if to_peer:
                peer.receive_data(to_peer, 0.0)
            if not to_server and not to_peer:
                return
        raise AssertionError("the peers never went quiet")

    exchange()
    sid = peer.open_stream("10.0.0.1:80")
    exchange()
    (stream,) = streams
    stream.respond(200)
    backend, relay = SlowBackend(), PlainRelay()
    backend.protocol = relay
    relay.connection_made(backend)
    relay.bind(stream)
    exchange()

    window = HboneSettings().stream_window_bytes
    queued = 3 * window
    peer.send_data(sid, b"x" * queued)
    exchange()
    assert backend.paused
    assert backend.buffered <= window, "a paused backend got more than the stream's window"
    assert peer.buffered_bytes(sid) == queued - backend.buffered     # the rest waits at the peer
    backend.drain()             # the application reads: window comes back, the peer sends on
    exchange()
    assert backend.delivered + backend.buffered > window
