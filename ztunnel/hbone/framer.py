"""HBONE protocol core: HTTP/2 `CONNECT` tunnels, sans-IO.

HBONE is plain HTTP/2 (RFC 9113) restricted to what a tunnel needs: a client opens a stream with
`HEADERS(:method=CONNECT, :authority=<ip:port | hostname:port>)`, the server answers `:status 200`
(or a 4xx/5xx with a reason and END_STREAM), then both sides exchange DATA until each half-closes
(END_STREAM) or one resets the stream (RST_STREAM). This module is the whole protocol engine:
bytes and `now_s` in, bytes, events and a timer deadline out. It never touches a socket or the clock.

Why not the `h2` library on the hot path (measured on the 2-core dev machine, see
benchmarks/dataplane.py `framer` section): h2 calls `repr()` on every received frame and hyperframe
hex-encodes the whole payload for it, so receiving costs O(payload) in pure Python twice over; and
an `H2Error` raised for a frame on a stale stream tears down the whole (pooled) connection unless
every call is guarded. This framer implements only the frames HBONE uses — DATA, HEADERS (+
CONTINUATION on receive) via `hpack`, WINDOW_UPDATE, RST_STREAM, PING, SETTINGS, GOAWAY; PRIORITY
and unknown types are ignored as RFC 9113 requires — and is tested against `h2` as an independent
peer in both roles (tests/unit/dataplane/test_hbone_interop.py).

Design notes:
- Frames are written whole, header and payload in one `bytes`, sized so that a DATA frame plus its
  9-byte header is exactly one 16 KiB TLS record (`DATA_CHUNK_BYTES`).
- Large windows (MiB) for bulk transfer; receive windows are returned only when the application
  calls `acknowledge_received_data` — that is the per-stream back-pressure: a relay acknowledges
  bytes once its downstream socket accepted them, so one slow stream never stalls the connection.
- Outbound bytes beyond the peer's window are buffered per stream and flushed on WINDOW_UPDATE;
  `buffered_bytes(stream_id)` lets an adapter pause its source when a stream's buffer is high.
- Frames for streams that are already closed are dropped (DATA still returns its connection
  window), never a connection error: one stale stream must not take a pooled tunnel down.
- Hardening: a cap on concurrent streams (excess refused with REFUSED_STREAM), a header-list size
  limit, a rapid-reset limit, keep-alive PINGs with a timeout. The rapid-reset limit counts every
  stream reset the peer causes, not only those it sends: its RST_STREAM (CVE-2023-44487) and the
  resets we must send because of its frames (CVE-2025-8671 "MadeYouReset": a WINDOW_UPDATE of 0,
  DATA past the stream window, DATA or a header block on a stream it already half-closed, a
  malformed or excess CONNECT). Either way a stream slot is freed at once, so the concurrency cap alone never stops a
  peer from opening (and making us dial) one backend per CONNECT: more than `rapid_reset_max` in
  `rapid_reset_window_s` → GOAWAY ENHANCE_YOUR_CALM. And a CONNECT that is reset within the read
  that announced it is never announced (`ConnectRequested` dropped): nothing to dial.

Stream states follow RFC 9113 §5.1 reduced to CONNECT (`_TRANSITIONS`): OPEN → HALF_CLOSED_LOCAL /
HALF_CLOSED_REMOTE → CLOSED, and any → CLOSED on reset or rejection.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Final, NamedTuple

import hpack

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types
DATA: Final = 0x0
HEADERS: Final = 0x1
PRIORITY: Final = 0x2
RST_STREAM: Final = 0x3
SETTINGS: Final = 0x4
PUSH_PROMISE: Final = 0x5
PING: Final = 0x6
GOAWAY: Final = 0x7
WINDOW_UPDATE: Final = 0x8
CONTINUATION: Final = 0x9

# flags
FLAG_END_STREAM: Final = 0x1
FLAG_ACK: Final = 0x1
FLAG_END_HEADERS: Final = 0x4
FLAG_PADDED: Final = 0x8
FLAG_PRIORITY: Final = 0x20

# settings ids
S_HEADER_TABLE_SIZE: Final = 0x1
S_ENABLE_PUSH: Final = 0x2
S_MAX_CONCURRENT_STREAMS: Final = 0x3
S_INITIAL_WINDOW_SIZE: Final = 0x4
S_MAX_FRAME_SIZE: Final = 0x5
S_MAX_HEADER_LIST_SIZE: Final = 0x6

DEFAULT_WINDOW_BYTES: Final = 65_535
MAX_WINDOW_BYTES: Final = 2**31 - 1
DEFAULT_MAX_FRAME_BYTES: Final = 16_384
FRAME_HEADER_BYTES: Final = 9
# a DATA frame plus its header fills one 16 KiB TLS record exactly
DATA_CHUNK_BYTES: Final = DEFAULT_MAX_FRAME_BYTES - FRAME_HEADER_BYTES

_HDR = struct.Struct(">BHBBL")  # length (24 bits as B + H), type, flags, stream id
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
_GOAWAY = struct.Struct(">LL")


class ErrorCode(IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class Role(str, Enum):
    CLIENT = "client"
    SERVER = "server"


class StreamState(str, Enum):
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half_closed_local"    # we sent END_STREAM
    HALF_CLOSED_REMOTE = "half_closed_remote"  # the peer sent END_STREAM
    CLOSED = "closed"


# module-level aliases for the per-frame checks (a global lookup instead of a global and an attribute)
_OPEN: Final = StreamState.OPEN
_HALF_CLOSED_REMOTE: Final = StreamState.HALF_CLOSED_REMOTE
_CLOSED: Final = StreamState.CLOSED


class _StreamInput(str, Enum):
    SEND_END = "send_end"
    RECV_END = "recv_end"
    RESET = "reset"        # sent or received RST_STREAM, or a rejecting response


_TRANSITIONS: Final[dict[tuple[StreamState, _StreamInput], StreamState]] = {
    (StreamState.OPEN, _StreamInput.SEND_END): StreamState.HALF_CLOSED_LOCAL,
    (StreamState.OPEN, _StreamInput.RECV_END): StreamState.HALF_CLOSED_REMOTE,
    (StreamState.HALF_CLOSED_LOCAL, _StreamInput.RECV_END): StreamState.CLOSED,
    (StreamState.HALF_CLOSED_REMOTE, _StreamInput.SEND_END): StreamState.CLOSED,
    (StreamState.OPEN, _StreamInput.RESET): StreamState.CLOSED,
    (StreamState.HALF_CLOSED_LOCAL, _StreamInput.RESET): StreamState.CLOSED,
    (StreamState.HALF_CLOSED_REMOTE, _StreamInput.RESET): StreamState.CLOSED,
}


class HboneError(Exception):
    """Misuse of the API (a bug in the caller), e.g. sending on a stream that is not open."""


class StreamLimitReached(HboneError):
    """The peer's SETTINGS_MAX_CONCURRENT_STREAMS is reached: open another connection (pool)."""


