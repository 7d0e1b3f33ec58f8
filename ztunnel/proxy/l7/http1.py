"""HTTP/1.1 for the L7 proxies, both sides. Sans-IO: bytes in, events and bytes out.

Parsing is llhttp's (Node.js's parser) through `httptools`: strict RFC 9112 message framing
(request smuggling through conflicting Content-Length / Transfer-Encoding is refused), chunked
bodies, keep-alive. We first used h11; on the 2-core machine it cost ~300 µs per message each way
against ~2 µs for llhttp, and the waypoint parses four messages per request (`benchmarks.waypoint`).
Serialising is ours and trivial: a status or request line, the headers, `content-length`, the body;
a header value with CR, LF or NUL is never written (response splitting), a name must be an RFC 9110
token.

`Http1Server` reads requests from a downstream connection (a tunnel from a node ztunnel at a
waypoint, a TCP connection at an ingress gateway) and writes responses; `Http1Client` writes
requests to an upstream connection (a tunnel to the destination's node) and reads responses.
Bodies are buffered whole, bounded (`MAX_BODY_BYTES`; beyond it the request gets 413, the
response 502): a retry must be able to send the request again, and the retry decision is taken on
the response's status before anything reaches the client. Every other thing a peer can make the
server hold is bounded too, with the protocol's answer and a reason for the log: the head
(`MAX_HEAD_BYTES`, `MAX_HEADERS`: 431), pipelined requests (parsed one ahead at most, the rest kept
as a bounded backlog with back-pressure: `Http1Server`), and the time a request may take to arrive
or a connection may sit idle (408; close). Why each value: next to its constant.

Proxying rules (RFC 9110 §7.6.1): hop-by-hop headers (`connection` and the headers it names,
`keep-alive`, `proxy-connection`, `te`, `trailer`, `transfer-encoding`, `upgrade`) are not
forwarded, nor `expect` (the body is already buffered); `content-length` is recomputed; a request
that asks to upgrade (WebSocket) is refused with 501, since the waypoint routes request by request.

Invariants: responses are written in request order, one at a time (the server hands out the next
pipelined request only after the previous one was answered); a client's connection is `reusable`
only when its last exchange ended cleanly and neither side asked to close.
"""

from __future__ import annotations

import functools
import re
from collections import deque
from dataclasses import dataclass
from enum import Enum
from http import HTTPStatus

import httptools

from ztunnel.proxy.l7.routing import Headers, RequestHead

# --- bounds: what one peer can make this proxy hold, and for how long ----------------------------
# Bodies are buffered whole (a retry must resend them; the status decides before anything reaches
# the client): 8 MiB covers the APIs and model prompts the mesh carries; larger uploads want L4.
MAX_BODY_BYTES = 8 * 1024 * 1024
# Envoy's defaults (`max_request_headers_kb: 60`, `max_headers_count: 100`): what clients already
# live within behind Istio, and a cap on the per-header tuples a flood of `a:\r\n` would create.
MAX_HEAD_BYTES = 60 * 1024
MAX_HEADERS = 100
# Pipelining: requests parsed ahead of the one at the engine. With the backlog below they hold at
# most its bytes; the count caps the per-request objects a flood of tiny requests would make.
MAX_PIPELINED = 32
# Bytes received behind a request in progress are kept unparsed; past the pause mark the adapter
# stops reading the socket / withholds the HBONE window (back-pressure), so a client that obeys
# flow control stays under the hard cap: 8 MiB is above the 4 MiB HBONE stream window plus one
# socket read. Beyond it the peer ignored flow control: 429 and close.
PIPELINE_PAUSE_BYTES = 256 * 1024
MAX_PIPELINE_BACKLOG_BYTES = 8 * 1024 * 1024
# Slow senders (slowloris): a head must arrive within 15 s of its first byte (nginx and Go servers
# use 10-60 s; a real client sends its head in one write), a whole request within 60 s (8 MiB at
# ~1.1 Mbit/s); a connection with nothing in progress is closed after 60 s (an ingress gateway has
# `MAX_DOWNSTREAM_CONNECTIONS` slots for everyone: idle ones must not keep them; browsers reuse a
# keep-alive connection within seconds).
REQUEST_HEADERS_TIMEOUT_S = 15.0
REQUEST_READ_TIMEOUT_S = 60.0
IDLE_TIMEOUT_S = 60.0
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade", "content-length", "host", "expect"})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE = re.compile(r"[\r\n\x00]")
_TARGET = re.compile(r"[\x21-\x7e]+")  # a request target: visible ASCII, no spaces


