"""TLS for HBONE sessions over any asyncio transport, with `ssl.MemoryBIO` (no asyncio.sslproto).

Why not `loop.create_server(ssl=...)` / `start_tls`: asyncio's `SSLProtocol` is a general-purpose
pure-Python layer (app-protocol flow control, a 256 KiB buffer per connection, several calls and a
copy per record) sitting between the socket and our HTTP/2 framer. Profiling the node pair (see
benchmarks/dataplane.py `--profile`) showed that layer, not the framer, as the largest Python cost
on both the request/response and the bulk paths. This adapter does only what HBONE needs:

- `TlsAdapter` is the protocol of the raw transport (a TCP socket, or an HBONE stream's
  `StreamTransport` for the inner TLS of double HBONE). It drives the handshake (with a timeout),
  then decrypts everything a `data_received` brought in one go and hands the application protocol
  *one* plaintext chunk per read — an HTTP/2 framer wants batches, not records.
- `TlsTransport` is what the application protocol (an `HboneSession`) writes to: `write` encrypts
  into the memory BIO and passes the ciphertext to the raw transport in one write.
- `session`: a TLS 1.3 session to offer for resumption (client side; whether the peer took it:
  `sslobj.session_reused`). The peer is verified the same way either way.
- `handshake` is a future: result = None when the handshake completed (the app protocol's
  `connection_made` has run by then), exception = why it failed (`ssl.SSLError`, `TimeoutError`,
  `ConnectionResetError`). Verification of the peer's SPIFFE identity is the app protocol's job, in
  `connection_made`, as before: `get_extra_info("ssl_object")` returns the `ssl.SSLObject`.

Close: `close()` sends close_notify and closes the raw transport; `abort()` drops it. A peer's
close_notify or EOF is delivered as `eof_received` then `connection_lost(None)`; a TLS error after
the handshake as `connection_lost(exc)`.

Bounded memory per connection (a peer must not make us hold more than this, whatever it sends):
- before the handshake completes: at most `MAX_HANDSHAKE_BYTES` of the peer's bytes wait in the
  incoming BIO (a handshake flight is a few KiB; more is a peer streaming garbage), and the
  handshake must finish within `handshake_timeout_s`. `admit(raw transport)` may refuse a
  connection before any TLS work (the proxies' cap on handshakes in flight, per peer and in
  total) and `on_handshake_over()` is called exactly once for an admitted connection, when its
  handshake succeeded or failed;
- after it: what the app writes for a peer that does not read. The raw transport's back-pressure
  is passed to the app (`pause_writing`/`resume_writing`, so relays stop reading their sources),
  and beyond `max_unsent_bytes` (default `MAX_UNSENT_BYTES`) the connection is aborted: that much
  unread only happens when the peer floods us with frames that need answers (PING, SETTINGS) or
  grants windows it never drains. Received plaintext is handed on at once (the app's flow
  control bounds it: HBONE windows).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, TypeGuard

# What one `SSLObject.read` asks for. OpenSSL hands back one record (<= 16 KiB of plaintext) per
# call, but Python allocates the whole request first and shrinks it afterwards: at 256 KiB, above
# glibc's 128 KiB mmap and trim thresholds, every record cost an mmap/munmap or a heap grow and
# trim, and the kernel zeroed the pages again. Measured: 256 KiB of ciphertext decrypted in memory,
# 395 us with 256 KiB reads, 246 us with 64 or 16 KiB; one `benchmarks.dataplane` round, mmap +
# munmap calls of all its processes 26,308 -> 5,703. 64 KiB leaves room for more than one record,
# should OpenSSL ever return them together.
READ_BYTES = 64 * 1024
# Ciphertext we may hold for a peer that does not read. The app is paused (`pause_writing`) once
# the raw transport's buffer passes its high-water mark, so legitimate traffic leaves at most one
# read per active stream behind it; beyond this, the peer is flooding us with frames that need
# answers or granting windows it never drains, and the connection is aborted.
MAX_UNSENT_BYTES = 8 * 1024 * 1024
# The raw transport's write buffer marks: above HIGH the app is paused (`pause_writing`), below LOW
# it resumes. asyncio's defaults (64/16 KiB) would pause a bulk relay after every read it makes
# (measured: a third of the pair's throughput); a few reads' worth keeps the pipe full.
WRITE_HIGH_WATER_BYTES = 2 * 1024 * 1024
WRITE_LOW_WATER_BYTES = 512 * 1024
# What a peer may send before the handshake completes (its flights are a few KiB: a hello, a
# certificate chain, a Finished, and the application data that may ride with the last flight).
MAX_HANDSHAKE_BYTES = 64 * 1024


def is_write_transport(t: object) -> TypeGuard[asyncio.WriteTransport]:
    """A transport with a write buffer (asyncio's, uvloop's — whose classes are not asyncio's, so
    `isinstance` says no — or ours), not a test's in-memory pipe."""
    return callable(getattr(t, "get_write_buffer_size", None)) and callable(getattr(t, "set_write_buffer_limits", None))


