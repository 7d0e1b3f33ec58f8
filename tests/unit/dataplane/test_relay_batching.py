"""Fewer, larger writes per new tunnel (a double-HBONE connection pays per message through the
gateway): everything handling one read makes a session write leaves in one transport write, and a
CONNECT opened with `flush=False` leaves with the next write. In-memory transport, no sockets."""

from __future__ import annotations

import asyncio
from typing import Any

from ztunnel.hbone import framer as hbone
from ztunnel.hbone.framer import FLAG_ACK, HEADERS, PREFACE, SETTINGS, HboneConnection, Role
from ztunnel.proxy.relay import HboneSession, HboneStream


class Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


def client_hello(with_connect: bool) -> bytes:
    """The bytes an HBONE client sends first: preface + SETTINGS (+ its first CONNECT)."""
    c = HboneConnection(Role.CLIENT)
    c.initiate(0.0)
    if with_connect:
        c.open_stream("10.0.0.1:8080")
    return c.data_to_send()


def kinds(data: bytes) -> list[tuple[int, int]]:
    return [(t, f) for t, f, _sid, _p in hbone.frames_of(data)]


async def settle(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def server(on_connect: Any) -> tuple[HboneSession, Recorder]:
    s = HboneSession(Role.SERVER, asyncio.get_running_loop(), on_connect=on_connect)
    t = Recorder()
    s.connection_made(t)
    return s, t


async def test_answers_to_the_preface_and_a_connect_leave_in_one_write() -> None:
    """The client's preface, SETTINGS and a CONNECT answered at once: ACK and answer, one write."""
    s, t = server(lambda _s, st: st.respond(403, "denied"))
    await settle()  # our own preface leaves at once (connection_made)
    assert len(t.writes) == 1 and kinds(t.writes[0])[0] == (SETTINGS, 0)
    s.data_received(client_hello(with_connect=True))
    assert len(t.writes) == 2
    frames = kinds(t.writes[1])
    assert frames[0] == (SETTINGS, FLAG_ACK) and frames[-1][0] == HEADERS
    s.abort()


async def test_client_preface_leaves_at_once() -> None:
    c = HboneSession(Role.CLIENT, asyncio.get_running_loop())
    t = Recorder()
    c.connection_made(t)
    assert len(t.writes) == 1 and t.writes[0].startswith(PREFACE)
    c.abort()


async def test_writes_made_while_handling_one_read_leave_in_one_write() -> None:
    """Handlers answering and sending data from inside `data_received`: one transport write."""
    def on_connect(_s: HboneSession, st: HboneStream) -> None:
        st.respond(200)
        st.write(b"server speaks first")
        st.write(b" in two writes")

    s, t = server(on_connect)
    await settle()
    t.writes.clear()  # our preface
    c = HboneConnection(Role.CLIENT)
    c.initiate(0.0)
    c.open_stream("10.0.0.1:8080")
    sid2 = c.open_stream("10.0.0.2:8080")
    s.data_received(c.data_to_send())
    assert len(t.writes) == 1
    sids = [sid for _t, _f, sid, _p in hbone.frames_of(t.writes[0])]
    assert sid2 in sids and 1 in sids
    s.abort()


async def test_open_stream_without_flush_leaves_with_the_next_write() -> None:
    c = HboneSession(Role.CLIENT, asyncio.get_running_loop())
    t = Recorder()
    c.connection_made(t)
    t.writes.clear()
    st = c.open_stream("svc.example:443", flush=False)
    assert t.writes == []
    st.write(b"client hello")
    assert len(t.writes) == 1
    assert [k for k, _f in kinds(t.writes[0])] == [HEADERS, hbone.DATA]
    c.abort()


async def test_a_pipelining_peers_200_leaves_with_the_sockets_first_answer() -> None:
    """A peer that sent data behind its CONNECT (the gateway's inner ClientHello) gets the 200 with
    the relayed socket's first bytes, in one write; a peer that did not gets it at once."""
    from ztunnel.proxy.relay import PlainRelay

    streams: list[HboneStream] = []
    s, t = server(lambda _s, st: streams.append(st))
    await settle()
    c = HboneConnection(Role.CLIENT)
    c.initiate(0.0)
    sid = c.open_stream("10.0.0.1:15008")
    c.send_data(sid, b"client hello")
    c.open_stream("10.0.0.1:15009")
    s.data_received(c.data_to_send())
    pipelined, silent = streams
    assert pipelined.peer_spoke_first and not silent.peer_spoke_first
    t.writes.clear()
    relay = PlainRelay()
    sock = Recorder()
    relay.connection_made(sock)
    relay.answer_with_first_reply()
    relay.bind(pipelined)
    assert sock.writes == [b"client hello"] and t.writes == []     # relayed; nothing answered yet
    relay.data_received(b"server hello")
    assert len(t.writes) == 1
    assert [k for k, _f in kinds(t.writes[0])] == [HEADERS, hbone.DATA]
    s.abort()