@dataclass(frozen=True, slots=True)
class RequestReady:
    head: RequestHead
    body: bytes
    keep_alive: bool


@dataclass(frozen=True, slots=True)
class ResponseReady:
    status: int
    headers: Headers
    body: bytes


@dataclass(frozen=True, slots=True)
class ProtocolFailure:
    status: int        # what to answer (server side), or 502 (client side)
    reason: str


@dataclass(frozen=True, slots=True)
class PeerClosed:
    pass


@dataclass(frozen=True, slots=True)
class IdleTimeout:
    """Nothing was in progress for the idle timeout: close the connection without a response."""

    reason: str


class Phase(Enum):
    IDLE = "idle"      # between requests
    HEAD = "head"      # a request's head is arriving
    BODY = "body"      # its body is arriving
    BUSY = "busy"      # a request is at the engine


ServerEvent = RequestReady | ProtocolFailure | PeerClosed | IdleTimeout
ClientEvent = ResponseReady | ProtocolFailure | PeerClosed


def forwardable(headers: Headers) -> Headers:
    """Drop hop-by-hop headers (and those `connection` names), plus Host, Content-Length and Expect,
    which the sender sets or has dealt with. (One pass; the names `connection` lists are looked
    for only when there is one: it runs twice per proxied request.)"""
    kept = [(k, v) for k, v in headers if k not in HOP_BY_HOP]
    if len(kept) == len(headers):
        return headers if isinstance(headers, tuple) else tuple(headers)
    named = {t.strip().lower() for k, v in headers if k == "connection" for t in v.split(",")}
    return tuple((k, v) for k, v in kept if k not in named) if named else tuple(kept)


@functools.lru_cache(maxsize=1024)   # bounded: names come from peers; the common few are hits
def _is_token(name: str) -> bool:
    return _TOKEN.fullmatch(name) is not None


def _header_lines(headers: Headers) -> list[str]:
    return [f"{k}: {v}\r\n" for k, v in headers if _is_token(k) and not _BAD_VALUE.search(v)]


_PHRASES = {s.value: s.phrase for s in HTTPStatus}


def _reason(status: int) -> str:
    return _PHRASES.get(status, "Unknown")


