"""Our HBONE framer against the `h2` library as an independent HTTP/2 peer, in both roles.

If these pass, a standard HTTP/2 implementation (Istio's ztunnel uses hyper/h2 in Rust) can open
tunnels to us and accept ours: preface, SETTINGS exchange, HPACK, flow control across windows,
half-close and reset semantics all agree."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings

from ztunnel.hbone.framer import (
    ConnectRequested,
    DataReceived,
    ErrorCode,
    HboneConnection,
    Role,
    StreamAccepted,
    StreamEnded,
    StreamRejected,
    StreamReset,
)


def h2_peer(client: bool) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client, header_encoding="utf-8"))
    conn.initiate_connection()
    return conn


class Pair:
    """Pumps bytes between our connection and an h2 connection; records both sides' events."""

    def __init__(self, ours: HboneConnection, theirs: h2.connection.H2Connection) -> None:
        self.ours, self.theirs = ours, theirs
        self.our_events: list[object] = []
        self.their_events: list[object] = []

    def pump(self) -> None:
        for _ in range(10_000):
            a = self.ours.data_to_send()
            if a:
                evs = self.theirs.receive_data(a)
                self.their_events.extend(evs)
                for e in evs:
                    if isinstance(e, h2.events.DataReceived):
                        self.theirs.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            b = self.theirs.data_to_send()
            if b:
                evs2 = self.ours.receive_data(b, 0.0)
                self.our_events.extend(evs2)
                for e2 in evs2:
                    if isinstance(e2, DataReceived):
                        self.ours.acknowledge_received_data(e2.stream_id, e2.flow_controlled_bytes)
            if not a and not b:
                return
        raise AssertionError("never quiet")


def test_our_client_tunnels_through_an_h2_server() -> None:
    ours = HboneConnection(Role.CLIENT)
    ours.initiate(0.0)
    p = Pair(ours, h2_peer(client=False))
    p.pump()
    sid = ours.open_stream("10.1.2.3:8080", [("baggage", "k8s.cluster.name=east")])
    p.pump()
    req = [e for e in p.their_events if isinstance(e, h2.events.RequestReceived)]
    assert len(req) == 1
    headers = dict(req[0].headers)
    assert headers[":method"] == "CONNECT" and headers[":authority"] == "10.1.2.3:8080"
    assert headers["baggage"] == "k8s.cluster.name=east"
    p.theirs.send_headers(sid, [(":status", "200")])
    p.pump()
    assert any(isinstance(e, StreamAccepted) and e.stream_id == sid for e in p.our_events)
    payload = bytes(range(256)) * 4000  # 1 MB: crosses h2's default 64 KiB windows many times
    ours.send_data(sid, payload, end_stream=True)
    p.pump()
    got = b"".join(e.data for e in p.their_events if isinstance(e, h2.events.DataReceived))
    assert got == payload
    assert any(isinstance(e, h2.events.StreamEnded) for e in p.their_events)
    # h2 sends a large reply within our windows; then half-closes
    for i in range(0, 60_000, 15_000):
        p.theirs.send_data(sid, b"z" * 15_000, end_stream=i == 45_000)
    p.pump()
    assert b"".join(e.data for e in p.our_events if isinstance(e, DataReceived)) == b"z" * 60_000
    assert StreamEnded(sid) in p.our_events
    assert ours.open_stream_count == 0


def test_our_client_sees_h2_rejection_and_reset() -> None:
    ours = HboneConnection(Role.CLIENT)
    ours.initiate(0.0)
    p = Pair(ours, h2_peer(client=False))
    p.pump()
    a = ours.open_stream("10.1.2.3:1")
    b = ours.open_stream("10.1.2.3:2")
    p.pump()
    p.theirs.send_headers(a, [(":status", "503"), ("x-meshfed-reason", "upstream connect refused")], end_stream=True)
    p.theirs.send_headers(b, [(":status", "200")])
    p.pump()
    p.theirs.reset_stream(b, error_code=ErrorCode.CONNECT_ERROR)
    p.pump()
    rej = [e for e in p.our_events if isinstance(e, StreamRejected)]
    assert rej and rej[0].status == 503 and rej[0].reason == "upstream connect refused"
    assert StreamReset(b, ErrorCode.CONNECT_ERROR, remote=True) in p.our_events
    assert not ours.closed


def test_h2_client_tunnels_through_our_server() -> None:
    ours = HboneConnection(Role.SERVER)
    ours.initiate(0.0)
    theirs = h2_peer(client=True)
    p = Pair(ours, theirs)
    p.pump()
    sid = theirs.get_next_available_stream_id()
    theirs.send_headers(sid, [(":method", "CONNECT"), (":authority", "svc.ns.svc.clusterset.local:80")])
    p.pump()
    assert ConnectRequested(sid, "svc.ns.svc.clusterset.local:80", ()) in p.our_events
    ours.respond(sid, 200)
    p.pump()
    resp = [e for e in p.their_events if isinstance(e, h2.events.ResponseReceived)]
    assert resp and dict(resp[0].headers)[":status"] == "200"
    payload = b"q" * 3_000_000
    # h2 respects our advertised (MiB) windows and the SETTINGS we sent
    sent = 0
    while sent < len(payload):
        n = min(theirs.local_flow_control_window(sid), theirs.max_outbound_frame_size, len(payload) - sent)
        assert n > 0
        theirs.send_data(sid, payload[sent:sent + n])
        sent += n
        p.pump()
    theirs.end_stream(sid)
    p.pump()
    assert b"".join(e.data for e in p.our_events if isinstance(e, DataReceived)) == payload
    assert StreamEnded(sid) in p.our_events
    ours.send_data(sid, b"r" * 500_000, end_stream=True)
    p.pump()
    assert b"".join(e.data for e in p.their_events if isinstance(e, h2.events.DataReceived)) == b"r" * 500_000
    assert any(isinstance(e, h2.events.StreamEnded) for e in p.their_events)


def test_h2_client_reset_reaches_us_and_our_reset_reaches_h2() -> None:
    ours = HboneConnection(Role.SERVER)
    ours.initiate(0.0)
    theirs = h2_peer(client=True)
    p = Pair(ours, theirs)
    p.pump()
    a = theirs.get_next_available_stream_id()
    theirs.send_headers(a, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    p.pump()
    b = theirs.get_next_available_stream_id()
    theirs.send_headers(b, [(":method", "CONNECT"), (":authority", "10.0.0.1:81")])
    p.pump()
    ours.respond(a, 200)
    ours.respond(b, 200)
    p.pump()
    theirs.reset_stream(a, error_code=ErrorCode.CANCEL)
    ours.reset_stream(b, ErrorCode.CONNECT_ERROR)
    p.pump()
    assert StreamReset(a, ErrorCode.CANCEL, remote=True) in p.our_events
    resets = [e for e in p.their_events if isinstance(e, h2.events.StreamReset)]
    assert [(e.stream_id, e.error_code) for e in resets] == [(b, ErrorCode.CONNECT_ERROR)]


def test_pings_are_answered_both_ways() -> None:
    ours = HboneConnection(Role.SERVER)
    ours.initiate(0.0)
    theirs = h2_peer(client=True)
    p = Pair(ours, theirs)
    p.pump()
    theirs.ping(b"12345678")
    ours.ping(0.0)
    p.pump()
    assert any(isinstance(e, h2.events.PingAckReceived) and e.ping_data == b"12345678" for e in p.their_events)
    assert any(type(e).__name__ == "PingAcked" for e in p.our_events)
