"""Channels to the controller that pin its SPIFFE identity, with roots that follow rotations.

Why not a plain `grpc.aio.secure_channel`: gRPC's Python client checks the server certificate
against a root pool and a DNS name, and exposes nothing of it afterwards (the auth context is a
server-side API). Any certificate with the controller's DNS name from any authority in the pool
would pass — and with a plug-in CA the pool holds an organisation's root, which may issue that
name to anyone. So the proxy makes the TLS connection itself and lets gRPC speak over it:

    grpc.aio channel ──h2c──▶ abstract unix socket, this process only (SO_PEERCRED: our pid)
        ──▶ ControllerBridge ──TLS──▶ controller (SNI `controller_tls_name(td)`, our SVID if any)
            after the handshake: the peer leaf must be `controller_spiffe_id(td)`, signed directly by
            an authority of the proxy's own trust domain (`TrustStore.verify_peer`); only then is
            one byte forwarded.

The DNS name only picks which of the controller's certificates it presents (one per trust domain);
it authenticates nothing.

`ControllerTrust` holds what the controller is verified against, and keeps it current on its own:
the operator's anchor file (re-read at every connection: in Kubernetes a mounted ConfigMap, in the
lab the controller's `roots/<td>.pem`) joined with the roots the controller itself sent last (every
`CertificateResponse.roots_pem`, and the proxy's own trust domain's bundle in every applied config).
A staged root rotation therefore never cuts a proxy off: it learns the new root while the old one
still verifies the controller (publish), before the controller switches (see
`federation.core.rotation`).

A connection the controller's TLS layer refuses because of our certificate (unknown issuer after a
rotation, expired) is reported through `on_rejected`, so the proxy can fall back to its bootstrap
credential instead of retrying the same certificate forever.

Each channel owns its connections (`BridgedChannel`): it dials a listener of its own, and closing
it closes that listener and aborts every connection made through it. gRPC alone does not: its core
keeps a closed channel's connection for as long as any of the channel's call objects lives in
Python, and a call the controller ended (a stream cut at its certificate's expiry) is often kept
alive by a reference cycle (the exception's traceback holds the frame that holds the call) until
the cycle collector happens to run. The soak found about 30 connections on the controller's config
port at rest that way, one per cut stream, on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import ssl
import struct
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ztunnel.api.bundle import certificates_to_pem, fingerprint_sha256, load_pem_certificates
from ztunnel.api.clock import calendar_now
from ztunnel.api.codec import DEFAULT_MAX_MESSAGE_BYTES
from ztunnel.api.identity import SpiffeId, controller_spiffe_id, controller_tls_name
from ztunnel.api.verify import PeerVerificationError, TrustStore
from ztunnel.identity.tls import controller_client_context
from ztunnel.xds.state import parse_host_port

PIPE_CHUNK_BYTES = 256 * 1024
ROUTE_BACKLOG = 16             # a channel dials one connection at a time (again after a loss)
MAX_ANCHOR_FILE_BYTES = 1024 * 1024
# Alerts with which a TLS server says "your certificate": after a root rotation or an expiry the
# controller's TLS layer refuses the client certificate before gRPC sees the call.
_CERT_REJECTED_MARKERS = ("UNKNOWN_CA", "CERTIFICATE_EXPIRED", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN",
                          "CERTIFICATE_REQUIRED", "DECRYPT_ERROR", "ACCESS_DENIED")


class ControllerTrust:
    """The controller's pinned identity and the roots of the proxy's own trust domain.

    Invariants: `identity` is fixed (the trust domain's `controller_spiffe_id`); the roots are
    only ever those of `trust_domain` (the union of the anchor file and the last learnt set), and
    every certificate in them is a CA certificate (`TrustStore` refuses anything else)."""

    def __init__(self, trust_domain: str, anchor_file: Path | None = None, learned_pem: bytes = b"") -> None:
        self.trust_domain = trust_domain
        self.identity = controller_spiffe_id(trust_domain)
        self.server_name = controller_tls_name(trust_domain)
        self.anchor_file = anchor_file
        self._learned = b""
        self.updates = 0
        if learned_pem:
            self.learn(learned_pem)

    @property
    def learned_pem(self) -> bytes:
        return self._learned

    def learn(self, roots_pem: bytes) -> bool:
        """Adopt the roots the controller sent (over a verified channel); True when they changed.
        A set that does not parse, or holds a non-CA certificate, is ignored (the old one stays)."""
        try:
            certs = load_pem_certificates(roots_pem)
            TrustStore({self.trust_domain: certs})
        except ValueError:
            return False
        if not certs:
            return False
        pem = certificates_to_pem(certs)
        if pem == self._learned:
            return False
        self._learned = pem
        self.updates += 1
        return True

    def _anchor_pem(self) -> bytes:
        if self.anchor_file is None:
            return b""
        try:
            with open(self.anchor_file, "rb") as f:
                return f.read(MAX_ANCHOR_FILE_BYTES)
        except OSError:
            return b""

    def roots_pem(self) -> bytes:
        """The anchor file's roots and the learnt ones, each certificate once."""
        seen: set[str] = set()
        out = []
        for pem in (self._anchor_pem(), self._learned):
            try:
                certs = load_pem_certificates(pem) if pem.strip() else []
            except ValueError:
                continue
            for c in certs:
                fp = fingerprint_sha256(c)
                if fp not in seen:
                    seen.add(fp)
                    out.append(c)
        return certificates_to_pem(out)

    def has_roots(self) -> bool:
        return bool(self.roots_pem().strip())

    def verify(self, leaf_der: bytes, now_s: float) -> SpiffeId:
        """The controller's leaf, checked against this trust domain's roots only and the pinned id."""
        try:
            store = TrustStore({self.trust_domain: load_pem_certificates(self.roots_pem())})
        except ValueError as e:
            raise PeerVerificationError(f"the roots of {self.trust_domain} are unusable ({e})", "no_bundles") from e
        return store.verify_peer(leaf_der, now_s, expected=[self.identity], local_trust_domain=self.trust_domain)


def _peer_pid(sock: socket.socket) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", raw)[0])


def rejected_our_certificate(err: BaseException) -> bool:
    """Did the server's TLS layer refuse the certificate we presented?"""
    text = f"{getattr(err, 'reason', '')} {err}".upper()
    return isinstance(err, ssl.SSLError) and "ALERT" in text and any(m in text for m in _CERT_REJECTED_MARKERS)


def _listen_abstract(prefix: str) -> socket.socket:
    """A listening abstract unix socket, non-blocking, under `prefix` and 128 random bits. Random,
    not counted: every process of the network namespace reads bound names in /proc/net/unix, and
    one that could predict the next name could bind it first and stop the proxy from opening
    channels (binding first to redirect gRPC is not possible either way: a name taken makes our
    bind fail, and gRPC is never pointed at a name we did not bind)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(f"\0{prefix}-{secrets.token_hex(16)}")
        sock.listen(ROUTE_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _Route:
    """One channel's way into the bridge: a listener on an abstract address of its own, and the
    tasks serving the connections made through it. The socket listens from the start (gRPC may dial
    before the asyncio server is up: the backlog holds the connection)."""

    def __init__(self, prefix: str, accept: Callable[[asyncio.StreamReader, asyncio.StreamWriter, _Route], None]) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False
        self._sock = _listen_abstract(prefix)
        self.name = self._sock.getsockname()[1:].decode()
        self._serving = asyncio.ensure_future(asyncio.start_unix_server(
            lambda r, w: accept(r, w, self), sock=self._sock, backlog=ROUTE_BACKLOG))

    def abandon(self) -> None:
        """Stop listening and cancel this route's connections without waiting for them to end.
        A connection accepted meanwhile is refused by the bridge (`closed`)."""
        self.closed = True
        if self._serving.done():
            if not self._serving.cancelled() and self._serving.exception() is None:
                self._serving.result().close()
        else:
            self._serving.cancel()
        self._sock.close()      # the server's already, or never handed over: closing twice is harmless
        for t in list(self.tasks):
            t.cancel()

    async def close(self) -> None:
        """`abandon`, then wait until every connection of the route has ended (each aborts its TLS
        side on the way out)."""
        self.abandon()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


def _abandon_route(route: _Route, on_closed: Callable[[_Route], None]) -> None:
    route.abandon()
    on_closed(route)


class BridgedChannel:
    """A `grpc.aio.Channel` through a `ControllerBridge` that owns its connections: `close()` closes
    the gRPC channel, then aborts whatever connection gRPC left open (module docstring). A channel
    dropped without `close()` abandons its route when it is collected (gRPC's own finalizer closes
    only its side). Everything else is the gRPC channel's (`unary_unary`, `stream_stream`, ...)."""

    def __init__(self, channel: Any, route: _Route, on_closed: Callable[[_Route], None]) -> None:
        self._channel = channel
        self._route = route
        self._on_closed = on_closed
        self._finalizer = weakref.finalize(self, _abandon_route, route, on_closed)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):       # ours (never forwarded: no recursion before __init__ ran)
            raise AttributeError(name)
        return getattr(self._channel, name)

    async def close(self, grace: float | None = None) -> None:
        self._finalizer.detach()
        try:
            await self._channel.close(grace)
        finally:
            try:
                await self._route.close()
            finally:
                self._on_closed(self._route)

    async def __aenter__(self) -> BridgedChannel:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()