class _Message:
    """What the parser callbacks collect for one message (bounded)."""

    __slots__ = ("body", "complete", "failure", "head_bytes", "headers", "size", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.head_bytes = 0
        self.complete = False
        self.failure: ProtocolFailure | None = None


class Http1Server:
    """The downstream side. Sans-IO: `receive(data, now)` and `respond(..., now)` take the time,
    `deadline()` says when `on_timer(now)` must run; nothing here reads a clock.

    Explicit read state (`phase`): IDLE (between requests) → HEAD (a request began) → BODY (its
    head is complete) → back to IDLE when it is complete; BUSY while a request is at the engine
    (`awaiting_response`). Bytes that arrive while BUSY are not parsed but kept (`backlog`, at most
    `MAX_PIPELINE_BACKLOG_BYTES`), and `wants_data` turns False past `PIPELINE_PAUSE_BYTES` so the
    adapter stops reading (TCP) or withholds the HBONE window: a pipelining client holds at most one
    request at the engine plus a bounded backlog, never a queue of 8 MiB bodies.

    Timers: a request's head must be complete `REQUEST_HEADERS_TIMEOUT_S` after its first byte and
    the whole request `REQUEST_READ_TIMEOUT_S` after it (408, then close); an IDLE connection is
    closed after `IDLE_TIMEOUT_S` (`IdleTimeout`, no response: nothing was asked)."""

    def __init__(self, max_body_bytes: int = MAX_BODY_BYTES, now: float = 0.0) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.max_body_bytes = max_body_bytes
        self._msg = _Message()
        self._queue: deque[ServerEvent] = deque()
        self._failed = False
        self._closing = False      # the last response asked to close
        self.awaiting_response = False
        self._reading = Phase.IDLE  # the parser's side: IDLE, HEAD or BODY
        self._since = now           # when `_reading` (or the idle wait) began
        self._head_raw = 0          # bytes fed while a head was incomplete (a single header's value
                                    # is buffered by httptools before `on_header`: bounded here)
        self.backlog = bytearray()
        self._now = now
        self._peer_closed = False   # the peer half-closed (EOF)
        self._closed_told = False   # ... and `PeerClosed` was handed out, after every request before it

    # --- parser callbacks -------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._msg = _Message()
        if len(self._queue) >= MAX_PIPELINED:  # before any of its body is buffered
            raise _Refused(ProtocolFailure(429, f"more than {MAX_PIPELINED} pipelined requests"))
        self._reading, self._since, self._head_raw = Phase.HEAD, self._now, 0

    def on_url(self, url: bytes) -> None:
        self._msg.url += url
        self._head_grew(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._msg.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))
        if len(self._msg.headers) > MAX_HEADERS:
            raise _Refused(ProtocolFailure(431, f"more than {MAX_HEADERS} request headers"))
        self._head_grew(len(name) + len(value) + 4)  # + ": " and CRLF: the bytes on the wire

    def _head_grew(self, n: int) -> None:
        self._msg.head_bytes += n
        if self._msg.head_bytes > MAX_HEAD_BYTES:
            raise _Refused(ProtocolFailure(431, f"request head over {MAX_HEAD_BYTES} bytes"))

    def on_headers_complete(self) -> None:
        self._reading = Phase.BODY
        if self.parser.should_upgrade():
            raise _Refused(ProtocolFailure(501, "upgrades (WebSocket) are not proxied by the L7 engine"))
        if self.parser.get_http_version() != "1.0" and not any(k == "host" for k, _ in self._msg.headers):
            # RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without Host (1.0 may omit it)
            raise _Refused(ProtocolFailure(400, "HTTP/1.1 request without a Host header"))

    def on_body(self, body: bytes) -> None:
        self._msg.size += len(body)
        if self._msg.size > self.max_body_bytes:
            raise _Refused(ProtocolFailure(413, f"request body over {self.max_body_bytes} bytes"))
        self._msg.body.append(body)

    def on_message_complete(self) -> None:
        m = self._msg
        headers = tuple(m.headers)
        host = next((v for k, v in headers if k == "host"), "")
        head = RequestHead(self.parser.get_method().decode("ascii", "replace"), m.url.decode("latin-1"), host,
                           headers)
        self._queue.append(RequestReady(head, b"".join(m.body), self.parser.should_keep_alive()))
        self._msg = _Message()
        self._reading, self._since = Phase.IDLE, self._now

    # --- API --------------------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return Phase.BUSY if self.awaiting_response else self._reading

    @property
    def failed(self) -> bool:
        """A failure was decided: its answer is queued, nothing more is parsed."""
        return self._failed

    @property
    def wants_data(self) -> bool:
        """False while the backlog is past its pause mark: the adapter should stop reading."""
        return len(self.backlog) < PIPELINE_PAUSE_BYTES

    def receive(self, data: bytes, now: float) -> list[ServerEvent]:
        """Feed bytes (b"" at end of stream); returns at most one request: the next one is handed out
        by `pending()` once this one is answered."""
        if self._failed:
            return []
        self._now = now
        if not data:
            self._peer_closed = True   # told by `pending` once the requests sent before it are served
        elif self.awaiting_response or self._queue or self.backlog:
            self.backlog += data   # not parsed until the request at the engine is answered
            if len(self.backlog) > MAX_PIPELINE_BACKLOG_BYTES:
                self.backlog.clear()
                self._fail(ProtocolFailure(429, f"over {MAX_PIPELINE_BACKLOG_BYTES} bytes pipelined behind "
                                                "a request in progress (flow control ignored)"))
        else:
            self._feed(data)
        return self.pending(now)

    def _feed(self, data: bytes) -> None:
        if self._reading is Phase.HEAD:
            self._head_raw += len(data)
        try:
            self.parser.feed_data(data)
        except _Refused as e:
            self._fail(e.failure)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolFailure(501, "upgrades (WebSocket) are not proxied by the L7 engine"))
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            self._fail(cause.failure if isinstance(cause, _Refused) else ProtocolFailure(400, f"bad request: {e}"))
        except httptools.HttpParserError as e:
            self._fail(ProtocolFailure(400, f"bad request: {e}"))
        else:
            if self._reading is Phase.HEAD and self._head_raw > MAX_HEAD_BYTES:
                self._fail(ProtocolFailure(431, f"request head over {MAX_HEAD_BYTES} bytes"))

    def _fail(self, failure: ProtocolFailure) -> None:
        self._failed = True
        self._reading = Phase.IDLE
        self._queue.append(failure)

    def pending(self, now: float | None = None) -> list[ServerEvent]:
        """The next event, unless a request is waiting for its response. The backlog is parsed only
        when nothing is queued, so at most its bytes are ever held twice."""
        if self.awaiting_response:
            return []
        if now is not None:
            self._now = now
        if not self._queue and self.backlog and not self._failed:
            data, self.backlog = bytes(self.backlog), bytearray()
            self._feed(data)
        if not self._queue:
            if self._peer_closed and not self._closed_told:
                self._closed_told = True
                return [PeerClosed()]
            return []
        ev = self._queue.popleft()
        if isinstance(ev, RequestReady):
            self.awaiting_response = True
            if not ev.keep_alive:
                self._closing = True
        return [ev]

    def respond(self, status: int, headers: Headers, body: bytes, now: float, close: bool = False) -> bytes:
        """The bytes of one whole response. `close`: this is the connection's last response."""
        if close:
            self._closing = True
        lines = [f"HTTP/1.1 {status} {_reason(status)}\r\n", *_header_lines(forwardable(headers)),
                 f"content-length: {len(body)}\r\n"]
        if self._closing:
            lines.append("connection: close\r\n")
        self.awaiting_response = False
        self._now = now
        self._since = now   # the idle wait, or the next request's time to arrive, starts with the answer
        return ("".join(lines) + "\r\n").encode("latin-1") + body

    def deadline(self) -> float | None:
        """When `on_timer` must run next (None: no timer; the engine's own timeouts govern BUSY)."""
        if self._failed or self.awaiting_response:
            return None
        if self._reading is Phase.HEAD:
            return self._since + REQUEST_HEADERS_TIMEOUT_S
        if self._reading is Phase.BODY:
            return self._since + REQUEST_READ_TIMEOUT_S
        return self._since + IDLE_TIMEOUT_S

    def on_timer(self, now: float) -> list[ServerEvent]:
        due = self.deadline()
        if due is None or now < due:
            return []
        if self._reading is Phase.IDLE:
            self._failed = True
            return [IdleTimeout(f"no request for {IDLE_TIMEOUT_S:g} s")]
        what = ("request head" if self._reading is Phase.HEAD else "request")
        limit = REQUEST_HEADERS_TIMEOUT_S if self._reading is Phase.HEAD else REQUEST_READ_TIMEOUT_S
        self._fail(ProtocolFailure(408, f"{what} not received within {limit:g} s"))
        return self.pending(now)

    @property
    def must_close(self) -> bool:
        """Nothing more can be read or answered on this connection."""
        return self._closing or (self._failed and not self._queue)


