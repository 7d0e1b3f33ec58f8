"""HBONE sans-IO core: two in-memory peers pumping bytes; flow control, half-close, resets,
limits, keep-alive, stale frames. No sockets, no clock: `now_s` is a number we choose."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztunnel.hbone import framer as hbone
from ztunnel.hbone.framer import (
    ConnectionTerminated,
    ConnectRequested,
    DataReceived,
    ErrorCode,
    HboneConnection,
    HboneSettings,
    Role,
    StreamAccepted,
    StreamEnded,
    StreamRejected,
    StreamReset,
    StreamState,
)


def pump(a: HboneConnection, b: HboneConnection, now_s: float = 0.0, auto_ack: bool = True,
         chunk: int | None = None) -> tuple[list[hbone.Event], list[hbone.Event]]:
    """Move bytes both ways until quiet; returns the events each side saw."""
    ev_a: list[hbone.Event] = []
    ev_b: list[hbone.Event] = []
    for _ in range(10_000):
        moved = False
        for src, dst, evs in ((a, b, ev_b), (b, a, ev_a)):
            data = src.data_to_send()
            if data:
                moved = True
                parts = [data] if chunk is None else [data[i:i + chunk] for i in range(0, len(data), chunk)]
                for part in parts:
                    new = dst.receive_data(part, now_s)
                    evs.extend(new)
                    if auto_ack:
                        for e in new:
                            if isinstance(e, DataReceived):
                                dst.acknowledge_received_data(e.stream_id, e.flow_controlled_bytes)
        if not moved:
            return ev_a, ev_b
    raise AssertionError("peers never went quiet")


def pair(client_settings: HboneSettings | None = None,
         server_settings: HboneSettings | None = None) -> tuple[HboneConnection, HboneConnection]:
    c = HboneConnection(Role.CLIENT, client_settings)
    s = HboneConnection(Role.SERVER, server_settings)
    c.initiate(0.0)
    s.initiate(0.0)
    pump(c, s)
    return c, s


def received(events: list[hbone.Event], sid: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived) and e.stream_id == sid)


def open_tunnel(c: HboneConnection, s: HboneConnection, authority: str = "10.0.0.1:80") -> int:
    sid = c.open_stream(authority, [("x-src", "a")])
    _, ev_s = pump(c, s)
    req = [e for e in ev_s if isinstance(e, ConnectRequested)]
    assert req == [ConnectRequested(sid, authority, (("x-src", "a"),))]
    s.respond(sid, 200)
    ev_c, _ = pump(c, s)
    assert [e for e in ev_c if isinstance(e, StreamAccepted)] == [StreamAccepted(sid, 200, ())]
    return sid


def test_tunnel_carries_bytes_both_ways_and_half_closes_cleanly() -> None:
    c, s = pair()
    sid = open_tunnel(c, s)
    c.send_data(sid, b"hello")
    s.send_data(sid, b"world", end_stream=True)
    ev_c, ev_s = pump(c, s)
    assert received(ev_s, sid) == b"hello"
    assert received(ev_c, sid) == b"world"
    assert StreamEnded(sid) in ev_c
    assert c.stream_state(sid) is StreamState.HALF_CLOSED_REMOTE
    assert s.stream_state(sid) is StreamState.HALF_CLOSED_LOCAL
    c.send_data(sid, b"late reply after the server's half-close")  # half-closed remote may still send
    c.end_stream(sid)
    _, ev_s = pump(c, s)
    assert received(ev_s, sid) == b"late reply after the server's half-close"
    assert StreamEnded(sid) in ev_s
    assert c.stream_state(sid) is StreamState.CLOSED and s.stream_state(sid) is StreamState.CLOSED
    assert c.open_stream_count == 0 and s.open_stream_count == 0


def test_rejection_carries_status_and_reason() -> None:
    c, s = pair()
    sid = c.open_stream("10.0.0.9:22")
    _, ev_s = pump(c, s)
    assert isinstance(ev_s[-1], ConnectRequested)
    s.respond(sid, 403, [("x-meshfed-reason", "denied by ns1/deny-ssh")])
    ev_c, _ = pump(c, s)
    rej = [e for e in ev_c if isinstance(e, StreamRejected)]
    assert len(rej) == 1 and rej[0].status == 403 and rej[0].reason == "denied by ns1/deny-ssh"
    assert c.stream_state(sid) is StreamState.CLOSED


def test_reset_propagates_as_reset_not_as_end() -> None:
    c, s = pair()
    sid = open_tunnel(c, s)
    s.reset_stream(sid, ErrorCode.CONNECT_ERROR)
    ev_c, _ = pump(c, s)
    assert ev_c == [StreamReset(sid, ErrorCode.CONNECT_ERROR, remote=True)]
    assert not any(isinstance(e, StreamEnded) for e in ev_c)
    with pytest.raises(hbone.HboneError):
        c.send_data(sid, b"x")


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=70_000), min_size=1, max_size=8),
       chunk=st.sampled_from([None, 1, 7, 4096, 16_393]))
def test_any_payload_split_any_way_arrives_intact(sizes: list[int], chunk: int | None) -> None:
    c, s = pair()
    sid = open_tunnel(c, s)
    payload = b"".join(bytes([i % 251]) * n for i, n in enumerate(sizes))
    for i, n in enumerate(sizes):
        c.send_data(sid, bytes([i % 251]) * n)
    c.end_stream(sid)
    _, ev_s = pump(c, s, chunk=chunk)
    assert received(ev_s, sid) == payload
    assert ev_s[-1] == StreamEnded(sid)


def test_flow_control_buffers_until_the_receiver_acknowledges() -> None:
    small = HboneSettings(stream_window_bytes=65_535, connection_window_bytes=1 << 20)
    c, s = pair(server_settings=small)
    sid = open_tunnel(c, s)
    c.send_data(sid, b"x" * 200_000)
    _, ev_s = pump(c, s, auto_ack=False)
    got = received(ev_s, sid)
    assert len(got) == 65_535                      # the stream window, no more
    assert c.buffered_bytes(sid) == 200_000 - 65_535
    s.acknowledge_received_data(sid, len(got))     # consumed: window comes back
    ev_c, ev_s = pump(c, s)
    assert len(received(ev_s, sid)) == 200_000 - 65_535
    assert c.buffered_bytes(sid) == 0
    assert hbone.WindowOpened(sid) in ev_c


def test_data_frames_fill_one_tls_record() -> None:
    c, s = pair()
    sid = open_tunnel(c, s)
    c.send_data(sid, b"y" * 100_000)
    frames = list(hbone.frames_of(c.data_to_send()))
    assert all(len(p) + hbone.FRAME_HEADER_BYTES <= 16_384 for _, _, _, p in frames)
    assert len(frames[0][3]) + hbone.FRAME_HEADER_BYTES == 16_384


def test_concurrent_stream_cap_refuses_excess_streams() -> None:
    c, s = pair(server_settings=HboneSettings(max_concurrent_streams=2))
    a, b = open_tunnel(c, s), open_tunnel(c, s)
    assert not c.accepting_streams                 # the client respects the advertised cap
    with pytest.raises(hbone.StreamLimitReached):
        c.open_stream("10.0.0.1:80")
    # a client that ignores the cap gets REFUSED_STREAM for the excess; others unaffected
    c._peer_max_streams = None
    extra = c.open_stream("10.0.0.1:80")
    ev_c, _ev_s = pump(c, s)
    assert StreamReset(extra, ErrorCode.REFUSED_STREAM, remote=True) in ev_c
    assert s.stream_state(a) is StreamState.OPEN and s.stream_state(b) is StreamState.OPEN


def test_rapid_reset_peer_gets_goaway_enhance_your_calm() -> None:
    c, s = pair(server_settings=HboneSettings(rapid_reset_max=10, rapid_reset_window_s=1.0))
    ev_s: list[hbone.Event] = []
    for _ in range(12):
        if c.closed or not c.accepting_streams:
            break
        sid = c.open_stream("10.0.0.1:80")
        c.reset_stream(sid)
        ev_s += pump(c, s, now_s=0.5)[1]
    term = [e for e in ev_s if isinstance(e, ConnectionTerminated)]
    assert term and term[0].error_code == ErrorCode.ENHANCE_YOUR_CALM and "rapid reset" in term[0].reason
    assert s.closed


def test_resets_spread_over_time_are_fine() -> None:
    c, s = pair(server_settings=HboneSettings(rapid_reset_max=10, rapid_reset_window_s=1.0))
    for i in range(30):
        sid = c.open_stream("10.0.0.1:80")
        c.reset_stream(sid)
        pump(c, s, now_s=i * 0.2)
    assert not s.closed


def test_oversized_header_list_is_refused() -> None:
    c, s = pair(server_settings=HboneSettings(max_header_list_bytes=1024))
    c.open_stream("10.0.0.1:80", [("x-big", "a" * 4000)])
    _, ev_s = pump(c, s)
    assert any(isinstance(e, ConnectionTerminated) and e.error_code == ErrorCode.ENHANCE_YOUR_CALM for e in ev_s)


def test_non_connect_request_is_reset_with_protocol_error() -> None:
    c, s = pair()
    # hand-craft a GET on stream 1 with our encoder
    c._send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "x")], False)
    c._next_stream_id = 3
    _ev_c, ev_s = pump(c, s)
    assert StreamReset(1, ErrorCode.PROTOCOL_ERROR, remote=False) in ev_s
    assert not s.closed


def test_stale_stream_frames_never_kill_the_connection() -> None:
    c, s = pair()
    sid = open_tunnel(c, s)
    c.send_data(sid, b"in flight")
    s.reset_stream(sid)
    pump(c, s)  # the reset crosses the in-flight data
    other = open_tunnel(c, s)
    assert not c.closed and not s.closed
    c.send_data(other, b"still fine", end_stream=True)
    _, ev_s = pump(c, s)
    assert received(ev_s, other) == b"still fine"


def test_keepalive_ping_and_dead_peer_detection() -> None:
    cfg = HboneSettings(ping_interval_s=5.0, ping_timeout_s=2.0)
    c, s = pair(client_settings=cfg)
    assert c.next_timer_s() == 5.0
    c.handle_timer(5.0)
    ev_c, _ = pump(c, s, now_s=5.1)
    assert any(isinstance(e, hbone.PingAcked) for e in ev_c)
    # peer goes silent: the ping times out, the connection ends with a reason
    c.handle_timer(20.0)
    c.data_to_send()
    assert c.next_timer_s() == 22.0
    ev = c.handle_timer(22.0)
    assert ev and isinstance(ev[0], ConnectionTerminated) and "unanswered" in ev[0].reason
    assert c.closed


def test_goaway_refuses_new_streams_lets_old_finish() -> None:
    c, s = pair()
    sid = open_tunnel(c, s)
    s.close()
    ev_c, _ = pump(c, s)
    assert any(isinstance(e, ConnectionTerminated) and e.error_code == 0 for e in ev_c)
    assert not c.accepting_streams
    with pytest.raises(hbone.ConnectionClosedError):
        c.open_stream("10.0.0.1:80")
    c.send_data(sid, b"finish", end_stream=True)
    _, ev_s = pump(c, s)
    assert received(ev_s, sid) == b"finish"


def test_garbage_instead_of_preface_is_a_protocol_error() -> None:
    s = HboneConnection(Role.SERVER)
    s.initiate(0.0)
    ev = s.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0.0)
    assert isinstance(ev[-1], ConnectionTerminated) and ev[-1].error_code == ErrorCode.PROTOCOL_ERROR
    assert "preface" in ev[-1].reason


def test_data_events_own_their_bytes_and_runs_are_merged() -> None:
    """Consecutive DATA frames of a stream arrive as one DataReceived holding `bytes` (not views
    into the read buffer), whatever the read boundaries; flow-control credit adds up."""
    from ztunnel.hbone.framer import DATA_CHUNK_BYTES

    c, s = pair()
    sid = open_tunnel(c, s)
    payload = bytes(range(256)) * (3 * DATA_CHUNK_BYTES // 256 + 7)   # > 3 frames
    c.send_data(sid, payload)
    wire = c.data_to_send()
    for cut in (len(wire), 5000, 16_393):
        got = b""
        flow = 0
        n_events = 0
        for piece in (wire[:cut], wire[cut:]):
            for ev in s.receive_data(piece, 0.0):
                assert isinstance(ev, DataReceived) and type(ev.data) is bytes
                got += ev.data
                flow += ev.flow_controlled_bytes
                n_events += 1
        assert got == payload and flow == len(payload)
        assert n_events <= 2          # one per read, not one per frame
        c.send_data(sid, payload)
        wire = c.data_to_send()


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    n = len(payload)
    return bytes([n >> 16, (n >> 8) & 0xFF, n & 0xFF, ftype, flags]) + sid.to_bytes(4, "big") + payload


@pytest.mark.parametrize("name, flags, payload, on_stream", [
    ("plain", 0, b"request" * 100, "open"),
    ("end of stream", hbone.FLAG_END_STREAM, b"last bytes", "open"),
    ("padded", hbone.FLAG_PADDED, bytes([3]) + b"body" + b"\0\0\0", "open"),
    ("padding past the payload", hbone.FLAG_PADDED, bytes([9]) + b"ab", "open"),
    ("empty", 0, b"", "open"),
    ("past the stream window", 0, b"x" * 16_000, "small window"),
    ("on a stream the peer half-closed", 0, b"late", "half-closed"),
    ("on a stream never opened", 0, b"who", "unknown"),
])
def test_a_read_of_one_data_frame_is_handled_as_the_parser_would(name: str, flags: int, payload: bytes,
                                                                 on_stream: str) -> None:
    """A read that is exactly one DATA frame takes a short path (no parse loop, no buffering); the
    same bytes split over two reads take the general parser. Both must leave the same events, the
    same answer on the wire and the same connection state, for good frames and for bad ones. (The
    split case once raised BufferError for a bad frame instead of answering GOAWAY.)"""
    outcomes = []
    for split in (False, True):
        settings_s = HboneSettings(stream_window_bytes=8_000) if on_stream == "small window" else None
        c, s = pair(server_settings=settings_s)
        sid = open_tunnel(c, s)
        if on_stream == "half-closed":
            c.end_stream(sid)
            pump(c, s)
        target = sid + 40 if on_stream == "unknown" else sid
        wire = _frame(hbone.DATA, flags, target, payload)
        reads = [wire[:4], wire[4:]] if split else [wire]
        parsed: list[int] = []

        def counting_parse(*a: Any, parse: Any = s._parse, calls: list[int] = parsed) -> int:
            calls.append(1)
            return int(parse(*a))

        s._parse = counting_parse  # type: ignore[method-assign]
        events = [ev for part in reads for ev in s.receive_data(part, 0.0)]
        assert bool(parsed) == split, "the one-frame read must take the short path, the split one the parser"
        for ev in events:
            if isinstance(ev, DataReceived):
                assert type(ev.data) is bytes
        st_ = s._streams.get(sid)
        windows = (s._conn_recv_window, s._conn_recv_unacked,
                   (st_.recv_window, st_.recv_unacked) if st_ is not None else None)
        outcomes.append((events, s.data_to_send(), s.closed, s.stream_state(sid), windows, len(s._reset_times)))
    assert outcomes[0] == outcomes[1], name


def test_a_small_write_leaves_as_one_frame_and_a_large_one_waits_for_window() -> None:
    """A write that fits the windows is framed at once (the short path); one that does not is
    queued and flushed by WINDOW_UPDATE; both arrive intact and in order."""
    c, s = pair(server_settings=HboneSettings(stream_window_bytes=65_535, connection_window_bytes=65_535))
    sid = open_tunnel(c, s)
    assert c.send_data(sid, b"a" * 1000) == 0
    frames = list(hbone.frames_of(c.data_to_send()))
    assert frames == [(hbone.DATA, 0, sid, b"a" * 1000)]
    big = bytes(range(256)) * 400                   # 102,400 bytes: more than the 64 KiB window
    held = c.send_data(sid, big)
    assert held > 0 and held == c.buffered_bytes(sid)
    _, ev_s = pump(c, s)
    assert received(ev_s, sid) == big
    assert c.buffered_bytes(sid) == 0


@pytest.mark.parametrize("role_sending", ["client", "server"])
def test_a_header_block_after_the_peers_end_of_stream_resets_that_stream_only(role_sending: str) -> None:
    """Trailers after END_STREAM (DATA with END_STREAM, then HEADERS): a stream error STREAM_CLOSED
    on that stream, counted as a peer-caused reset, never an exception out of `receive_data` (it
    once escaped as HboneError: no GOAWAY, a fatal-error traceback and every tunnel of the pooled
    connection reset)."""
    c, s = pair()
    sid = open_tunnel(c, s)
    other = open_tunnel(c, s)
    sender, receiver = (c, s) if role_sending == "client" else (s, c)
    sender.send_data(sid, b"bye", end_stream=True)
    pump(c, s)
    assert receiver.stream_state(sid) is StreamState.HALF_CLOSED_REMOTE
    block = hbone.hpack.Encoder().encode([("x-trailer", "1")])
    resets_before = len(receiver._reset_times)
    events = receiver.receive_data(_frame(hbone.HEADERS, hbone.FLAG_END_HEADERS | hbone.FLAG_END_STREAM, sid, block),
                                   0.0)
    assert StreamReset(sid, ErrorCode.STREAM_CLOSED, remote=False) in events
    assert not receiver.closed and receiver.stream_state(sid) is StreamState.CLOSED
    assert (hbone.RST_STREAM, 0, sid, ErrorCode.STREAM_CLOSED.to_bytes(4, "big")) in list(
        hbone.frames_of(receiver.data_to_send()))
    assert len(receiver._reset_times) == resets_before + (1 if receiver is s else 0)   # the server counts
    sender.send_data(other, b"still here")
    _, ev_other = pump(c, s) if receiver is s else pump(s, c)
    assert received(ev_other, other) == b"still here"
