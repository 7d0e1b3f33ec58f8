"""What a downstream peer can make the L7 proxy hold, and for how long (security review finding 2).
Each test feeds the review's attack bytes in memory to the codec (or the adapter, with a fake
tunnel) and fails without the bound: the old codecs queued every pipelined 8 MiB body, accepted
60,000 headers, acknowledged every h2 DATA frame into 128 buffered streams and had no timers."""

from __future__ import annotations

import asyncio
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest

from ztunnel.proxy.l7 import h2c
from ztunnel.proxy.l7.engine import Arrival
from ztunnel.proxy.l7.h2c import H2Server, StreamRequest
from ztunnel.proxy.l7.http1 import (
    IDLE_TIMEOUT_S,
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    MAX_PIPELINE_BACKLOG_BYTES,
    PIPELINE_PAUSE_BYTES,
    REQUEST_HEADERS_TIMEOUT_S,
    REQUEST_READ_TIMEOUT_S,
    Http1Client,
    Http1Server,
    IdleTimeout,
    PeerClosed,
    Phase,
    ProtocolFailure,
    RequestReady,
    UnsafeRequestLine,
)
from ztunnel.proxy.l7.routing import RequestHead
from ztunnel.proxy.waypoint import Context, Reply, TunnelDownstream


def post(body_len: int, path: bytes = b"/a") -> bytes:
    return b"POST " + path + b" HTTP/1.1\r\nHost: checkout\r\nContent-Length: %d\r\n\r\n" % body_len + b"x" * body_len


def held(server: Http1Server) -> int:
    """Request bytes the codec holds: its backlog and the bodies it parsed ahead."""
    return len(server.backlog) + sum(len(e.body) for e in server._queue if isinstance(e, RequestReady))


# --- HTTP/1.1 ------------------------------------------------------------------------------------

def test_pipelined_bodies_are_not_parsed_ahead_and_the_backlog_is_bounded() -> None:
    """h1_mem.py: 40 pipelined near-8 MiB bodies used to sit parsed in one codec (263 MiB)."""
    s = Http1Server()
    req = post(MAX_BODY_BYTES - 1)
    first = s.receive(req, 0.0)
    assert isinstance(first[0], RequestReady) and s.phase is Phase.BUSY
    paused_at = None
    fed = 0
    while not s.failed:                      # a peer that ignores the pause keeps sending
        piece = req[fed % len(req):fed % len(req) + (1 << 20)]   # as a socket would deliver it
        s.receive(piece, 0.0)
        fed += len(piece)
        if paused_at is None and not s.wants_data:
            paused_at = fed
        assert held(s) <= MAX_PIPELINE_BACKLOG_BYTES
        assert fed <= MAX_PIPELINE_BACKLOG_BYTES + (1 << 20)
    # back-pressure was asked for at the first piece; the hard cap refuses the rest
    assert paused_at is not None and paused_at <= PIPELINE_PAUSE_BYTES + (1 << 20)
    s.respond(200, (), b"", 1.0)
    [refused] = s.pending(1.0)
    assert isinstance(refused, ProtocolFailure) and refused.status == 429 and s.must_close


def test_a_pipelined_request_is_handed_out_after_the_answer_and_reading_resumes() -> None:
    s = Http1Server()
    [a] = s.receive(post(10, b"/1"), 0.0)
    assert isinstance(a, RequestReady) and a.head.target == "/1"
    assert s.receive(post(PIPELINE_PAUSE_BYTES, b"/2"), 0.0) == []
    assert not s.wants_data and len(s.backlog) > PIPELINE_PAUSE_BYTES   # adapter: stop reading
    s.respond(200, (), b"", 0.0)
    [b] = s.pending(0.0)
    assert isinstance(b, RequestReady) and b.head.target == "/2" and len(b.body) == PIPELINE_PAUSE_BYTES
    assert s.wants_data and not s.backlog