class ControllerBridge:
    """One controller port (the mTLS port, or the bootstrap port), reachable by gRPC channels of
    this process only, over TLS connections that verify the controller before forwarding.

    `client_svid()` is asked at every new connection: (chain PEM, key PEM) to present, or None
    (the bootstrap port needs none). Owns a listener per open channel and a task per connection;
    `close()` ends them all."""

    def __init__(self, target: str, trust: ControllerTrust,
                 client_svid: Callable[[], tuple[bytes, bytes] | None] = lambda: None, *,
                 clock: Callable[[], float] = calendar_now, connect_timeout_s: float = 5.0,
                 on_rejected: Callable[[str], None] | None = None) -> None:
        self.host, self.port = parse_host_port(target)
        self.target = target
        self.trust = trust
        self.client_svid = client_svid
        self.clock = clock
        self.connect_timeout_s = connect_timeout_s
        self.on_rejected = on_rejected
        self.name = f"meshfed-ctl-{os.getpid()}-{secrets.token_hex(8)}"
        self._started = False
        self._routes: set[_Route] = set()
        self._channels: weakref.WeakSet[BridgedChannel] = weakref.WeakSet()
        self._tasks: set[asyncio.Task[None]] = set()   # every route's connections
        self.connections = 0
        self.refused_peers = 0          # local connections from another process
        self.verification_failures = 0
        self.rejections = 0             # connections the controller refused our certificate on
        self.last_error = ""
        self.last_peer = ""

    def explain(self, detail: str) -> str:
        """`detail` (what gRPC says about a failed call or stream) with why this bridge's last
        connection failed: when the bridge refuses the controller's certificate (expired, not yet
        valid, not the controller), gRPC only sees the local socket close."""
        if self.last_error and self.last_error not in detail:
            return f"{detail} ({self.last_error})"
        return detail

    async def start(self) -> ControllerBridge:
        self._started = True
        return self

    def channel(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> BridgedChannel:
        """A gRPC channel through this bridge (each of its connections is a verified TLS one) that
        owns its connections: see `BridgedChannel`."""
        import grpc.aio

        if not self._started:
            raise RuntimeError("start() the bridge before asking it for channels")
        from ztunnel.xds.client import keepalive_options

        # the bridge relays HTTP/2 as is: keepalive pings reach the controller and tell a dead link.
        # A channel of its own connections (not gRPC's process-wide subchannel pool): a new channel
        # dials anew and presents the certificate we hold *now*. Shared, a CSR or a reconnecting
        # session rode the connection an earlier certificate opened, and once that one expired the
        # controller refused every new call on it (found by the soak: renewals stopped a day in).
        opts = [("grpc.max_receive_message_length", max_message_bytes + 65536),
                ("grpc.max_send_message_length", max_message_bytes + 65536),
                ("grpc.default_authority", self.trust.server_name), ("grpc.use_local_subchannel_pool", 1),
                *keepalive_options()]
        route = _Route(self.name, self._accept)
        try:
            channel = BridgedChannel(grpc.aio.insecure_channel(f"unix-abstract:{route.name}", options=opts),
                                     route, self._routes.discard)
        except BaseException:
            route.abandon()
            raise
        self._routes.add(route)
        self._channels.add(channel)
        return channel

    async def close(self) -> None:
        """Close every channel still open (gRPC first: none may redial a name we gave up), then
        whatever route or connection is left."""
        self._started = False
        await asyncio.gather(*(ch.close() for ch in list(self._channels)), return_exceptions=True)
        for route in list(self._routes):
            route.abandon()
        self._routes.clear()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- one connection ------------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, route: _Route) -> None:
        if route.closed:            # accepted by the kernel just before its channel closed
            writer.close()
            return
        task = asyncio.ensure_future(self._serve(reader, writer))
        for tasks in (self._tasks, route.tasks):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _serve(self, local_r: asyncio.StreamReader, local_w: asyncio.StreamWriter) -> None:
        remote_w: asyncio.StreamWriter | None = None
        try:
            sock = local_w.get_extra_info("socket")
            if sock is None or _peer_pid(sock) != os.getpid():
                # the socket is abstract: anything in this network namespace could connect, and
                # through us speak to the controller with this proxy's identity
                self.refused_peers += 1
                return
            self.connections += 1
            svid = self.client_svid()
            ctx = controller_client_context(self.trust.roots_pem(), *(svid or (None, None)))
            remote_r, remote = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=ctx, server_hostname=self.trust.server_name),
                self.connect_timeout_s)
            remote_w = remote
            der = remote.get_extra_info("ssl_object").getpeercert(binary_form=True)
            try:
                peer = self.trust.verify(der or b"", self.clock())
            except PeerVerificationError as e:
                self.verification_failures += 1
                self.last_error = f"controller at {self.target} failed verification: {e.reason}"
                return
            self.last_peer = str(peer)
            self.last_error = ""   # this connection is good: an older failure no longer explains anything
            await self._pipe_both(local_r, local_w, remote_r, remote, presented=svid is not None)
        except (OSError, TimeoutError, ssl.SSLError, ValueError, RuntimeError) as e:
            # RuntimeError: uvloop's write to a connection the other end already reset
            self.last_error = f"{self.target}: {type(e).__name__}: {e}"
            if rejected_our_certificate(e):
                self._rejected(self.last_error)
        finally:
            local_w.close()
            if remote_w is not None:
                # aborted, not closed: a TLS close waits up to 30 s for the controller's close_notify,
                # and whatever gRPC wrote was drained already (or is being thrown away with its channel)
                remote_w.transport.abort()

    def _rejected(self, why: str) -> None:
        self.last_error = why
        self.rejections += 1
        if self.on_rejected is not None:
            self.on_rejected(why)

    async def _pipe_both(self, local_r: asyncio.StreamReader, local_w: asyncio.StreamWriter,
                         remote_r: asyncio.StreamReader, remote_w: asyncio.StreamWriter, *, presented: bool) -> None:
        """Forward both ways until both ends are done.

        With TLS 1.3 a server refuses a client certificate after our side of the handshake is done,
        and its alert often does not survive the close (a reset instead). A gRPC server always
        speaks first (its SETTINGS), so when the controller's side ends — EOF or a connection error
        — before a single byte came, and we `presented` a certificate, it refused that certificate:
        said at once (`on_rejected`), not when our side is closed too."""
        received = 0
        local_ended = False

        def remote_ended() -> None:
            if presented and not received and not local_ended:
                self._rejected(f"{self.target} closed the connection right after the handshake, before a "
                               "byte: it refused our certificate")

        async def upward() -> None:
            nonlocal local_ended
            while data := await local_r.read(PIPE_CHUNK_BYTES):
                remote_w.write(data)
                await remote_w.drain()
            # gRPC closed its connection (a channel closed, a session over). TLS cannot carry a
            # half-close, and left open the controller's side stayed up until a keepalive ping
            # found it: every stream cut at a certificate's expiry left one connection behind on
            # both sides (the soak: +32 on the controller's config port in two simulated weeks).
            # Aborted, not closed: a TLS close waits up to 30 s for the controller's close_notify
            # (everything gRPC wrote was drained above; nothing is left to flush).
            local_ended = True
            remote_w.transport.abort()

        async def downward() -> None:
            nonlocal received
            try:
                while data := await remote_r.read(PIPE_CHUNK_BYTES):
                    received += len(data)
                    local_w.write(data)
                    await local_w.drain()
            except ssl.SSLError:
                raise          # an alert: the caller reads it
            except OSError:
                remote_ended()
                raise
            remote_ended()
            with contextlib.suppress(OSError, RuntimeError, NotImplementedError):
                local_w.write_eof()

        up, down = asyncio.ensure_future(upward()), asyncio.ensure_future(downward())
        try:
            done, _pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                err = t.exception()
                if err is not None:
                    raise err
        finally:
            for t in (up, down):
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