class ConnectionClosedError(HboneError):
    """The connection has ended (GOAWAY sent or received); open a new one."""


@dataclass(frozen=True, slots=True)
class HboneSettings:
    """Tunables. Defaults are tuned for bulk transfer over loopback/LAN (measured, see module doc)."""

    stream_window_bytes: int = 4 * 1024 * 1024
    connection_window_bytes: int = 16 * 1024 * 1024
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES       # what we accept
    max_concurrent_streams: int = 100                    # what we accept
    max_header_list_bytes: int = 16 * 1024
    header_table_bytes: int = 4096
    rapid_reset_max: int = 200                           # peer-caused resets allowed per window
    rapid_reset_window_s: float = 1.0
    ping_interval_s: float | None = 30.0                 # keep-alive; None disables
    ping_timeout_s: float = 10.0


# --- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectRequested:
    """Server side: the peer opened a tunnel. Answer with `respond()`."""

    stream_id: int
    authority: str
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    """Client side: the server answered 2xx; the tunnel carries data."""

    stream_id: int
    status: int
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class StreamRejected:
    """Client side: the server answered non-2xx; the stream is closed."""

    stream_id: int
    status: int
    headers: tuple[tuple[str, str], ...]

    @property
    def reason(self) -> str:
        for k, v in self.headers:
            if k == "x-meshfed-reason":
                return v
        return ""