class UnsafeRequestLine(ValueError):
    """A request line that would not be one request on the wire (a bug upstream of the codec)."""


class _Refused(Exception):
    """Raised from a parser callback to stop parsing with a status."""

    def __init__(self, failure: ProtocolFailure) -> None:
        super().__init__(failure.reason)
        self.failure = failure


class Http1Client:
    def __init__(self, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.max_body_bytes = max_body_bytes
        self._msg = _Message()
        self._head_only = False     # the request was HEAD: the response has no body
        self._headers_done = False
        self.failed = False
        self._keep_alive = True
        self.requests = 0
        self._events: list[ClientEvent] = []

    # --- parser callbacks -------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._msg = _Message()
        self._headers_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._msg.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))
        self._msg.head_bytes += len(name) + len(value) + 4
        if len(self._msg.headers) > MAX_HEADERS:
            raise _Refused(ProtocolFailure(502, f"upstream response has more than {MAX_HEADERS} headers"))
        if self._msg.head_bytes > MAX_HEAD_BYTES:
            raise _Refused(ProtocolFailure(502, f"upstream response head over {MAX_HEAD_BYTES} bytes"))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        if self._head_only:  # a response to HEAD: complete now (llhttp would wait for the announced body)
            self._emit(keep_alive=False)
            raise _Refused(ProtocolFailure(0, "HEAD response complete"))

    def on_body(self, body: bytes) -> None:
        self._msg.size += len(body)
        if self._msg.size > self.max_body_bytes:
            raise _Refused(ProtocolFailure(502, f"upstream response body over {self.max_body_bytes} bytes"))
        self._msg.body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self.parser.get_status_code() < 200:
            return  # informational (100 Continue): the real response follows
        self._emit(self.parser.should_keep_alive())

    def _emit(self, keep_alive: bool) -> None:
        self._msg.complete = True
        self._keep_alive = keep_alive
        self._events.append(ResponseReady(self.parser.get_status_code(), tuple(self._msg.headers),
                                          b"".join(self._msg.body)))

    # --- API --------------------------------------------------------------------------------------

    def request(self, head: RequestHead, body: bytes) -> bytes:
        """The bytes of one request. The engine hands only normalized requests
        (`ztunnel.proxy.l7.normalize`); the request line is checked again here because it is written
        raw: a method that is not a token, a target with a space or control byte, or a host with CR,
        LF or NUL would split or smuggle a request (`UnsafeRequestLine`)."""
        if not _is_token(head.method) or not _TARGET.fullmatch(head.target) or _BAD_VALUE.search(head.host) \
                or " " in head.host:
            raise UnsafeRequestLine(f"refusing to write request line {head.method!r} {head.target!r} "
                                    f"host {head.host!r}")
        self.requests += 1
        self._msg = _Message()
        self._head_only = head.method == "HEAD"
        lines = [f"{head.method} {head.target} HTTP/1.1\r\n", f"host: {head.host or 'localhost'}\r\n",
                 *_header_lines(forwardable(head.headers)), f"content-length: {len(body)}\r\n\r\n"]
        return "".join(lines).encode("latin-1") + body

    def receive(self, data: bytes) -> list[ClientEvent]:
        """Feed bytes (b"" at end of stream)."""
        if self.failed:
            return []
        self._events = []
        if not data:
            self.failed = True
            if self._headers_done and not self._msg.complete:
                self._emit(False)  # a body delimited by the end of the connection
            else:
                self._events.append(PeerClosed())
            return self._events
        try:
            self.parser.feed_data(data)
        except (_Refused, httptools.HttpParserCallbackError) as e:
            cause = e if isinstance(e, _Refused) else e.__context__
            self.failed = True
            if isinstance(cause, _Refused) and cause.failure.status:
                self._events.append(cause.failure)
        except httptools.HttpParserError as e:
            self.failed = True
            self._events.append(ProtocolFailure(502, f"bad response from upstream: {e}"))
        return self._events

    @property
    def reusable(self) -> bool:
        return not self.failed and self._msg.complete and self._keep_alive and not self._head_only
