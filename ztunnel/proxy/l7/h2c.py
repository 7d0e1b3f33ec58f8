"""HTTP/2 with prior knowledge (h2c) on the downstream side, through h2. Sans-IO.

A connection whose first bytes are the HTTP/2 preface (`PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n`) is
served by `H2Server`: each stream is one request (bodies buffered, bounded like HTTP/1.1), and
answers go back on their stream, in any order, so requests on one connection are handled
concurrently. Upstream the L7 engine speaks HTTP/1.1 (the demo servers' protocol), translating
`:authority` to Host; trailers are not forwarded (gRPC over a waypoint would need an h2 upstream,
which meshfed does not implement: GRPCRoute matches work, the gRPC status trailer does not).

Flow control and bounds: received DATA is acknowledged as it is buffered, and kept only while the
connection's buffered bodies stay under `MAX_BUFFERED_BODY_BYTES` (RST_STREAM REFUSED_STREAM for the
stream that would cross it) and each under `MAX_BODY_BYTES` (413); at most `MAX_STREAMS` streams are read or at the engine at once; a response body larger than
the peer's window waits for WINDOW_UPDATE (`pending`, bounded by `MAX_PENDING_RESPONSE_BYTES`);
a request must arrive within `REQUEST_READ_TIMEOUT_S` (408 on its stream) and a connection
with nothing at the engine is closed with GOAWAY after `IDLE_TIMEOUT_S` of silence. Why each value:
next to its constant. h2 exceptions on one stream reset that stream only (the
ARCHITECTURE note: an `H2Error` on a stale stream must not tear the connection down).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from ztunnel.proxy.l7.http1 import (
    IDLE_TIMEOUT_S,
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    REQUEST_READ_TIMEOUT_S,
    ProtocolFailure,
    forwardable,
)
from ztunnel.proxy.l7.routing import Headers, RequestHead

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# --- bounds (the HTTP/1.1 ones, `http1`, apply per stream: body, head bytes, header count, timeouts)
# Concurrent streams: RFC 9113 §6.5.2 recommends no less than 100, and Envoy's edge guidance uses
# 100. Advertised, and enforced by h2 from the first frame (it is h2's initial local setting): a
# client opening one more gets GOAWAY(PROTOCOL_ERROR). Counted again here over the streams this
# codec holds (read or at the engine), refused with RST_STREAM(REFUSED_STREAM) if h2 ever lets one by.
MAX_STREAMS = 100
# Request bodies buffered on one connection, all streams together: two whole maximum bodies, so
# one large upload never waits on another, while 100 streams x 8 MiB (800 MiB) cannot be asked for.
# The stream whose DATA would cross it is refused (RST_STREAM REFUSED_STREAM: nothing was
# processed, the client may retry) and its bytes dropped, so window credit never buys memory.
MAX_BUFFERED_BODY_BYTES = 2 * MAX_BODY_BYTES
# Response bytes waiting for the client's flow-control window, all streams together: a client that
# stops sending WINDOW_UPDATE pins at most this much; a response that would cross it is reset
# (RST_STREAM ENHANCE_YOUR_CALM), and the idle timeout closes a connection that makes no progress.
MAX_PENDING_RESPONSE_BYTES = 2 * MAX_BODY_BYTES


@dataclass(frozen=True, slots=True)
class StreamRequest:
    stream_id: int
    head: RequestHead
    body: bytes


@dataclass(frozen=True, slots=True)
class ConnectionEnded:
    reason: str


H2Event = StreamRequest | ProtocolFailure | ConnectionEnded


@dataclass(slots=True)
class _Stream:
    head: RequestHead | None = None
    body: list[bytes] = field(default_factory=list)
    size: int = 0
    started: float = 0.0


class H2Server:
    """The downstream side for h2c. Sans-IO: `receive(data, now)`, `respond(...)`, `deadline()` and
    `on_timer(now)`; nothing here reads a clock.

    Invariants: `_streams` are requests being read (a head, part of a body), `in_engine` the ones
    handed out and not answered yet; together at most `MAX_STREAMS`. `buffered` is the sum of the
    body bytes held in `_streams` (≤ `MAX_BUFFERED_BODY_BYTES`), `pending_bytes` the response bytes in
    `pending` (≤ `MAX_PENDING_RESPONSE_BYTES`)."""

    def __init__(self, max_body_bytes: int = MAX_BODY_BYTES, now: float = 0.0) -> None:
        cfg = h2.config.H2Configuration(client_side=False, header_encoding="latin-1", validate_inbound_headers=True)
        self.conn = h2.connection.H2Connection(config=cfg)
        self.conn.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                                          h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEAD_BYTES})
        self.conn.decoder.max_header_list_size = MAX_HEAD_BYTES  # before the client acks the setting too
        self.conn.initiate_connection()
        self.max_body_bytes = max_body_bytes
        self._streams: dict[int, _Stream] = {}
        self.in_engine: set[int] = set()
        self.buffered = 0
        self.pending: dict[int, bytes] = {}   # response bytes waiting for window
        self.pending_bytes = 0
        self.closed = False
        self._last_received = now
        self.refusals: list[str] = []         # why streams were refused, for the adapter's log
        self.write_blocked = False            # the adapter's transport is full: keep responses in `pending`

    def receive(self, data: bytes, now: float) -> list[H2Event]:
        self._last_received = now
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self.closed = True
            return [ConnectionEnded(f"h2 protocol error: {e}")]
        out: list[H2Event] = []
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                self._request_received(ev, now, out)
            elif isinstance(ev, h2.events.DataReceived):
                self._data_received(ev, out)
            elif isinstance(ev, h2.events.StreamEnded):
                if ev.stream_id in self._streams and self._streams[ev.stream_id].head is not None:
                    out.append(self._finish(ev.stream_id))
            elif isinstance(ev, h2.events.StreamReset):
                self._forget(ev.stream_id)
                self.in_engine.discard(ev.stream_id)
                self._drop_pending(ev.stream_id)
            elif isinstance(ev, h2.events.WindowUpdated):
                self._flush_pending()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.closed = True
                out.append(ConnectionEnded(f"peer sent GOAWAY ({ev.error_code})"))
        return out

    def _request_received(self, ev: h2.events.RequestReceived, now: float, out: list[H2Event]) -> None:
        sid = ev.stream_id
        if len(self._streams) + len(self.in_engine) >= MAX_STREAMS:
            self._refuse(sid, h2.errors.ErrorCodes.REFUSED_STREAM, f"over {MAX_STREAMS} concurrent streams")
            return
        hs = tuple((str(k).lower(), str(v)) for k, v in ev.headers or ())
        if len(hs) > MAX_HEADERS + 4:  # + the four request pseudo-headers; its DATA is dropped
            self._respond_refusal(sid, 431, f"more than {MAX_HEADERS} request headers")
            return
        pseudo = {k: v for k, v in hs if k.startswith(":")}
        plain = tuple((k, v) for k, v in hs if not k.startswith(":"))
        # no `:path` (CONNECT) stays empty: normalization refuses it, it is never guessed as "/"
        head = RequestHead(pseudo.get(":method", ""), pseudo.get(":path", ""),
                           pseudo.get(":authority", "") or dict(plain).get("host", ""), plain)
        self._streams[sid] = _Stream(head, started=now)
        if ev.stream_ended is not None:
            out.append(self._finish(sid))

    def _data_received(self, ev: h2.events.DataReceived, out: list[H2Event]) -> None:
        sid = ev.stream_id
        st = self._streams.get(sid)
        self._ack(sid, ev.flow_controlled_length)  # the connection window: always (dropped or kept)
        if st is None or st.head is None:
            return
        st.size += len(ev.data)
        if st.size > self.max_body_bytes:
            self._forget(sid)
            self._respond_refusal(sid, 413, f"request body over {self.max_body_bytes} bytes")
            return
        if self.buffered + len(ev.data) > MAX_BUFFERED_BODY_BYTES:
            self._forget(sid)
            self._refuse(sid, h2.errors.ErrorCodes.REFUSED_STREAM,
                         f"request bodies on this connection over {MAX_BUFFERED_BODY_BYTES} bytes")
            return
        st.body.append(ev.data)
        self.buffered += len(ev.data)
        if ev.stream_ended is not None:
            out.append(self._finish(sid))

    def _forget(self, stream_id: int) -> None:
        st = self._streams.pop(stream_id, None)
        if st is not None:
            self.buffered -= sum(len(b) for b in st.body)

    def _refuse(self, stream_id: int, code: h2.errors.ErrorCodes, why: str) -> None:
        self.refusals.append(f"stream {stream_id}: RST_STREAM {code.name}: {why}")
        with contextlib.suppress(h2.exceptions.H2Error):
            self.conn.reset_stream(stream_id, code)

    def _respond_refusal(self, stream_id: int, status: int, why: str) -> None:
        self.refusals.append(f"stream {stream_id}: {status}: {why}")
        self.in_engine.add(stream_id)   # so that `respond` accounts for it like any answer
        self.respond(stream_id, status, (), why.encode())

    def _ack(self, stream_id: int, n: int) -> None:
        try:
            self.conn.acknowledge_received_data(n, stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def _finish(self, stream_id: int) -> StreamRequest:
        st = self._streams[stream_id]
        self._forget(stream_id)
        assert st.head is not None
        self.in_engine.add(stream_id)
        return StreamRequest(stream_id, st.head, b"".join(st.body))

    def respond(self, stream_id: int, status: int, headers: Headers, body: bytes) -> None:
        if stream_id not in self.in_engine:
            return  # reset by the client meanwhile: nothing to answer
        self.in_engine.discard(stream_id)
        if self.pending_bytes + len(body) > MAX_PENDING_RESPONSE_BYTES:
            self._refuse(stream_id, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                         f"responses waiting for the client's window over {MAX_PENDING_RESPONSE_BYTES} bytes")
            return
        hs = [(":status", str(status)), *forwardable(headers), ("content-length", str(len(body)))]
        try:
            self.conn.send_headers(stream_id, hs, end_stream=not body)
        except h2.exceptions.H2Error:
            return  # the stream is gone (reset by the client): nothing to answer
        if body:
            self.pending[stream_id] = body
            self.pending_bytes += len(body)
            self._flush_pending()

    def _drop_pending(self, stream_id: int) -> None:
        body = self.pending.pop(stream_id, None)
        if body is not None:
            self.pending_bytes -= len(body)

    def resume_writing(self) -> None:
        """The transport drained: send what waits for it (within the client's windows)."""
        self.write_blocked = False
        self._flush_pending()

    def _flush_pending(self) -> None:
        if self.write_blocked:
            return  # bounded where it is (`MAX_PENDING_RESPONSE_BYTES`), not in the transport's buffer
        for sid in list(self.pending):
            body = self._take_pending(sid)
            try:
                window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
                while body and window > 0:
                    chunk, body = body[:window], body[window:]
                    self.conn.send_data(sid, chunk, end_stream=not body)
                    window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            except h2.exceptions.H2Error:
                continue
            if body:
                self.pending[sid] = body
                self.pending_bytes += len(body)

    def _take_pending(self, sid: int) -> bytes:
        body = self.pending.pop(sid)
        self.pending_bytes -= len(body)
        return body

    def deadline(self) -> float | None:
        """When `on_timer` must run: a stream's request not complete `REQUEST_READ_TIMEOUT_S` after its
        head, or `IDLE_TIMEOUT_S` without a byte from the client while nothing is at the engine
        (that includes a client that stopped reading its responses)."""
        if self.closed:
            return None
        due = [st.started + REQUEST_READ_TIMEOUT_S for st in self._streams.values() if st.head is not None]
        if not self.in_engine:
            due.append(self._last_received + IDLE_TIMEOUT_S)
        return min(due) if due else None

    def on_timer(self, now: float) -> list[H2Event]:
        if self.closed:
            return []
        for sid, st in list(self._streams.items()):
            if st.head is not None and now >= st.started + REQUEST_READ_TIMEOUT_S:
                self._forget(sid)
                self._respond_refusal(sid, 408, f"request not received within {REQUEST_READ_TIMEOUT_S:g} s")
        if not self.in_engine and now >= self._last_received + IDLE_TIMEOUT_S:
            self.closed = True
            with contextlib.suppress(h2.exceptions.H2Error):
                self.conn.close_connection()  # GOAWAY(NO_ERROR)
            return [ConnectionEnded(f"idle for {IDLE_TIMEOUT_S:g} s")]
        return []

    def data_to_send(self) -> bytes:
        return bytes(self.conn.data_to_send())