class DataReceived(NamedTuple):
    """Payload for a stream. A named tuple, not a frozen dataclass like the other events: it is made
    for every DATA frame, and a tuple is built in C where a frozen dataclass's `__init__` sets each
    field through `object.__setattr__` (measured: a quarter of the framer's receive path)."""

    stream_id: int
    data: bytes
    flow_controlled_bytes: int  # pass to acknowledge_received_data once consumed


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed (END_STREAM)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    stream_id: int
    error_code: int
    remote: bool  # True: the peer sent RST_STREAM; False: refused locally (GOAWAY, limits)


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """Buffered outbound data of a stream was flushed; an adapter may resume its source."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PingAcked:
    rtt_s: float


@dataclass(frozen=True, slots=True)
class SettingsReceived:
    settings: dict[int, int]


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    error_code: int
    last_stream_id: int
    reason: str
    remote: bool


Event = (ConnectRequested | StreamAccepted | StreamRejected | DataReceived | StreamEnded | StreamReset
         | WindowOpened | PingAcked | SettingsReceived | ConnectionTerminated)


# --- connection --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Stream:
    stream_id: int
    state: StreamState = StreamState.OPEN
    send_window: int = DEFAULT_WINDOW_BYTES
    recv_window: int = DEFAULT_WINDOW_BYTES
    recv_unacked: int = 0
    pending: bytearray = field(default_factory=bytearray)
    pending_end: bool = False       # END_STREAM queued behind pending data
    responded: bool = False         # server: response sent; client: response received
    blocked: bool = False           # pending data waited for a window

    def move(self, event: _StreamInput) -> StreamState:
        new = _TRANSITIONS.get((self.state, event))
        if new is None:
            raise HboneError(f"stream {self.stream_id}: {event.value} not allowed in state {self.state.value}")
        self.state = new
        return new


class _ConnectionError(Exception):
    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


_CLOSED_MEMORY = 1024  # how many recently closed stream ids we remember, to drop stale frames quietly


class HboneConnection:
    """One HTTP/2 connection carrying HBONE tunnels; sans-IO.

    Usage: `initiate(now_s)`, then feed bytes with `receive_data(data, now_s)` (returns events), send
    what `data_to_send()` returns, call `handle_timer(now_s)` at `next_timer_s()`.

    Invariants: `_out` only ever holds whole frames (a DATA frame may be two consecutive entries,
    header then a memoryview of immutable payload, joined by `data_to_send`); a stream id is in `_streams` iff it is not
    CLOSED; `_conn_send_window` and every stream's `send_window` never go negative by our sending.
    """

    def __init__(self, role: Role, settings: HboneSettings | None = None) -> None:
        self.role = role
        self.settings = settings or HboneSettings()
        # a window is returned once half of it was consumed (per read, asked for every DATA frame)
        self._conn_ack_at = self.settings.connection_window_bytes // 2
        self._stream_ack_at = self.settings.stream_window_bytes // 2
        self._out: list[bytes | memoryview] = []
        self._in = bytearray()
        self._preface_pending = role is Role.SERVER
        self._streams: dict[int, _Stream] = {}
        self._recently_closed: dict[int, None] = {}
        self._next_stream_id = 1 if role is Role.CLIENT else 2
        self._highest_peer_stream = 0
        self._encoder = hpack.Encoder()
        self._decoder = hpack.Decoder(max_header_list_size=self.settings.max_header_list_bytes)
        self._decoder.max_allowed_table_size = self.settings.header_table_bytes
        # peer's settings (RFC defaults until its SETTINGS arrives)
        self._peer_initial_window = DEFAULT_WINDOW_BYTES
        self._peer_max_frame = DEFAULT_MAX_FRAME_BYTES
        self._peer_max_streams: int | None = None
        self._conn_send_window = DEFAULT_WINDOW_BYTES
        self._conn_recv_window = DEFAULT_WINDOW_BYTES
        self._conn_recv_unacked = 0
        self._our_settings_acked = False
        self._headers_in_progress: tuple[int, int, bytearray] | None = None  # stream, flags, block
        self._reset_times: list[float] = []
        self._last_activity_s = 0.0
        self._ping_sent_s: float | None = None
        self._ping_payload = b"\x00" * 8
        self._ping_counter = 0
        self._goaway_sent = False
        self._goaway_received = False
        self.closed = False
        self.terminated: ConnectionTerminated | None = None
        # ids of streams closed since the adapter last looked (it forgets its per-stream objects)
        self.closed_stream_ids: list[int] = []
        self._borrowed = False  # while parsing: DATA events may hold views into the read (see receive_data)
        self._announced_in_batch = False  # a ConnectRequested was produced by the read being parsed

    # --- public API ----------------------------------------------------------------------------

    def initiate(self, now_s: float) -> None:
        """Queue the connection preface (client), our SETTINGS and the connection window increase."""
        self._last_activity_s = now_s
        if self.role is Role.CLIENT:
            self._out.append(PREFACE)
        s = self.settings
        body = b"".join(_SETTING.pack(k, v) for k, v in (
            (S_ENABLE_PUSH, 0),
            (S_MAX_CONCURRENT_STREAMS, s.max_concurrent_streams),
            (S_INITIAL_WINDOW_SIZE, s.stream_window_bytes),
            (S_MAX_FRAME_SIZE, s.max_frame_bytes),
            (S_MAX_HEADER_LIST_SIZE, s.max_header_list_bytes),
        ))
        self._frame(SETTINGS, 0, 0, body)
        increase = s.connection_window_bytes - DEFAULT_WINDOW_BYTES
        if increase > 0:
            self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(increase))
            self._conn_recv_window += increase

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        out = b"".join(self._out) if len(self._out) > 1 else bytes(self._out[0])
        self._out.clear()
        return out

    @property
    def goaway_sent(self) -> bool:
        return self._goaway_sent

    @property
    def open_stream_count(self) -> int:
        return len(self._streams)

    @property
    def accepting_streams(self) -> bool:
        """Client: can `open_stream` succeed now (not closing, under the peer's stream cap)?"""
        if self.closed or self._goaway_received or self._goaway_sent:
            return False
        limit = self._peer_max_streams
        return limit is None or len(self._streams) < limit

    def stream_state(self, stream_id: int) -> StreamState:
        """CLOSED for a stream that ended, was reset or refused — or whose connection ended."""
        st = self._streams.get(stream_id)
        return st.state if st is not None and not self.closed else StreamState.CLOSED

    def buffered_bytes(self, stream_id: int) -> int:
        st = self._streams.get(stream_id)
        return len(st.pending) if st is not None else 0

    def open_stream(self, authority: str, headers: Sequence[tuple[str, str]] = ()) -> int:
        """Client: send CONNECT for `authority`; returns the stream id. Await StreamAccepted/Rejected."""
        if self.role is not Role.CLIENT:
            raise HboneError("only the client side opens tunnels")
        if self.closed or self._goaway_received or self._goaway_sent:
            raise ConnectionClosedError("connection is closing; open a new one")
        if not self.accepting_streams:
            raise StreamLimitReached(f"peer allows {self._peer_max_streams} concurrent streams")
        sid = self._next_stream_id
        self._next_stream_id += 2
        st = _Stream(sid, send_window=self._peer_initial_window, recv_window=self.settings.stream_window_bytes)
        self._streams[sid] = st
        block = [(":method", "CONNECT"), (":authority", authority), *headers]
        self._send_headers(sid, block, end_stream=False)
        return sid

    def respond(self, stream_id: int, status: int, headers: Sequence[tuple[str, str]] = ()) -> None:
        """Server: answer a ConnectRequested. Non-2xx closes the stream (END_STREAM)."""
        st = self._streams.get(stream_id)
        if st is None or st.responded:
            raise HboneError(f"stream {stream_id} is not awaiting a response")
        st.responded = True
        ok = 200 <= status < 300
        block = [(":status", str(status)), *headers]
        self._send_headers(stream_id, block, end_stream=not ok)
        if not ok:
            self._close_stream(st)

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview, end_stream: bool = False) -> int:
        """Queue data (and optionally END_STREAM); sends as much as the windows allow now. Returns the
        bytes the stream still holds for want of window (`buffered_bytes`): a source pauses above its mark."""
        st = self._streams.get(stream_id)
        if st is None or not (st.state is _OPEN or st.state is _HALF_CLOSED_REMOTE) or st.pending_end:
            raise HboneError(f"stream {stream_id} cannot send (state {self.stream_state(stream_id).value})")
        if data and not st.pending and type(data) is bytes:
            data = self._send_direct(st, data)
        if data:
            st.pending += data
        if end_stream:
            st.pending_end = True
        self._flush_stream(st)
        return len(st.pending)

    def _send_direct(self, st: _Stream, data: bytes) -> memoryview | bytes:
        """Fast path while nothing is queued: frame straight out of the caller's (immutable) bytes,
        header and payload as two `_out` entries joined once by `data_to_send`: one copy fewer than
        going through the stream buffer. Returns what the windows did not allow (to be queued)."""
        chunk_limit = min(self._peer_max_frame, DATA_CHUNK_BYTES)
        end = len(data)
        if end <= chunk_limit and end <= st.send_window and end <= self._conn_send_window:
            # one frame (a request, a response): header and payload in one `bytes`, no view
            self._out.append(_HDR.pack(end >> 16, end & 0xFFFF, DATA, 0, st.stream_id) + data)
            st.send_window -= end
            self._conn_send_window -= end
            return b""
        mv = memoryview(data)
        out = self._out
        pack = _HDR.pack
        sid = st.stream_id
        pos = 0
        while pos < end:
            allowed = min(end - pos, st.send_window, self._conn_send_window, chunk_limit)
            if allowed <= 0:
                break
            out.append(pack(allowed >> 16, allowed & 0xFFFF, DATA, 0, sid))
            out.append(mv[pos:pos + allowed])  # joined by data_to_send
            pos += allowed
            st.send_window -= allowed
            self._conn_send_window -= allowed
        return mv[pos:] if pos else data

    def end_stream(self, stream_id: int) -> None:
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        st = self._streams.get(stream_id)
        if st is None:
            return  # already closed: nothing to reset, and never an error
        self._frame(RST_STREAM, 0, stream_id, _U32.pack(int(error_code)))
        self._close_stream(st)

    def acknowledge_received_data(self, stream_id: int, n_bytes: int) -> None:
        """Return `n_bytes` of receive window (the application consumed them)."""
        if n_bytes <= 0 or self.closed:
            return
        self._conn_recv_unacked += n_bytes
        if self._conn_recv_unacked >= self._conn_ack_at:
            self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._conn_recv_unacked))
            self._conn_recv_window += self._conn_recv_unacked
            self._conn_recv_unacked = 0
        st = self._streams.get(stream_id)
        if st is None or st.state is _HALF_CLOSED_REMOTE or st.state is _CLOSED:
            return
        st.recv_unacked += n_bytes
        if st.recv_unacked >= self._stream_ack_at:
            self._frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(st.recv_unacked))
            st.recv_window += st.recv_unacked
            st.recv_unacked = 0

    def ping(self, now_s: float) -> None:
        if self._ping_sent_s is not None or self.closed:
            return
        self._ping_counter += 1
        self._ping_payload = self._ping_counter.to_bytes(8, "big")
        self._ping_sent_s = now_s
        self._frame(PING, 0, 0, self._ping_payload)

    def close(self, error_code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Send GOAWAY. With NO_ERROR, open streams may finish (graceful); otherwise the connection ends."""
        if self._goaway_sent or self.closed:
            return
        self._goaway_sent = True
        self._frame(GOAWAY, 0, 0, _GOAWAY.pack(self._highest_peer_stream, int(error_code)) + reason.encode()[:256])
        if error_code != ErrorCode.NO_ERROR:
            self._terminate(error_code, reason, remote=False)

    def next_timer_s(self) -> float | None:
        if self.closed:
            return None
        if self._ping_sent_s is not None:
            return self._ping_sent_s + self.settings.ping_timeout_s
        if self.settings.ping_interval_s is None:
            return None
        return self._last_activity_s + self.settings.ping_interval_s

    def handle_timer(self, now_s: float) -> list[Event]:
        if self.closed:
            return []
        if self._ping_sent_s is not None:
            if now_s >= self._ping_sent_s + self.settings.ping_timeout_s:
                reason = f"keep-alive ping unanswered for {self.settings.ping_timeout_s:g}s; peer or path is dead"
                self.close(ErrorCode.NO_ERROR, reason)
                return [self._terminate(ErrorCode.NO_ERROR, reason, remote=False)]
            return []
        interval = self.settings.ping_interval_s
        if interval is not None and now_s >= self._last_activity_s + interval:
            self.ping(now_s)
        return []

    def receive_data(self, data: bytes | bytearray | memoryview, now_s: float) -> list[Event]:
        """Feed bytes from the peer; returns the events they produced, in order."""
        if self.closed:
            return []
        self._last_activity_s = now_s
        events: list[Event] = []
        if (not self._in and type(data) is bytes and len(data) >= FRAME_HEADER_BYTES and data[3] == DATA
                and self._headers_in_progress is None and not self._preface_pending):
            hi, lo, _, flags, sid = _HDR.unpack_from(data)
            length = (hi << 16) | lo
            if length + FRAME_HEADER_BYTES == len(data) and length <= self.settings.max_frame_bytes:
                # most reads of a request/response exchange: exactly one DATA frame. Its payload is
                # sliced out once (owned `bytes`), and nothing is parsed, buffered or joined.
                self._borrowed = False
                try:
                    self._on_data(data[FRAME_HEADER_BYTES:], flags, sid & 0x7FFFFFFF, events, now_s)
                except _ConnectionError as e:
                    return self._fail_read(e, events)
                return events
        if self._in:
            self._in += data
            buf: bytes | bytearray | memoryview = self._in
        else:
            buf = data
        # DATA payloads may stay views into `buf` only if nothing will mutate it: an immutable read
        self._borrowed = type(buf) is bytes
        try:
            consumed = self._parse(buf, events, now_s)
        except _ConnectionError as e:
            return self._fail_read(e, events)
        if buf is self._in:
            del self._in[:consumed]
        elif consumed < len(buf):
            self._in += memoryview(buf)[consumed:]
        if self._announced_in_batch:
            events = self._unannounce_cancelled(events)
        if self._borrowed or len(events) > 1:
            events = _own_data(events)
        return events

    def _fail_read(self, e: _ConnectionError, events: list[Event]) -> list[Event]:
        """The peer broke the protocol: GOAWAY with the error; the events before it still count,
        except tunnels announced in this read (nothing to dial for a connection that ends)."""
        self.close(e.code, e.reason)
        events.append(self._terminate(e.code, e.reason, remote=False))
        # a new buffer, not `clear()`: the parser's view of the old one lives on in the exception's
        # traceback, and a bytearray with views cannot be resized (BufferError instead of a GOAWAY)
        self._in = bytearray()
        events = self._unannounce_cancelled(events)
        return _own_data(events) if self._borrowed else events

    def _unannounce_cancelled(self, events: list[Event]) -> list[Event]:
        """Drop the `ConnectRequested` of streams that did not survive the read that opened them
        (reset, or the whole connection ended): the application must not dial for them."""
        self._announced_in_batch = False
        if self.closed:
            return [e for e in events if type(e) is not ConnectRequested]
        streams = self._streams
        return [e for e in events if type(e) is not ConnectRequested or e.stream_id in streams]  # type: ignore[union-attr]

    # --- internals: sending ----------------------------------------------------------------------

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes = b"") -> None:
        n = len(payload)
        self._out.append(_HDR.pack(n >> 16, n & 0xFFFF, ftype, flags, sid) + payload)

    def _send_headers(self, sid: int, block: Sequence[tuple[str, str]], end_stream: bool) -> None:
        encoded = self._encoder.encode(block)
        limit = self._peer_max_frame
        first, rest = encoded[:limit], encoded[limit:]
        flags = FLAG_END_STREAM if end_stream else 0
        if not rest:
            self._frame(HEADERS, flags | FLAG_END_HEADERS, sid, first)
            return
        self._frame(HEADERS, flags, sid, first)
        while rest:
            chunk, rest = rest[:limit], rest[limit:]
            self._frame(CONTINUATION, 0 if rest else FLAG_END_HEADERS, sid, chunk)

    def _flush_stream(self, st: _Stream) -> bool:
        """Send what the windows allow; returns True when the stream's buffer became empty."""
        pending = st.pending
        chunk_limit = min(self._peer_max_frame, DATA_CHUNK_BYTES)
        out = self._out
        pack = _HDR.pack
        sid = st.stream_id
        while pending:
            allowed = min(len(pending), st.send_window, self._conn_send_window, chunk_limit)
            if allowed <= 0:
                st.blocked = True
                return False
            last = allowed == len(pending) and st.pending_end
            out.append(pack(allowed >> 16, allowed & 0xFFFF, DATA, FLAG_END_STREAM if last else 0, sid)
                       + pending[:allowed])
            del pending[:allowed]
            st.send_window -= allowed
            self._conn_send_window -= allowed
            if last:
                st.pending_end = False
                if st.move(_StreamInput.SEND_END) is StreamState.CLOSED:
                    self._close_stream(st)
                return True
        if st.pending_end:
            st.pending_end = False
            self._frame(DATA, FLAG_END_STREAM, sid)
            if st.move(_StreamInput.SEND_END) is StreamState.CLOSED:
                self._close_stream(st)
        return True

    def _flush_blocked(self, events: list[Event]) -> None:
        for st in list(self._streams.values()):
            if st.blocked and self._conn_send_window > 0 and self._flush_stream(st):
                st.blocked = False
                events.append(WindowOpened(st.stream_id))

    def _close_stream(self, st: _Stream) -> None:
        st.state = StreamState.CLOSED
        if self._streams.pop(st.stream_id, None) is not None:
            self.closed_stream_ids.append(st.stream_id)
        self._recently_closed[st.stream_id] = None
        if len(self._recently_closed) > _CLOSED_MEMORY:
            del self._recently_closed[next(iter(self._recently_closed))]

    def _count_reset(self, now_s: float, cause: str) -> None:
        """A stream reset the peer caused (its RST_STREAM, or ours in answer to its frames): over
        the limit in the window, the connection ends (server side: the side that dials for the peer)."""
        if self.role is not Role.SERVER:
            return
        times = self._reset_times
        times.append(now_s)
        horizon = now_s - self.settings.rapid_reset_window_s
        drop = 0
        while drop < len(times) and times[drop] < horizon:
            drop += 1
        if drop:
            del times[:drop]
        if len(times) > self.settings.rapid_reset_max:
            raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM,
                                   f"more than {self.settings.rapid_reset_max} stream resets in "
                                   f"{self.settings.rapid_reset_window_s:g}s (rapid reset; last: {cause})")

    def _terminate(self, code: int, reason: str, remote: bool) -> ConnectionTerminated:
        if self.terminated is None:
            self.terminated = ConnectionTerminated(int(code), self._highest_peer_stream, reason, remote)
        self.closed = True
        return self.terminated

    # --- internals: receiving --------------------------------------------------------------------

    def _parse(self, buf: bytes | bytearray | memoryview, events: list[Event], now_s: float) -> int:
        mv = memoryview(buf)
        pos = 0
        end = len(mv)
        if self._preface_pending:
            if end < len(PREFACE):
                if bytes(mv[:end]) != PREFACE[:end]:
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "not an HTTP/2 client preface; is the peer speaking HBONE?")
                return 0
            if bytes(mv[:len(PREFACE)]) != PREFACE:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "not an HTTP/2 client preface; is the peer speaking HBONE?")
            pos = len(PREFACE)
            self._preface_pending = False
        max_frame = self.settings.max_frame_bytes
        unpack = _HDR.unpack_from
        while end - pos >= FRAME_HEADER_BYTES and not self.closed:
            hi, lo, ftype, flags, sid = unpack(mv, pos)
            length = (hi << 16) | lo
            sid &= 0x7FFFFFFF
            if length > max_frame:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds our max {max_frame}")
            if end - pos - FRAME_HEADER_BYTES < length:
                break
            start = pos + FRAME_HEADER_BYTES
            pos = start + length
            if self._headers_in_progress is not None and ftype != CONTINUATION:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "header block interrupted by another frame")
            if ftype == DATA:
                self._on_data(mv[start:pos], flags, sid, events, now_s)
            elif ftype == HEADERS:
                self._on_headers(mv[start:pos], flags, sid, events, now_s)
            elif ftype == CONTINUATION:
                self._on_continuation(mv[start:pos], flags, sid, events, now_s)
            elif ftype == WINDOW_UPDATE:
                self._on_window_update(mv[start:pos], sid, events, now_s)
            elif ftype == RST_STREAM:
                self._on_rst(mv[start:pos], sid, events, now_s)
            elif ftype == SETTINGS:
                self._on_settings(mv[start:pos], flags, sid, events)
            elif ftype == PING:
                self._on_ping(mv[start:pos], flags, sid, events, now_s)
            elif ftype == GOAWAY:
                self._on_goaway(mv[start:pos], sid, events)
            elif ftype == PUSH_PROMISE:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE received but push is disabled")
            # PRIORITY and unknown frame types are ignored (RFC 9113 §5.5)
        return pos

    def _on_data(self, payload: bytes | memoryview, flags: int, sid: int, events: list[Event], now_s: float) -> None:
        if sid == 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        flow = len(payload)
        if flags & FLAG_PADDED:
            if not payload:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "padded DATA without pad length")
            pad = payload[0]
            if pad >= flow:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "DATA padding exceeds payload")
            payload = payload[1:flow - pad]
        self._conn_recv_window -= flow
        if self._conn_recv_window < 0:
            raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "peer overran the connection window")
        st = self._streams.get(sid)
        if st is None or st.state is _HALF_CLOSED_REMOTE or st.state is _CLOSED:
            # stale or unknown stream: return the connection window, reset quietly if never seen
            self.acknowledge_received_data(sid, flow)
            if st is not None:
                self.reset_stream(sid, ErrorCode.STREAM_CLOSED)
                events.append(StreamReset(sid, ErrorCode.STREAM_CLOSED, remote=False))
                self._count_reset(now_s, "DATA on a stream the peer had half-closed")
            elif sid not in self._recently_closed:
                self._frame(RST_STREAM, 0, sid, _U32.pack(ErrorCode.STREAM_CLOSED))
                self._count_reset(now_s, "DATA on a stream that was never opened")
            return
        st.recv_window -= flow
        if st.recv_window < 0:
            self.reset_stream(sid, ErrorCode.FLOW_CONTROL_ERROR)
            self.acknowledge_received_data(sid, flow)  # dropped: the connection window comes back
            events.append(StreamReset(sid, ErrorCode.FLOW_CONTROL_ERROR, remote=False))
            self._count_reset(now_s, "DATA past the stream window")
            return
        if payload or flow:
            # a view into the caller's immutable read when possible; `_own_data` copies each run once
            events.append(DataReceived(sid, payload if self._borrowed else bytes(payload), flow))  # type: ignore[arg-type]
        if flags & FLAG_END_STREAM:
            self._recv_end(st, events)

    def _recv_end(self, st: _Stream, events: list[Event]) -> None:
        events.append(StreamEnded(st.stream_id))
        if st.move(_StreamInput.RECV_END) is StreamState.CLOSED:
            self._close_stream(st)

    def _on_headers(self, payload: memoryview, flags: int, sid: int, events: list[Event], now_s: float) -> None:
        if sid == 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        body = payload
        if flags & FLAG_PADDED:
            if not body:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "padded HEADERS without pad length")
            pad = body[0]
            body = body[1:]
            if pad > len(body):
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "HEADERS padding exceeds payload")
            body = body[:len(body) - pad]
        if flags & FLAG_PRIORITY:
            body = body[5:]
        if flags & FLAG_END_HEADERS:
            self._on_header_block(sid, flags, bytes(body), events, now_s)
        else:
            self._headers_in_progress = (sid, flags, bytearray(body))

    def _on_continuation(self, payload: memoryview, flags: int, sid: int, events: list[Event],
                         now_s: float) -> None:
        hip = self._headers_in_progress
        if hip is None or hip[0] != sid:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "unexpected CONTINUATION")
        hip[2].extend(payload)
        if len(hip[2]) > self.settings.max_header_list_bytes:
            raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM,
                                   f"header block over {self.settings.max_header_list_bytes} bytes")
        if flags & FLAG_END_HEADERS:
            self._headers_in_progress = None
            self._on_header_block(sid, hip[1], bytes(hip[2]), events, now_s)

    def _decode(self, block: bytes) -> list[tuple[str, str]]:
        try:
            return [(k if isinstance(k, str) else k.decode(), v if isinstance(v, str) else v.decode())
                    for k, v in self._decoder.decode(block, raw=False)]
        except hpack.OversizedHeaderListError as e:
            raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM,
                                   f"header list over {self.settings.max_header_list_bytes} bytes") from e
        except (hpack.HPACKError, UnicodeDecodeError) as e:
            raise _ConnectionError(ErrorCode.COMPRESSION_ERROR, f"bad header block: {e}") from e

    def _on_header_block(self, sid: int, flags: int, block: bytes, events: list[Event], now_s: float) -> None:
        headers = self._decode(block)  # always decode: the HPACK state is connection-wide
        end_stream = bool(flags & FLAG_END_STREAM)
        st = self._streams.get(sid)
        if st is not None and st.state is _HALF_CLOSED_REMOTE:
            # the peer already ended this stream: a header block now (trailers after END_STREAM)
            # is a stream error STREAM_CLOSED (RFC 9113 §5.1), answered as DATA there is
            self.reset_stream(sid, ErrorCode.STREAM_CLOSED)
            events.append(StreamReset(sid, ErrorCode.STREAM_CLOSED, remote=False))
            self._count_reset(now_s, "HEADERS on a stream the peer had half-closed")
            return
        if self.role is Role.SERVER:
            if st is not None:  # trailers
                if end_stream:
                    self._recv_end(st, events)
                return
            if sid % 2 == 0 or sid <= self._highest_peer_stream:
                if sid in self._recently_closed:
                    return
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"stream id {sid} is not a new client stream")
            self._highest_peer_stream = sid
            if self._goaway_sent:
                self._frame(RST_STREAM, 0, sid, _U32.pack(ErrorCode.REFUSED_STREAM))
                return
            if len(self._streams) >= self.settings.max_concurrent_streams:
                self._frame(RST_STREAM, 0, sid, _U32.pack(ErrorCode.REFUSED_STREAM))
                self._recently_closed[sid] = None
                events.append(StreamReset(sid, ErrorCode.REFUSED_STREAM, remote=False))
                self._count_reset(now_s, "CONNECT over the concurrent-stream limit")
                return
            pseudo = {k: v for k, v in headers if k.startswith(":")}
            problem = None
            if pseudo.get(":method") != "CONNECT":
                problem = f"method {pseudo.get(':method')!r} is not CONNECT"
            elif not pseudo.get(":authority"):
                problem = "CONNECT without :authority"
            elif ":scheme" in pseudo or ":path" in pseudo or end_stream:
                problem = "CONNECT must not carry :scheme/:path or END_STREAM"
            if problem is not None:
                self._frame(RST_STREAM, 0, sid, _U32.pack(ErrorCode.PROTOCOL_ERROR))
                self._recently_closed[sid] = None
                events.append(StreamReset(sid, ErrorCode.PROTOCOL_ERROR, remote=False))
                self._count_reset(now_s, problem)
                return
            st = _Stream(sid, send_window=self._peer_initial_window, recv_window=self.settings.stream_window_bytes)
            self._streams[sid] = st
            regular = tuple((k, v) for k, v in headers if not k.startswith(":"))
            events.append(ConnectRequested(sid, pseudo[":authority"], regular))
            self._announced_in_batch = True
            return
        # client: a response (or trailers) on our stream
        if st is None:
            return  # stale stream: drop
        if not st.responded:
            status_text = dict(headers).get(":status", "")
            try:
                status = int(status_text)
            except ValueError:
                self.reset_stream(sid, ErrorCode.PROTOCOL_ERROR)
                events.append(StreamReset(sid, ErrorCode.PROTOCOL_ERROR, remote=False))
                return
            if 100 <= status < 200:
                return  # informational: wait for the final response
            st.responded = True
            regular = tuple((k, v) for k, v in headers if not k.startswith(":"))
            if 200 <= status < 300:
                events.append(StreamAccepted(sid, status, regular))
            else:
                events.append(StreamRejected(sid, status, regular))
                if not end_stream:
                    self._frame(RST_STREAM, 0, sid, _U32.pack(ErrorCode.CANCEL))
                self._close_stream(st)
                return
        if end_stream:
            self._recv_end(st, events)

    def _on_window_update(self, payload: memoryview, sid: int, events: list[Event], now_s: float) -> None:
        if len(payload) != 4:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE must be 4 bytes")
        inc = _U32.unpack_from(payload)[0] & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "zero connection WINDOW_UPDATE")
            self._conn_send_window += inc
            if self._conn_send_window > MAX_WINDOW_BYTES:
                raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "connection window overflow")
            self._flush_blocked(events)
            return
        st = self._streams.get(sid)
        if st is None:
            return
        st.send_window += inc
        if inc == 0 or st.send_window > MAX_WINDOW_BYTES:
            self.reset_stream(sid, ErrorCode.FLOW_CONTROL_ERROR)
            events.append(StreamReset(sid, ErrorCode.FLOW_CONTROL_ERROR, remote=False))
            self._count_reset(now_s, "WINDOW_UPDATE of 0" if inc == 0 else "stream window overflow")
            return
        if st.blocked and self._flush_stream(st):
            st.blocked = False
            events.append(WindowOpened(sid))

    def _on_rst(self, payload: memoryview, sid: int, events: list[Event], now_s: float) -> None:
        if sid == 0 or len(payload) != 4:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "malformed RST_STREAM")
        code = _U32.unpack_from(payload)[0]
        self._count_reset(now_s, "RST_STREAM from the peer")
        st = self._streams.get(sid)
        if st is None:
            return
        st.move(_StreamInput.RESET)
        self._close_stream(st)
        events.append(StreamReset(sid, code, remote=True))

    def _on_settings(self, payload: memoryview, flags: int, sid: int, events: list[Event]) -> None:
        if sid != 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & FLAG_ACK:
            self._our_settings_acked = True
            return
        if len(payload) % 6:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        changed: dict[int, int] = {}
        for off in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, off)
            changed[key] = value
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW_BYTES:
                    raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for st in self._streams.values():
                    st.send_window += delta
            elif key == S_MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME_BYTES <= value <= 2**24 - 1:
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"invalid SETTINGS_MAX_FRAME_SIZE {value}")
                self._peer_max_frame = value
            elif key == S_MAX_CONCURRENT_STREAMS:
                self._peer_max_streams = value
            elif key == S_HEADER_TABLE_SIZE:
                self._encoder.header_table_size = min(value, self.settings.header_table_bytes)
        self._frame(SETTINGS, FLAG_ACK, 0)
        events.append(SettingsReceived(changed))
        self._flush_blocked(events)

    def _on_ping(self, payload: memoryview, flags: int, sid: int, events: list[Event], now_s: float) -> None:
        if sid != 0 or len(payload) != 8:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "malformed PING")
        if flags & FLAG_ACK:
            if self._ping_sent_s is not None and bytes(payload) == self._ping_payload:
                events.append(PingAcked(now_s - self._ping_sent_s))
                self._ping_sent_s = None
            return
        self._frame(PING, FLAG_ACK, 0, bytes(payload))

    def _on_goaway(self, payload: memoryview, sid: int, events: list[Event]) -> None:
        if sid != 0 or len(payload) < 8:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "malformed GOAWAY")
        last_sid, code = _GOAWAY.unpack_from(payload)
        last_sid &= 0x7FFFFFFF
        reason = bytes(payload[8:]).decode("utf-8", "replace")
        self._goaway_received = True
        for st in [s for s in self._streams.values() if s.stream_id > last_sid and s.stream_id % 2 == (
                1 if self.role is Role.CLIENT else 0)]:
            self._close_stream(st)
            events.append(StreamReset(st.stream_id, ErrorCode.REFUSED_STREAM, remote=False))
        if code != ErrorCode.NO_ERROR:
            for st in list(self._streams.values()):
                self._close_stream(st)
                events.append(StreamReset(st.stream_id, code, remote=True))
            events.append(self._terminate(code, reason, remote=True))
        else:
            self.terminated = ConnectionTerminated(code, last_sid, reason, remote=True)
            events.append(self.terminated)