def test_header_count_and_head_bytes_are_bounded() -> None:
    # h1_mem.py: 60,001 headers from a 240 KB head of `a:\r\n`
    [flood] = Http1Server().receive(b"GET / HTTP/1.1\r\nHost: a\r\n" + b"a:\r\n" * 60_000 + b"\r\n", 0.0)
    assert isinstance(flood, ProtocolFailure) and flood.status == 431 and "headers" in flood.reason
    at_limit = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"x-%d: 1\r\n" % i for i in range(MAX_HEADERS - 1))
    [ok] = Http1Server().receive(at_limit + b"\r\n", 0.0)
    assert isinstance(ok, RequestReady) and len(ok.head.headers) == MAX_HEADERS
    [over] = Http1Server().receive(at_limit + b"x-last: 1\r\n\r\n", 0.0)
    assert isinstance(over, ProtocolFailure) and over.status == 431
    # a head of many short headers counts their wire bytes (name, value, ": ", CRLF), not 1 each
    short = Http1Server()
    short._msg.headers = []
    [wide] = short.receive(b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"%04d:%s\r\n" % (i, b"v" * 700)
                                                                       for i in range(90)) + b"\r\n", 0.0)
    assert isinstance(wide, ProtocolFailure) and wide.status == 431 and MAX_HEAD_BYTES < 90 * 706


def test_a_header_value_that_never_ends_is_bounded() -> None:
    """httptools keeps a header's value until its CRLF: the codec counts the bytes it fed meanwhile."""
    s = Http1Server()
    events = s.receive(b"GET / HTTP/1.1\r\nHost: a\r\nX-a: ", 0.0)
    fed = 0
    while not events:
        events = s.receive(b"v" * 4096, 0.0)
        fed += 4096
        assert fed < MAX_HEAD_BYTES + 8192
    assert isinstance(events[0], ProtocolFailure) and events[0].status == 431


def test_request_head_request_and_idle_timeouts() -> None:
    s = Http1Server(now=0.0)
    assert s.deadline() == IDLE_TIMEOUT_S                    # a new connection must start a request
    s.receive(b"GET / HTTP/1.1\r\nX-a: ", 1.0)               # slowloris: a head that never completes
    assert s.phase is Phase.HEAD and s.deadline() == 1.0 + REQUEST_HEADERS_TIMEOUT_S
    assert s.on_timer(1.0 + REQUEST_HEADERS_TIMEOUT_S - 0.1) == []
    [late] = s.on_timer(1.0 + REQUEST_HEADERS_TIMEOUT_S)
    assert isinstance(late, ProtocolFailure) and late.status == 408 and s.must_close

    body = Http1Server(now=0.0)
    body.receive(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n12", 2.0)
    assert body.phase is Phase.BODY and body.deadline() == 2.0 + REQUEST_READ_TIMEOUT_S
    body.receive(b"3", 50.0)                                  # a trickle does not extend it
    [slow] = body.on_timer(2.0 + REQUEST_READ_TIMEOUT_S)
    assert isinstance(slow, ProtocolFailure) and slow.status == 408

    idle = Http1Server(now=0.0)
    idle.receive(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 1.0)
    assert idle.phase is Phase.BUSY and idle.deadline() is None   # the engine's timeouts govern
    idle.respond(200, (), b"", 5.0)
    assert idle.deadline() == 5.0 + IDLE_TIMEOUT_S
    [gone] = idle.on_timer(5.0 + IDLE_TIMEOUT_S)
    assert isinstance(gone, IdleTimeout)


def test_the_upstream_request_line_is_checked_before_it_is_written() -> None:
    for head in (RequestHead("GET /admin HTTP/1.1\r\nx:", "/", "a"), RequestHead("GET", "/ok HTTP/1.1\r\n\r\nGET /x", "a"),
                 RequestHead("GET", "/", "a\r\nx-injected: 1"), RequestHead("GET", "/a b", "a")):
        with pytest.raises(UnsafeRequestLine):
            Http1Client().request(head, b"")


# --- h2c -----------------------------------------------------------------------------------------

def h2_pair(ack_settings: bool = True) -> tuple[h2.connection.H2Connection, H2Server]:
    cli = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="latin-1"))
    cli.initiate_connection()
    srv = H2Server()
    srv.receive(cli.data_to_send(), 0.0)
    if ack_settings:
        cli.receive_data(srv.data_to_send())
    else:
        srv.data_to_send()   # the client never reads the server's SETTINGS: no limit applies at its end
    return cli, srv


def headers(sid: int, method: str = "POST") -> list[tuple[str, str]]:
    return [(":method", method), (":scheme", "http"), (":authority", "checkout"), (":path", f"/{sid}")]


