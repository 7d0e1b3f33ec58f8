"""HTTP/1.1 (llhttp via httptools) and h2c (h2) codecs of the L7 engine, pumped in memory (no sockets)."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events

from ztunnel.proxy.l7.h2c import PREFACE, H2Server, StreamRequest
from ztunnel.proxy.l7.http1 import (
    Http1Client,
    Http1Server,
    PeerClosed,
    ProtocolFailure,
    RequestReady,
    ResponseReady,
    forwardable,
)
from ztunnel.proxy.l7.routing import RequestHead


def test_request_response_keep_alive_and_hop_by_hop_headers() -> None:
    client, server = Http1Client(), Http1Server()
    head = RequestHead("POST", "/v1?x=1", "svc.local", (("x-a", "1"), ("connection", "keep-alive, x-hop"),
                                                        ("x-hop", "drop"), ("transfer-encoding", "chunked")))
    [ev] = server.receive(client.request(head, b"hello"), 0.0)
    assert isinstance(ev, RequestReady) and ev.keep_alive and ev.body == b"hello"
    assert ev.head.method == "POST" and ev.head.target == "/v1?x=1" and ev.head.host == "svc.local"
    assert ev.head.header("x-a") == "1" and ev.head.header("x-hop") is None  # named by Connection: not forwarded
    [resp] = client.receive(server.respond(200, (("x-b", "2"), ("keep-alive", "timeout=5")), b"world", 0.0))
    assert isinstance(resp, ResponseReady) and resp.status == 200 and resp.body == b"world"
    assert dict(resp.headers)["content-length"] == "5" and "keep-alive" not in dict(resp.headers)
    assert client.reusable
    # the next request on the same connection
    [ev2] = server.receive(client.request(RequestHead("GET", "/2", "svc.local"), b""), 0.0)
    assert isinstance(ev2, RequestReady) and ev2.head.target == "/2"


def test_pipelined_requests_wait_for_the_first_response() -> None:
    server = Http1Server()
    raw = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
    [first] = server.receive(raw, 0.0)
    assert isinstance(first, RequestReady) and first.head.target == "/1"
    assert server.pending() == []          # paused until answered
    server.respond(200, (), b"1", 0.0)
    [second] = server.pending()
    assert isinstance(second, RequestReady) and second.head.target == "/2"


def test_oversized_body_upgrade_and_garbage() -> None:
    small = Http1Server(max_body_bytes=4)
    [ev] = small.receive(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789", 0.0)
    assert isinstance(ev, ProtocolFailure) and ev.status == 413
    [up] = Http1Server().receive(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", 0.0)
    assert isinstance(up, ProtocolFailure) and up.status == 501
    [bad] = Http1Server().receive(b"NOT HTTP\r\n\r\n", 0.0)
    assert isinstance(bad, ProtocolFailure) and bad.status == 400


def test_an_http11_request_without_host_is_a_400_and_http10_may_omit_it() -> None:
    """RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request that lacks a Host header."""
    [bad] = Http1Server().receive(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", 0.0)
    assert isinstance(bad, ProtocolFailure) and bad.status == 400 and "Host" in bad.reason
    [old] = Http1Server().receive(b"GET / HTTP/1.0\r\n\r\n", 0.0)
    assert isinstance(old, RequestReady) and old.head.host == ""
    [ok] = Http1Server().receive(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 0.0)
    assert isinstance(ok, RequestReady) and ok.head.host == "a"


def test_connection_close_is_not_reusable_and_eof_is_seen() -> None:
    client, server = Http1Client(), Http1Server()
    # the caller's Connection: close is hop-by-hop: the upstream connection stays reusable...
    server.receive(client.request(RequestHead("GET", "/", "a", (("connection", "close"),)), b""), 0.0)
    [resp] = client.receive(server.respond(200, (), b"x", 0.0))
    assert isinstance(resp, ResponseReady) and client.reusable
    # ...until the upstream itself says close
    server.receive(client.request(RequestHead("GET", "/", "a"), b""), 0.0)
    [resp] = client.receive(server.respond(200, (), b"x", 0.0, close=True))
    assert isinstance(resp, ResponseReady) and not client.reusable and server.must_close
    [closed] = Http1Server().receive(b"", 0.0)
    assert isinstance(closed, PeerClosed)


def test_forwardable_drops_framing_headers() -> None:
    hs = (("host", "a"), ("content-length", "3"), ("te", "trailers"), ("x-keep", "1"))
    assert forwardable(hs) == (("x-keep", "1"),)


def test_h2c_prior_knowledge_concurrent_streams() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    client.initiate_connection()
    server = H2Server()
    wire = client.data_to_send()
    assert wire.startswith(PREFACE)
    client.send_headers(1, [(":method", "GET"), (":path", "/a"), (":authority", "svc"), (":scheme", "http")],
                        end_stream=True)
    client.send_headers(3, [(":method", "POST"), (":path", "/b"), (":authority", "svc"), (":scheme", "http"),
                            ("x-a", "1")])
    client.send_data(3, b"body", end_stream=True)
    events = server.receive(wire + client.data_to_send(), 0.0)
    reqs = [e for e in events if isinstance(e, StreamRequest)]
    assert [(r.stream_id, r.head.method, r.head.target, r.body) for r in reqs] == [(1, "GET", "/a", b""), (3, "POST", "/b", b"body")]
    assert reqs[1].head.header("x-a") == "1" and reqs[1].head.host == "svc"
    # answer the second first; a body larger than one frame goes out in pieces
    big = b"x" * 40_000
    server.respond(3, 200, (("x-b", "2"),), big)
    server.respond(1, 200, (), b"one")
    got: dict[int, bytes] = {}
    status: dict[int, str] = {}
    for ev in client.receive_data(server.data_to_send()):
        if isinstance(ev, h2.events.ResponseReceived):
            status[ev.stream_id] = dict(ev.headers)[":status"]
        elif isinstance(ev, h2.events.DataReceived):
            got[ev.stream_id] = got.get(ev.stream_id, b"") + ev.data
            client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
    server.receive(client.data_to_send(), 0.0)  # window updates
    for ev in client.receive_data(server.data_to_send()):
        if isinstance(ev, h2.events.DataReceived):
            got[ev.stream_id] = got.get(ev.stream_id, b"") + ev.data
    assert status == {1: "200", 3: "200"} and got[1] == b"one" and got[3] == big


def test_smuggling_large_heads_and_pipelining_floods_are_refused() -> None:
    [smuggle] = Http1Server().receive(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
                                      b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 0.0)
    assert isinstance(smuggle, ProtocolFailure) and smuggle.status == 400
    [big] = Http1Server().receive(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 0.0)
    assert isinstance(big, ProtocolFailure) and big.status == 431
    server = Http1Server()
    events = server.receive(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 40, 0.0)
    assert isinstance(events[0], RequestReady)
    seen = [events[0]]
    while True:
        server.respond(200, (), b"", 0.0)
        nxt = server.pending()
        if not nxt:
            break
        seen += nxt
    assert sum(isinstance(e, RequestReady) for e in seen) == 32 and isinstance(seen[-1], ProtocolFailure)
    assert seen[-1].status == 429


def test_chunked_request_body_and_head_response_and_no_header_injection() -> None:
    [ev] = Http1Server().receive(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", 0.0)
    assert isinstance(ev, RequestReady) and ev.body == b"abcde"
    client = Http1Client()
    client.request(RequestHead("HEAD", "/", "a"), b"")
    [resp] = client.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    assert isinstance(resp, ResponseReady) and resp.status == 200 and resp.body == b"" and not client.reusable
    out = Http1Server().respond(200, (("x-evil", "a\r\nset-cookie: x=1"), ("bad name", "v"), ("x-ok", "1")), b"", 0.0)
    assert b"set-cookie" not in out and b"bad name" not in out and b"x-ok: 1" in out


def test_response_delimited_by_close() -> None:
    client = Http1Client()
    client.request(RequestHead("GET", "/", "a"), b"")
    assert client.receive(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npartial ") == []
    assert client.receive(b"body") == []
    [resp] = client.receive(b"")
    assert isinstance(resp, ResponseReady) and resp.body == b"partial body" and not client.reusable