class TlsTransport(asyncio.Transport):
    """The application side of a `TlsAdapter`."""

    def __init__(self, adapter: TlsAdapter) -> None:
        super().__init__()
        self._adapter = adapter

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        a = self._adapter
        if name == "ssl_object":
            return a.sslobj
        if name == "sslcontext":
            return a.context
        if a.raw is not None:
            return a.raw.get_extra_info(name, default)
        return default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._adapter.write_app(data)

    def is_closing(self) -> bool:
        return self._adapter.closing

    def close(self) -> None:
        self._adapter.close()

    def abort(self) -> None:
        self._adapter.abort()

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        raw = self._adapter.raw
        return raw.get_write_buffer_size() if is_write_transport(raw) else 0

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._adapter.app = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._adapter.app


class TlsAdapter(asyncio.Protocol):
    """TLS client or server over `raw`; the plaintext side is `app` (an `asyncio.Protocol`).

    Invariants: `app.connection_made` is called once, when the handshake completed, and
    `app.connection_lost` only after it; ciphertext produced by OpenSSL is written to the raw
    transport before returning from any method that may have produced it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, context: ssl.SSLContext, app: asyncio.Protocol, *,
                 server_side: bool, server_hostname: str | None = None,
                 handshake_timeout_s: float = 10.0,
                 admit: Callable[[asyncio.BaseTransport], bool] | None = None,
                 on_handshake_over: Callable[[], None] | None = None,
                 max_unsent_bytes: int | None = None, session: ssl.SSLSession | None = None) -> None:
        self.loop = loop
        self._admit = admit
        self._on_handshake_over = on_handshake_over
        self._admitted = False
        self.max_unsent_bytes = MAX_UNSENT_BYTES if max_unsent_bytes is None else max_unsent_bytes
        self._app_write_paused = False
        self.context = context
        self.app = app
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                       server_hostname=server_hostname or None, session=session)
        self.raw: asyncio.BaseTransport | None = None
        self._raw_buffered = False
        self.transport = TlsTransport(self)
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.handshake.add_done_callback(_retrieve)
        self._handshake_timeout_s = handshake_timeout_s
        self._timer: asyncio.TimerHandle | None = None
        self._app_connected = False
        self._holding = False  # writes wait for one flush at the end of the handshake's last step
        self.closing = False
        self._lost = False

    # --- raw side ----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport
        if self._admit is not None and not self._admit(transport):
            self._lost = self.closing = True
            if not self.handshake.done():
                self.handshake.set_exception(ConnectionRefusedError("refused before the TLS handshake "
                                                                    "(too many handshakes in flight)"))
            transport.abort()  # type: ignore[attr-defined]
            return
        self._admitted = True
        if is_write_transport(transport):
            self._raw_buffered = True   # asked once, not per write
            try:
                transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES, low=WRITE_LOW_WATER_BYTES)
            except NotImplementedError:
                pass  # a transport without buffer marks (tests' in-memory pipes)
        self._timer = self.loop.call_later(self._handshake_timeout_s, self._handshake_timed_out)
        self._step_handshake()

    def data_received(self, data: bytes) -> None:
        if self._lost:
            return
        self._incoming.write(data)
        if not self._app_connected:
            self._step_handshake()
            if not self._app_connected:
                if self._incoming.pending > MAX_HANDSHAKE_BYTES and not self.handshake.done():
                    self._fail_handshake(ConnectionError(
                        f"peer sent more than {MAX_HANDSHAKE_BYTES} bytes without completing the TLS "
                        "handshake; is it speaking TLS?"))
                return
        self._read_app()

    # --- back-pressure from the raw transport, passed to the app ------------------------------------

    def pause_writing(self) -> None:
        if self._app_connected and not self._app_write_paused:
            self._app_write_paused = True
            pause = getattr(self.app, "pause_writing", None)
            if pause is not None:
                pause()

    def resume_writing(self) -> None:
        if self._app_write_paused:
            self._app_write_paused = False
            resume = getattr(self.app, "resume_writing", None)
            if resume is not None:
                resume()

    def eof_received(self) -> bool | None:
        if not self._app_connected:
            self._fail_handshake(ConnectionResetError("peer closed the connection during the TLS handshake"))
            return None
        keep = self.app.eof_received()
        if not keep:
            self.close()
        return None  # TLS has no half-close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
        if not self._app_connected:
            self._fail_handshake(exc or ConnectionResetError("connection closed during the TLS handshake"))
            return
        self.app.connection_lost(exc)

    # --- handshake ---------------------------------------------------------------------------------

    def _step_handshake(self) -> None:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as e:
            self._flush()  # the alert, so the peer learns why
            self._fail_handshake(e)
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._app_connected = True
        self._handshake_over()
        # our last handshake flight, what the app writes at once, and its answers to application
        # data that came with the peer's last flight leave in one write (e.g. a server's SETTINGS
        # and its ACK of the client's SETTINGS: one message through a gateway instead of two)
        self._holding = True
        try:
            self.app.connection_made(self.transport)
            if not self.handshake.done():
                self.handshake.set_result(None)
            if self._incoming.pending and not self.closing:
                self._read_app()  # application data that came with the handshake's last flight
        finally:
            self._holding = False
        self._flush()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if not self._app_connected:
            self._fail_handshake(TimeoutError(f"TLS handshake not finished within {self._handshake_timeout_s:g}s"))

    def _fail_handshake(self, exc: BaseException) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.handshake.done():
            self.handshake.set_exception(exc)
        self._handshake_over()
        self.abort()

    def _handshake_over(self) -> None:
        if self._admitted:
            self._admitted = False
            if self._on_handshake_over is not None:
                self._on_handshake_over()

    # --- data --------------------------------------------------------------------------------------

    def _read_app(self) -> None:
        chunks: list[bytes] = []
        sslobj, incoming = self.sslobj, self._incoming
        read = sslobj.read
        eof = False
        error: Exception | None = None
        while True:
            try:
                chunk = read(READ_BYTES)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                eof = True
                break
            except ssl.SSLError as e:
                error = e
                break
            if not chunk:
                eof = True
                break
            chunks.append(chunk)
            if not incoming.pending and not sslobj.pending():
                break  # everything buffered is consumed: skip the SSLWantReadError another read raises
        if chunks:
            self.app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if self._outgoing.pending and not self._holding:
            self._flush()
        if error is not None:
            self._flush()
            self._abort_with(error)
        elif eof and not self.closing:
            keep = self.app.eof_received()
            if not keep:
                self.close()

    def write_app(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or not data:
            return
        n = self.sslobj.write(data)
        if n < len(data):   # OpenSSL took part of it (partial writes): the rest, record by record
            view = memoryview(data)[n:]
            while view:
                n = self.sslobj.write(view)
                view = view[n:]
        if not self._holding:
            self._flush()

    def _flush(self) -> None:
        raw = self.raw
        if self._outgoing.pending and raw is not None and not raw.is_closing():
            raw.write(self._outgoing.read())  # type: ignore[attr-defined]
            if (self._raw_buffered and self._app_connected
                    and raw.get_write_buffer_size() > self.max_unsent_bytes):  # type: ignore[attr-defined]
                # not from inside the app's own call stack: let it finish, then tear down
                self.loop.call_soon(self._abort_with, ConnectionError(
                    f"peer has not read {raw.get_write_buffer_size()} bytes we sent (limit "  # type: ignore[attr-defined]
                    f"{self.max_unsent_bytes}); it is stalled or flooding us with frames that need answers — "
                    "connection aborted"))

    # --- closing -----------------------------------------------------------------------------------

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self._app_connected:
            try:
                self.sslobj.unwrap()  # close_notify
            except (ssl.SSLError, OSError, ValueError):
                pass
            self._flush()
        if self.raw is not None and not self.raw.is_closing():
            self.raw.close()

    def abort(self) -> None:
        self.closing = True
        if self.raw is not None:
            self.raw.abort()  # type: ignore[attr-defined]

    def _abort_with(self, exc: Exception) -> None:
        self.abort()
        if not self._lost and self._app_connected:
            self._lost = True
            self.app.connection_lost(exc)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
