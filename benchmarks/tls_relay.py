"""The floor under the ztunnel pair's figures: a bare Python TLS relay pair, nothing of the mesh.

`benchmarks.dataplane` measures the ztunnel pair (plain → HBONE: mTLS + HTTP/2 CONNECT → plain)
against an HAProxy pair (plain → mTLS → plain). This is the least any Python proxy pair built
like ours has to do on that path: one process takes plain TCP and relays it over mutual TLS (a
new TLS connection per client connection, the peer's certificate verified against the CA) to a
second process, which relays it to the server, reusing TLS sessions towards it as HAProxy does
for its servers. The TLS is the ztunnels' own
(`ztunnel.identity.tls_transport.TlsAdapter` over `ssl`'s OpenSSL, measured faster than asyncio's
and uvloop's TLS transports), the loop uvloop, one `write` per read with the transports' flow
control, the proxies' allocator settings (`ztunnel.allocator`). No HTTP/2, no identities, no
policy, no metrics. What HAProxy's pair does beyond it, and
what our ztunnel pair costs over it, are then two ratios from the same rounds (`python_tls_pair`
in the benchmark's JSON).

`--threads` (`python_tls_pair_threaded`): the same relay as a threaded program instead, blocking
`ssl.SSLSocket`s and a thread per connection, the other way Python can be written.

`python -m benchmarks.tls_relay client LISTEN_HOST LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT CERT KEY CA
[--threads]` (plain in, TLS out) or `... server ...` (TLS in, plain out); prints "ready" once
listening.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import ssl
import sys
import threading
from typing import Any

from ztunnel.allocator import tune_allocator
from ztunnel.identity.tls_transport import TlsAdapter, TlsTransport

# the threaded relay's reads: as much as one asyncio/uvloop socket read brings the proxies (its TLS
# side gets one record per call whatever it asks)
from ztunnel.proxy.relay import READ_CHUNK_BYTES as RELAY_READ_BYTES


def _reading(transport: Any) -> Any:
    """What to pause when the other side cannot keep up: the TCP socket under our TLS, else the transport."""
    return transport._adapter.raw if isinstance(transport, TlsTransport) else transport


class _Relay(asyncio.Protocol):
    """One side of a relayed connection; `peer` is the other side's relay."""

    def __init__(self, on_first_data: Any = None) -> None:
        self.transport: Any = None
        self.peer: _Relay | None = None
        self._early: list[bytes] = []
        self._on_first_data = on_first_data

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if not isinstance(transport, TlsTransport):   # the TLS adapter sets its own marks on its socket
            transport.set_write_buffer_limits(high=2 * 1024 * 1024, low=512 * 1024)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self._on_first_data is not None:
            self._on_first_data(self)
            self._on_first_data = None
        peer = self.peer
        if peer is None or peer.transport is None:
            self._early.append(data)   # the upstream is still connecting: hold this, read no more
            _reading(self.transport).pause_reading()
            return
        peer.transport.write(data)

    def attach(self, peer: _Relay) -> None:
        self.peer = peer
        early, self._early = self._early, []
        if early and peer.transport is not None:
            peer.transport.write(b"".join(early))
            _reading(self.transport).resume_reading()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            _reading(self.peer.transport).pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            _reading(self.peer.transport).resume_reading()

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


def tls_context(mode: str, cert: str, key: str, ca: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH if mode == "server" else ssl.Purpose.SERVER_AUTH,
                                     cafile=ca)
    ctx.load_cert_chain(cert, key)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED      # mutual TLS, as both other pairs
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


