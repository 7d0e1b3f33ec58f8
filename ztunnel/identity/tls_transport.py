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
- `handshake` is a future: result = None when the handshake completed (the app protocol's
  `connection_made` has run by then), exception = why it failed (`ssl.SSLError`, `TimeoutError`,
  `ConnectionResetError`). Verification of the peer's SPIFFE identity is the app protocol's job, in
  `connection_made`, as before: `get_extra_info("ssl_object")` returns the `ssl.SSLObject`.

Close: `close()` sends close_notify and closes the raw transport; `abort()` drops it. A peer's
close_notify or EOF is delivered as `eof_received` then `connection_lost(None)`; a TLS error after
the handshake as `connection_lost(exc)`.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

READ_BYTES = 256 * 1024
# Ciphertext we may hold for a peer that does not read. A legitimate HBONE peer bounds what we send
# with its flow-control windows (16 MiB per connection by default); beyond this, the peer is
# flooding us with frames that need answers (PING, SETTINGS) or granting windows it never drains,
# and the connection is aborted rather than let the buffer grow without bound.
MAX_UNSENT_BYTES = 64 * 1024 * 1024


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
        return raw.get_write_buffer_size() if isinstance(raw, asyncio.WriteTransport) else 0

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
                 handshake_timeout_s: float = 10.0) -> None:
        self.loop = loop
        self.context = context
        self.app = app
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                       server_hostname=server_hostname or None)
        self.raw: asyncio.BaseTransport | None = None
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
        self._timer = self.loop.call_later(self._handshake_timeout_s, self._handshake_timed_out)
        self._step_handshake()

    def data_received(self, data: bytes) -> None:
        if self._lost:
            return
        self._incoming.write(data)
        if not self._app_connected:
            self._step_handshake()
            if not self._app_connected:
                return
        self._read_app()

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
        self.abort()

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
        view = memoryview(data)
        while view:
            n = self.sslobj.write(view)
            view = view[n:]
        if not self._holding:
            self._flush()

    def _flush(self) -> None:
        raw = self.raw
        if self._outgoing.pending and raw is not None and not raw.is_closing():
            raw.write(self._outgoing.read())  # type: ignore[attr-defined]
            if (self._app_connected and isinstance(raw, asyncio.WriteTransport)
                    and raw.get_write_buffer_size() > MAX_UNSENT_BYTES):
                # not from inside the app's own call stack: let it finish, then tear down
                self.loop.call_soon(self._abort_with, ConnectionError(
                    f"peer has not read {raw.get_write_buffer_size()} bytes we sent (limit {MAX_UNSENT_BYTES}); "
                    "it is stalled or flooding us with frames that need answers — connection aborted"))

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
