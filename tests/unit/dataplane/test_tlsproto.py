"""TlsAdapter over in-memory transports: a peer that stops reading cannot make us buffer without bound."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from federation.controller.ca import TrustDomainCA
from ztunnel.api.verify import TrustStore
from ztunnel.identity import tls
from ztunnel.identity import tls_transport as tlsproto

TD = "east.mesh"


class PipeTransport(asyncio.Transport):
    """Delivers writes to `peer` on the next loop turn; with `stalled`, holds them (a peer not reading)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.peer: asyncio.Protocol | None = None
        self.stalled = False
        self.held = 0
        self.closing = False
        self.aborted = False

    def write(self, data: Any) -> None:
        if self.stalled:
            self.held += len(data)
        elif self.peer is not None:
            self.loop.call_soon(self.peer.data_received, bytes(data))

    def get_write_buffer_size(self) -> int:
        return self.held

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.lost: list[Exception | None] = []

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


@dataclass
class EchoPair:
    """A TLS server whose app echoes, and its client, over in-memory pipes (`to_client` carries
    what the server writes)."""

    server: tlsproto.TlsAdapter
    client: tlsproto.TlsAdapter
    server_app: Echo
    client_app: Echo
    to_server: PipeTransport
    to_client: PipeTransport


async def echo_pair(server_max_unsent_bytes: int | None = None) -> EchoPair:
    """An `EchoPair` with its handshake done; the server's cap on unsent bytes is its default
    unless given."""
    loop = asyncio.get_running_loop()
    ca = TrustDomainCA.create(TD)
    store = TrustStore.from_bundles(ca.trust_bundle())
    srv, cli = ca.issue_svid(f"spiffe://{TD}/ns/a/sa/srv"), ca.issue_svid(f"spiffe://{TD}/ns/a/sa/cli")
    server_app, client_app = Echo(), Echo()
    server = tlsproto.TlsAdapter(loop, tls.server_context(srv.chain_pem, srv.key_pem, store), server_app,
                                 server_side=True, max_unsent_bytes=server_max_unsent_bytes)
    client = tlsproto.TlsAdapter(loop, tls.client_context(cli.chain_pem, cli.key_pem, store), client_app,
                                 server_side=False)
    to_server, to_client = PipeTransport(loop), PipeTransport(loop)
    to_server.peer, to_client.peer = server, client
    server.connection_made(to_client)
    client.connection_made(to_server)
    await asyncio.wait_for(asyncio.gather(server.handshake, client.handshake), 5)
    return EchoPair(server, client, server_app, client_app, to_server, to_client)


async def test_a_peer_that_stops_reading_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tlsproto, "MAX_UNSENT_BYTES", 256 * 1024)
    p = await echo_pair()
    client, client_app, to_client, server_app = p.client, p.client_app, p.to_client, p.server_app
    client_app.data_received = lambda data: None  # type: ignore[method-assign]  # the client reads nothing…
    to_client.stalled = True                      # …and its socket buffer is full
    for _ in range(40):                           # 40 × 16 KiB echoed back = 640 KiB unsent
        client.transport.write(b"x" * 16384)
        await asyncio.sleep(0)
    for _ in range(5):
        await asyncio.sleep(0)
    assert to_client.aborted, f"server still holds {to_client.held} unsent bytes for a stalled peer"
    assert to_client.held < 2 * tlsproto.MAX_UNSENT_BYTES
    assert server_app.lost and isinstance(server_app.lost[0], ConnectionError)