def _own_data(events: list[Event]) -> list[Event]:
    """Consecutive DATA of one stream become one DataReceived: a relay then writes 256 KiB to its
    socket in one call instead of sixteen 16 KiB ones (measured: the receiving side of a bulk
    transfer spent ~40% of its time in per-frame socket writes). Payloads that are still views into
    the read buffer are copied here, once per run (the join), so every event owns `bytes`."""
    if len(events) <= 1:   # most reads: one frame (a request, a response, a window update)
        only = events[0] if events else None
        if type(only) is DataReceived and type(only.data) is not bytes:
            return [DataReceived(only.stream_id, bytes(only.data), only.flow_controlled_bytes)]
        return events
    out: list[Event] = []
    run: list[DataReceived] = []

    def close_run() -> None:
        if len(run) == 1:
            ev = run[0]
            out.append(ev if type(ev.data) is bytes else DataReceived(ev.stream_id, bytes(ev.data),
                                                                          ev.flow_controlled_bytes))
        elif run:
            out.append(DataReceived(run[0].stream_id, b"".join(e.data for e in run),
                                    sum(e.flow_controlled_bytes for e in run)))
        run.clear()

    for ev in events:
        if type(ev) is DataReceived:
            if run and run[0].stream_id != ev.stream_id:
                close_run()
            run.append(ev)
        else:
            close_run()
            out.append(ev)
    close_run()
    return out


def frames_of(data: bytes) -> Iterable[tuple[int, int, int, bytes]]:
    """Split raw frames (no preface) into (type, flags, stream id, payload); a helper for tests/tools."""
    pos = 0
    while len(data) - pos >= FRAME_HEADER_BYTES:
        hi, lo, ftype, flags, sid = _HDR.unpack_from(data, pos)
        length = (hi << 16) | lo
        start = pos + FRAME_HEADER_BYTES
        yield ftype, flags, sid & 0x7FFFFFFF, data[start:start + length]
        pos = start + length