def resets(cli: h2.connection.H2Connection, data: bytes) -> dict[int, int]:
    return {ev.stream_id: ev.error_code for ev in cli.receive_data(data) if isinstance(ev, h2.events.StreamReset)}


def test_h2_streams_beyond_the_limit_end_the_connection() -> None:
    cli, srv = h2_pair(ack_settings=False)   # the client never saw the limit: it is enforced anyway
    for i in range(h2c.MAX_STREAMS):
        cli.send_headers(1 + 2 * i, headers(1 + 2 * i))
    assert srv.receive(cli.data_to_send(), 0.0) == [] and len(srv._streams) == h2c.MAX_STREAMS
    cli.send_headers(1 + 2 * h2c.MAX_STREAMS, headers(1 + 2 * h2c.MAX_STREAMS))
    [ended] = srv.receive(cli.data_to_send(), 0.0)
    assert isinstance(ended, h2c.ConnectionEnded) and srv.closed
    goaway = [ev for ev in cli.receive_data(srv.data_to_send()) if isinstance(ev, h2.events.ConnectionTerminated)]
    assert goaway and goaway[0].error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR


def test_h2_request_bodies_on_one_connection_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """h2_mem.py: 128 streams x 1 MiB were buffered and acknowledged (1 GiB with 8 MiB bodies)."""
    monkeypatch.setattr(h2c, "MAX_BUFFERED_BODY_BYTES", 1 << 20)   # the same rule, at a test's scale
    cli, srv = h2_pair()
    streams = [1 + 2 * i for i in range(24)]
    for sid in streams:
        cli.send_headers(sid, headers(sid))
    refused: dict[int, int] = {}
    chunk = b"x" * 16384
    for _ in range(4):                       # 24 streams x 64 KiB = 1.5 MiB offered
        for sid in streams:
            if sid in refused or cli.local_flow_control_window(sid) < len(chunk):
                continue
            cli.send_data(sid, chunk)
            srv.receive(cli.data_to_send(), 0.0)
            assert srv.buffered <= 1 << 20
            refused |= resets(cli, srv.data_to_send())
    assert refused and set(refused.values()) == {h2.errors.ErrorCodes.REFUSED_STREAM}
    assert srv.buffered == sum(st.size for st in srv._streams.values())


