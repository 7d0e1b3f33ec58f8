"""HTTP/2 "MadeYouReset" (CVE-2025-8671) against the sans-IO HBONE server: the peer makes *us*
reset its streams — a WINDOW_UPDATE of 0, DATA past the stream window, DATA on a stream it
already half-closed, a malformed CONNECT — so each reset frees a stream slot at once and the
concurrency cap never bites. Every such reset counts toward the rapid-reset limit like the peer's
own RST_STREAM: the peer gets GOAWAY ENHANCE_YOUR_CALM, and the number of CONNECTs announced to the
application (each one a backend dial) stays bounded by the limit instead of growing with the
attack. In-memory peers, `now_s` chosen by the test."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ztunnel.hbone import framer as hbone
from ztunnel.hbone.framer import (
    DATA,
    GOAWAY,
    WINDOW_UPDATE,
    ConnectionTerminated,
    ConnectRequested,
    ErrorCode,
    HboneConnection,
    HboneSettings,
    Role,
    StreamReset,
    frames_of,
)

ATTACK_CONNECTS = 5000
LIMIT = 200


def peers(**server: object) -> tuple[HboneConnection, HboneConnection]:
    c = HboneConnection(Role.CLIENT)
    s = HboneConnection(Role.SERVER, HboneSettings(**server))  # type: ignore[arg-type]
    c.initiate(0.0)
    s.initiate(0.0)
    s.receive_data(c.data_to_send(), 0.0)
    c.receive_data(s.data_to_send(), 0.0)
    c._peer_max_streams = None  # the attacker ignores the cap (it never reaches it anyway)
    return c, s


def window_update_zero(c: HboneConnection, sid: int) -> None:
    c._frame(WINDOW_UPDATE, 0, sid, (0).to_bytes(4, "big"))


def data_past_window(c: HboneConnection, sid: int) -> None:
    c._frame(DATA, 0, sid, b"x" * 2048)   # the server's stream window is 1 KiB in this test


def data_after_end_stream(c: HboneConnection, sid: int) -> None:
    c._frame(DATA, hbone.FLAG_END_STREAM, sid, b"")   # half-close...
    c._frame(DATA, 0, sid, b"x")                       # ...then keep sending


ABUSES: dict[str, Callable[[HboneConnection, int], None]] = {
    "WINDOW_UPDATE of 0": window_update_zero,
    "DATA past the stream window": data_past_window,
    "DATA on a stream the peer had half-closed": data_after_end_stream,
}


@pytest.mark.parametrize("abuse", sorted(ABUSES))
def test_server_sent_resets_count_toward_the_rapid_reset_limit(abuse: str) -> None:
    c, s = peers(stream_window_bytes=1024)
    announced = 0
    sent_to_peer = b""
    events: list[hbone.Event] = []
    for _ in range(ATTACK_CONNECTS):     # all within one window: now_s stays at 0.5
        if s.closed:
            break
        sid = c.open_stream("10.0.0.1:80")
        ABUSES[abuse](c, sid)
        new = s.receive_data(c.data_to_send(), 0.5)   # one read per CONNECT: the worst case
        events += new
        announced += sum(isinstance(e, ConnectRequested) for e in new)
        sent_to_peer += s.data_to_send()
    term = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert term and term[0].error_code == ErrorCode.ENHANCE_YOUR_CALM, f"no GOAWAY after {announced} CONNECTs"
    assert "rapid reset" in term[0].reason and abuse in term[0].reason
    assert announced <= LIMIT + 1             # 5000 before: every CONNECT dialled a backend
    goaways = [p for t, _f, _sid, p in frames_of(sent_to_peer) if t == GOAWAY]
    assert goaways and int.from_bytes(goaways[0][4:8], "big") == ErrorCode.ENHANCE_YOUR_CALM
    assert s.stream_state(1) is hbone.StreamState.CLOSED


def test_malformed_connects_count_too() -> None:
    c, s = peers(rapid_reset_max=10)
    for i in range(20):
        sid = 1 + 2 * i
        c._send_headers(sid, [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "x")], False)
        c._next_stream_id = sid + 2
        s.receive_data(c.data_to_send(), 0.1)
    assert s.closed and s.terminated is not None and s.terminated.error_code == ErrorCode.ENHANCE_YOUR_CALM


def test_a_connect_reset_within_the_read_that_opened_it_is_never_announced() -> None:
    """CONNECT and its cancellation (or a self-inflicted reset) in one read: nothing to dial."""
    c, s = peers()
    a = c.open_stream("10.0.0.1:80")
    c.reset_stream(a)
    b = c.open_stream("10.0.0.2:80")
    window_update_zero(c, b)
    ok = c.open_stream("10.0.0.3:80")
    ev = s.receive_data(c.data_to_send(), 0.0)
    assert [e.stream_id for e in ev if isinstance(e, ConnectRequested)] == [ok]
    assert StreamReset(b, ErrorCode.FLOW_CONTROL_ERROR, remote=False) in ev


def test_connects_of_a_read_that_ended_the_connection_are_not_announced() -> None:
    c, s = peers(rapid_reset_max=3)
    for _ in range(10):
        sid = c.open_stream("10.0.0.1:80")
        window_update_zero(c, sid)
    ev = s.receive_data(c.data_to_send(), 0.0)   # one read: 4 resets end the connection
    assert not [e for e in ev if isinstance(e, ConnectRequested)]
    assert isinstance(ev[-1], ConnectionTerminated) and ev[-1].error_code == ErrorCode.ENHANCE_YOUR_CALM
    assert all(s.stream_state(1 + 2 * i) is hbone.StreamState.CLOSED for i in range(10))


def test_well_behaved_tunnels_at_a_high_rate_are_not_throttled() -> None:
    """1,000 tunnels opened, used and closed cleanly within one window: no reset, no GOAWAY."""
    c, s = peers()
    for _ in range(1000):
        sid = c.open_stream("10.0.0.1:80")
        s.receive_data(c.data_to_send(), 0.5)
        s.respond(sid, 200)
        c.receive_data(s.data_to_send(), 0.5)
        c.send_data(sid, b"ping", end_stream=True)
        s.receive_data(c.data_to_send(), 0.5)
        s.send_data(sid, b"pong", end_stream=True)
        c.receive_data(s.data_to_send(), 0.5)
    assert not s.closed and not c.closed and s.open_stream_count == 0
