"""HTTP/2 with prior knowledge (h2c) on the downstream side, through h2. Sans-IO.

A connection whose first bytes are the HTTP/2 preface (`PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n`) is
served by `H2Server`: each stream is one request (bodies buffered, bounded like HTTP/1.1), and
answers go back on their stream, in any order, so requests on one connection are handled
concurrently. Upstream the L7 engine speaks HTTP/1.1 (the demo servers' protocol), translating
`:authority` to Host; trailers are not forwarded (gRPC over a waypoint would need an h2 upstream,
which meshfed does not implement: GRPCRoute matches work, the gRPC status trailer does not).

Flow control: received DATA is acknowledged as it is buffered (bounded by `MAX_BODY_BYTES` per
stream and `MAX_STREAMS` concurrent streams); a response body larger than the peer's window
waits for WINDOW_UPDATE (`pending`). h2 exceptions on one stream reset that stream only (the
ARCHITECTURE note: an `H2Error` on a stale stream must not tear the connection down).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from ztunnel.proxy.l7.http1 import MAX_BODY_BYTES, ProtocolFailure, forwardable
from ztunnel.proxy.l7.routing import Headers, RequestHead

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_STREAMS = 128


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


class H2Server:
    def __init__(self, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        cfg = h2.config.H2Configuration(client_side=False, header_encoding="latin-1", validate_inbound_headers=True)
        self.conn = h2.connection.H2Connection(config=cfg)
        self.conn.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS})
        self.conn.initiate_connection()
        self.max_body_bytes = max_body_bytes
        self._streams: dict[int, _Stream] = {}
        self.pending: dict[int, bytes] = {}   # response bytes waiting for window
        self.closed = False

    def receive(self, data: bytes) -> list[H2Event]:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self.closed = True
            return [ConnectionEnded(f"h2 protocol error: {e}")]
        out: list[H2Event] = []
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                hs = tuple((str(k).lower(), str(v)) for k, v in ev.headers or ())
                pseudo = {k: v for k, v in hs if k.startswith(":")}
                plain = tuple((k, v) for k, v in hs if not k.startswith(":"))
                head = RequestHead(pseudo.get(":method", "GET"), pseudo.get(":path", "/"),
                                   pseudo.get(":authority", "") or dict(plain).get("host", ""), plain)
                self._streams[ev.stream_id] = _Stream(head)
                if ev.stream_ended is not None:
                    out.append(self._finish(ev.stream_id))
            elif isinstance(ev, h2.events.DataReceived):
                st = self._streams.get(ev.stream_id)
                self._ack(ev.stream_id, ev.flow_controlled_length)
                if st is None:
                    continue
                st.size += len(ev.data)
                if st.size > self.max_body_bytes:
                    self._streams.pop(ev.stream_id, None)
                    self.respond(ev.stream_id, 413, (), f"request body over {self.max_body_bytes} bytes".encode())
                    continue
                st.body.append(ev.data)
                if ev.stream_ended is not None:
                    out.append(self._finish(ev.stream_id))
            elif isinstance(ev, h2.events.StreamEnded):
                if ev.stream_id in self._streams and self._streams[ev.stream_id].head is not None:
                    out.append(self._finish(ev.stream_id))
            elif isinstance(ev, h2.events.StreamReset):
                self._streams.pop(ev.stream_id, None)
                self.pending.pop(ev.stream_id, None)
            elif isinstance(ev, h2.events.WindowUpdated):
                self._flush_pending()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.closed = True
                out.append(ConnectionEnded(f"peer sent GOAWAY ({ev.error_code})"))
        return [e for e in out if e is not None]

    def _ack(self, stream_id: int, n: int) -> None:
        try:
            self.conn.acknowledge_received_data(n, stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def _finish(self, stream_id: int) -> StreamRequest:
        st = self._streams.pop(stream_id)
        assert st.head is not None
        return StreamRequest(stream_id, st.head, b"".join(st.body))

    def respond(self, stream_id: int, status: int, headers: Headers, body: bytes) -> None:
        hs = [(":status", str(status)), *forwardable(headers), ("content-length", str(len(body)))]
        try:
            self.conn.send_headers(stream_id, hs, end_stream=not body)
        except h2.exceptions.H2Error:
            return  # the stream is gone (reset by the client): nothing to answer
        if body:
            self.pending[stream_id] = body
            self._flush_pending()

    def _flush_pending(self) -> None:
        for sid in list(self.pending):
            body = self.pending[sid]
            try:
                window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
                while body and window > 0:
                    chunk, body = body[:window], body[window:]
                    self.conn.send_data(sid, chunk, end_stream=not body)
                    window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            except h2.exceptions.H2Error:
                self.pending.pop(sid, None)
                continue
            if body:
                self.pending[sid] = body
            else:
                self.pending.pop(sid, None)

    def data_to_send(self) -> bytes:
        return bytes(self.conn.data_to_send())