async def serve(mode: str, listen: tuple[str, int], upstream: tuple[str, int], cert: str, key: str, ca: str) -> None:
    loop = asyncio.get_running_loop()
    ctx = tls_context(mode, cert, key, ca)

    dials: set[asyncio.Task[None]] = set()    # the loop keeps only weak references to tasks
    # TLS session reuse towards the one upstream, as HAProxy does for its servers by default: the
    # ticket arrives after the handshake, with the server's first bytes
    tickets: dict[str, ssl.SSLSession] = {}

    def keep_ticket(relay: _Relay) -> None:
        session = relay.transport.get_extra_info("ssl_object").session
        if session is not None and session.has_ticket:
            tickets["last"] = session

    def accepted() -> asyncio.Protocol:
        downstream = _Relay()

        async def dial() -> None:
            try:
                if mode == "client":   # TLS out: the handshake completes before bytes flow
                    up = _Relay(on_first_data=keep_ticket)
                    adapter = TlsAdapter(loop, ctx, up, server_side=False, session=tickets.get("last"))
                    await loop.create_connection(lambda: adapter, *upstream)
                    await adapter.handshake
                else:
                    _, plain = await loop.create_connection(_Relay, *upstream)
                    assert isinstance(plain, _Relay)
                    up = plain
            except (OSError, ssl.SSLError, TimeoutError):
                if downstream.transport is not None:
                    downstream.transport.close()
                return
            up.attach(downstream)
            downstream.attach(up)

        task = loop.create_task(dial())
        dials.add(task)
        task.add_done_callback(dials.discard)
        return TlsAdapter(loop, ctx, downstream, server_side=True) if mode == "server" else downstream

    server = await loop.create_server(accepted, *listen, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def serve_threaded(mode: str, listen: tuple[str, int], upstream: tuple[str, int], cert: str, key: str,
                   ca: str) -> None:
    """The same relay as a threaded program: a thread per connection over blocking `ssl.SSLSocket`s
    (no event loop, no memory BIO; recv, SSL and sendall in C with the GIL released around the
    system calls). One thread moves both directions, waiting in `select`: an OpenSSL connection
    must not be read and written from two threads at once (tried: a TLS 1.3 connection hung)."""
    ctx = tls_context(mode, cert, key, ca)
    tickets: dict[str, ssl.SSLSession] = {}

    def pump(a: socket.socket, b: socket.socket) -> None:
        # reads never block (a TLS record may carry no application data: a session ticket), writes
        # do (sendall on a blocking socket: the other side's back-pressure)
        other = {a: b, b: a}
        while True:
            # decrypted bytes OpenSSL already holds are not visible to select
            ready = [s_ for s_ in (a, b) if isinstance(s_, ssl.SSLSocket) and s_.pending()]
            if not ready:
                ready, _, _ = select.select([a, b], [], [])
            for s_ in ready:
                s_.setblocking(False)
                try:
                    data = s_.recv(RELAY_READ_BYTES)
                except (ssl.SSLWantReadError, BlockingIOError):
                    continue
                finally:
                    s_.setblocking(True)
                if not data:
                    return
                other[s_].sendall(data)

    def relay(conn: socket.socket) -> None:
        up: socket.socket | None = None
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw = socket.create_connection(upstream)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if mode == "client":
                up = ctx.wrap_socket(raw, session=tickets.get("last"))
            else:
                up, conn = raw, ctx.wrap_socket(conn, server_side=True)
            pump(conn, up)
            if isinstance(up, ssl.SSLSocket) and up.session is not None and up.session.has_ticket:
                tickets["last"] = up.session    # the server's ticket came with its first bytes
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()
            if up is not None:
                up.close()

    lsock = socket.create_server(listen, backlog=1024)
    print("ready", flush=True)
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=relay, args=(conn,), daemon=True).start()


def main() -> None:
    mode, lh, lp, uh, up, cert, key, ca = sys.argv[1:9]
    threaded = sys.argv[9:10] == ["--threads"]
    if mode not in ("client", "server"):
        raise SystemExit("mode: client (plain in, TLS out) or server (TLS in, plain out)")
    tune_allocator(os.environ)   # as `python -m ztunnel` does: like for like
    if threaded:
        serve_threaded(mode, (lh, int(lp)), (uh, int(up)), cert, key, ca)
        return
    import uvloop

    uvloop.install()
    asyncio.run(serve(mode, (lh, int(lp)), (uh, int(up)), cert, key, ca))


if __name__ == "__main__":
    main()