def test_h2_responses_waiting_for_window_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that never sends WINDOW_UPDATE pinned every response (128 x 8 MiB)."""
    monkeypatch.setattr(h2c, "MAX_PENDING_RESPONSE_BYTES", 512 * 1024)
    cli, srv = h2_pair()
    streams = [1 + 2 * i for i in range(8)]
    for sid in streams:
        cli.send_headers(sid, headers(sid, "GET"), end_stream=True)
    got = [ev for ev in srv.receive(cli.data_to_send(), 0.0) if isinstance(ev, StreamRequest)]
    assert len(got) == 8
    for ev in got:
        srv.respond(ev.stream_id, 200, (), b"r" * (200 * 1024))
        assert srv.pending_bytes <= 512 * 1024
    refused = resets(cli, srv.data_to_send())
    assert refused and set(refused.values()) == {h2.errors.ErrorCodes.ENHANCE_YOUR_CALM}
    # nothing at the engine and no byte from the client: the idle timer closes it with GOAWAY
    assert srv.deadline() == IDLE_TIMEOUT_S
    [ended] = srv.on_timer(IDLE_TIMEOUT_S)
    assert isinstance(ended, h2c.ConnectionEnded) and "idle" in ended.reason
    assert any(isinstance(ev, h2.events.ConnectionTerminated) for ev in cli.receive_data(srv.data_to_send()))


def test_h2_headers_count_and_slow_request_bodies() -> None:
    cli, srv = h2_pair()
    cli.send_headers(1, headers(1, "GET") + [(f"x-{i}", "1") for i in range(MAX_HEADERS + 1)], end_stream=True)
    assert srv.receive(cli.data_to_send(), 0.0) == []
    answers = [ev for ev in cli.receive_data(srv.data_to_send()) if isinstance(ev, h2.events.ResponseReceived)]
    assert dict(answers[0].headers)[":status"] == "431"
    cli.send_headers(3, headers(3))             # a body that never ends
    cli.send_data(3, b"abc")
    srv.receive(cli.data_to_send(), 10.0)
    assert srv.deadline() == 10.0 + REQUEST_READ_TIMEOUT_S
    srv.on_timer(10.0 + REQUEST_READ_TIMEOUT_S)
    answers = [ev for ev in cli.receive_data(srv.data_to_send()) if isinstance(ev, h2.events.ResponseReceived)]
    assert answers and answers[0].stream_id == 3 and dict(answers[0].headers)[":status"] == "408"
    assert srv.buffered == 0 and not srv._streams


def test_h2_responses_stay_in_the_codec_while_the_transport_is_full() -> None:
    cli, srv = h2_pair()
    cli.send_headers(1, headers(1, "GET"), end_stream=True)
    [ev] = srv.receive(cli.data_to_send(), 0.0)
    srv.data_to_send()
    srv.write_blocked = True
    assert isinstance(ev, StreamRequest)
    srv.respond(1, 200, (), b"body")
    assert srv.pending_bytes == 4                # held, bounded, not pushed into the transport
    srv.resume_writing()
    assert srv.pending_bytes == 0 and srv.data_to_send()


# --- the adapter: HBONE window withheld while the backlog is full ---------------------------------

class _Session:
    write_paused = False


class FakeStream:
    def __init__(self) -> None:
        self.acked = 0
        self.written = b""
        self.session = _Session()

    def write(self, data: bytes) -> None:
        self.written += data

    def write_eof(self) -> None:
        pass

    def reset(self) -> None:
        pass

    def ack(self, n: int) -> None:
        self.acked += n

    @property
    def buffered_bytes(self) -> int:
        return 0


class FakeTelemetry:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def log(self, **kw: Any) -> None:
        self.lines.append(kw)

    def refusal(self, reporter: str, code: str) -> None:
        self.lines.append({"refusal": code})


class FakeProxy:
    """What `Downstream` uses of `L7Proxy`: requests wait until `release` is set."""

    def __init__(self) -> None:
        self.telemetry = FakeTelemetry()
        self.draining = False
        self.release = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.seen: list[str] = []

    def spawn(self, coro: Any) -> None:
        self.tasks.append(asyncio.ensure_future(coro))

    async def handle_request(self, ctx: Any, head: RequestHead, body: bytes) -> Reply:
        self.seen.append(head.target)
        await self.release.wait()
        return Reply(200, (), b"ok")


async def test_a_pipelining_caller_is_held_back_by_the_hbone_window() -> None:
    proxy, stream = FakeProxy(), FakeStream()
    ctx = Context.of(Arrival(), "spiffe://east.mesh/ns/shop/sa/frontend")
    td = TunnelDownstream(proxy, stream, ctx)  # type: ignore[arg-type]
    first = post(10, b"/1")
    td.on_data(first, len(first))
    await asyncio.sleep(0)
    assert proxy.seen == ["/1"] and stream.acked == len(first)
    more = post(64 * 1024, b"/2") * 8            # 512 KiB pipelined behind /1
    for off in range(0, len(more), 16384):
        piece = more[off:off + 16384]
        td.on_data(piece, len(piece))
    assert stream.acked < len(first) + PIPELINE_PAUSE_BYTES + 16384   # window credit withheld
    assert td.conn.reading_paused
    proxy.release.set()
    for _ in range(50):
        await asyncio.sleep(0)
    assert proxy.seen[:3] == ["/1", "/2", "/2"]
    assert stream.acked == len(first) + len(more)                    # credited once it is parsed
    td.conn.close()
    for t in proxy.tasks:
        t.cancel()


def test_requests_pipelined_before_a_half_close_are_all_served_first() -> None:
    s = Http1Server()
    [a] = s.receive(post(1, b"/1"), 0.0)
    assert s.receive(post(1, b"/2") + post(1, b"/3"), 0.0) == []   # kept in the backlog
    assert s.receive(b"", 0.0) == []                               # EOF: told after /2 and /3
    assert isinstance(a, RequestReady)
    order: list[str] = []
    while True:
        s.respond(200, (), b"", 1.0)
        [ev] = s.pending(1.0)
        if not isinstance(ev, RequestReady):
            assert isinstance(ev, PeerClosed)
            break
        order.append(ev.head.target)
    assert order == ["/2", "/3"]
