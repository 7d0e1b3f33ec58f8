"""HTTP/1.1 for the L7 proxies, both sides, through h11. Sans-IO: bytes in, events and bytes out.

`Http1Server` reads requests from a downstream connection (a tunnel from a node ztunnel at a
waypoint, a TCP connection at an ingress gateway) and writes responses; `Http1Client` writes
requests to an upstream connection (a tunnel to the destination's node) and reads responses.
Bodies are buffered whole, bounded (`MAX_BODY_BYTES`; beyond it the request gets 413, the
response 502): a retry must be able to send the request again, and the retry decision is taken
on the response's status before anything reaches the client.

Proxying rules (RFC 9110 §7.6.1): hop-by-hop headers (`connection` and the headers it names,
`keep-alive`, `proxy-connection`, `te`, `trailer`, `transfer-encoding`, `upgrade`) are not
forwarded; `content-length` is recomputed; a request that asks to upgrade (WebSocket) is refused
with 501, since the waypoint routes request by request.

Invariants: a server never parses a second request before the first one's response was written
(h11 pauses; pipelined requests wait in its buffer); a client's connection is `reusable` only when
both sides finished the exchange cleanly and neither asked to close.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import h11

from ztunnel.proxy.l7.routing import Headers, RequestHead

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_HEAD_BYTES = 64 * 1024
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade", "content-length", "host"})


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


ServerEvent = RequestReady | ProtocolFailure | PeerClosed
ClientEvent = ResponseReady | ProtocolFailure | PeerClosed


def _decode(headers: Any) -> Headers:
    return tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in headers)


def forwardable(headers: Headers) -> Headers:
    """Drop hop-by-hop headers (and those `connection` names), plus Host and Content-Length,
    which the sender sets."""
    named = {t.strip().lower() for k, v in headers if k == "connection" for t in v.split(",")}
    return tuple((k, v) for k, v in headers if k not in HOP_BY_HOP and k not in named)


def _encode(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


class Http1Server:
    def __init__(self, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.max_body_bytes = max_body_bytes
        self._head: RequestHead | None = None
        self._body: list[bytes] = []
        self._size = 0
        self._failed = False
        self.awaiting_response = False

    def receive(self, data: bytes) -> list[ServerEvent]:
        """Feed bytes (b"" at end of stream); returns at most one request (h11 pauses after it)."""
        if self._failed:
            return []
        self.conn.receive_data(data)
        return self._events()

    def pending(self) -> list[ServerEvent]:
        """After a response: the next request already buffered (pipelined), if any."""
        return [] if self._failed else self._events()

    def _events(self) -> list[ServerEvent]:
        out: list[ServerEvent] = []
        while not self.awaiting_response:
            try:
                ev = self.conn.next_event()
            except h11.RemoteProtocolError as e:
                self._failed = True
                out.append(ProtocolFailure(e.error_status_hint, f"bad request: {e}"))
                break
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                break
            if isinstance(ev, h11.Request):
                headers = _decode(ev.headers)
                host = next((v for k, v in headers if k == "host"), "")
                self._head = RequestHead(ev.method.decode("ascii", "replace"), ev.target.decode("latin-1"),
                                         host, headers)
                self._body, self._size = [], 0
                if any(k == "upgrade" for k, _ in headers):
                    self._failed = True
                    out.append(ProtocolFailure(501, "upgrades (WebSocket) are not proxied by the L7 engine"))
                    break
            elif isinstance(ev, h11.Data):
                self._size += len(ev.data)
                if self._size > self.max_body_bytes:
                    self._failed = True
                    out.append(ProtocolFailure(413, f"request body over {self.max_body_bytes} bytes"))
                    break
                self._body.append(bytes(ev.data))
            elif isinstance(ev, h11.EndOfMessage):
                assert self._head is not None
                self.awaiting_response = True
                keep = self.conn.our_state is not h11.MUST_CLOSE
                out.append(RequestReady(self._head, b"".join(self._body), keep))
            elif isinstance(ev, h11.ConnectionClosed):
                out.append(PeerClosed())
                break
        return out

    def respond(self, status: int, headers: Headers, body: bytes, close: bool = False) -> bytes:
        """The bytes of one whole response; afterwards the next request (if any) is read with
        `pending()`. `close`: ask the client to close (after errors)."""
        hs = [(k, v) for k, v in forwardable(headers)]
        hs.append(("content-length", str(len(body))))
        if close:
            hs.append(("connection", "close"))
        try:
            out = self.conn.send(h11.Response(status_code=status, headers=_encode(tuple(hs)), reason=b""))
            if body and self.conn.our_state is h11.SEND_BODY:
                out = (out or b"") + (self.conn.send(h11.Data(data=body)) or b"")
            out = (out or b"") + (self.conn.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:
            self._failed = True
            return b""
        self.awaiting_response = False
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        else:
            self._failed = True
        return out

    @property
    def must_close(self) -> bool:
        """Nothing more can be read or written on this connection."""
        return self._failed or self.conn.our_state in (h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)


class Http1Client:
    def __init__(self, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.max_body_bytes = max_body_bytes
        self._status = 0
        self._headers: Headers = ()
        self._body: list[bytes] = []
        self._size = 0
        self.failed = False
        self.requests = 0

    def request(self, head: RequestHead, body: bytes) -> bytes:
        hs = list(forwardable(head.headers))
        hs.insert(0, ("host", head.host or "localhost"))
        hs.append(("content-length", str(len(body))))
        self.requests += 1
        out = self.conn.send(h11.Request(method=head.method.encode("ascii"), target=head.target.encode("latin-1"),
                                         headers=_encode(tuple(hs)))) or b""
        if body:
            out += self.conn.send(h11.Data(data=body)) or b""
        return out + (self.conn.send(h11.EndOfMessage()) or b"")

    def receive(self, data: bytes) -> list[ClientEvent]:
        if self.failed:
            return []
        self.conn.receive_data(data)
        out: list[ClientEvent] = []
        while True:
            try:
                ev = self.conn.next_event()
            except h11.RemoteProtocolError as e:
                self.failed = True
                out.append(ProtocolFailure(502, f"bad response from upstream: {e}"))
                break
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                break
            if isinstance(ev, h11.InformationalResponse):
                continue
            if isinstance(ev, h11.Response):
                self._status, self._headers = ev.status_code, _decode(ev.headers)
                self._body, self._size = [], 0
            elif isinstance(ev, h11.Data):
                self._size += len(ev.data)
                if self._size > self.max_body_bytes:
                    self.failed = True
                    out.append(ProtocolFailure(502, f"upstream response body over {self.max_body_bytes} bytes"))
                    break
                self._body.append(bytes(ev.data))
            elif isinstance(ev, h11.EndOfMessage):
                out.append(ResponseReady(self._status, self._headers, b"".join(self._body)))
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                else:
                    self.failed = True
                break
            elif isinstance(ev, h11.ConnectionClosed):
                self.failed = True
                out.append(PeerClosed())
                break
        return out

    @property
    def reusable(self) -> bool:
        return not self.failed and self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE
