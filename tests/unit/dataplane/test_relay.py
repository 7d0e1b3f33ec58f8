"""HboneSession lifecycles over an in-memory transport pair (no sockets): a failing stream handler
resets only its stream, finished streams are forgotten, and a draining session closes when its last
stream ends."""

from __future__ import annotations

import asyncio
from typing import Any

from ztunnel.hbone.framer import ErrorCode, Role
from ztunnel.proxy.relay import HboneSession, HboneStream


class MemTransport(asyncio.Transport):
    def __init__(self, loop: asyncio.AbstractEventLoop, proto: asyncio.Protocol) -> None:
        super().__init__()
        self.loop, self.proto = loop, proto
        self.peer: MemTransport | None = None
        self.closing = False

    def write(self, data: Any) -> None:
        if not self.closing and self.peer is not None and not self.peer.closing:
            self.loop.call_soon(self.peer.proto.data_received, bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.loop.call_soon(self.proto.connection_lost, None)
        if self.peer is not None:
            self.peer.close()

    def abort(self) -> None:
        self.close()


class Collect:
    def __init__(self, stream: HboneStream, fail_on_data: bool = False) -> None:
        self.stream, self.fail = stream, fail_on_data
        self.data = b""
        self.ended = False
        self.reset_code: int | None = None

    def on_data(self, data: bytes, flow_bytes: int) -> None:
        if self.fail:
            raise OSError("the socket behind this stream is gone")
        self.data += data
        self.stream.ack(flow_bytes)

    def on_end(self) -> None:
        self.ended = True

    def on_reset(self, error_code: int) -> None:
        self.reset_code = error_code

    def on_writable(self) -> None:
        pass


class Echo(Collect):
    """Server side: writes back what it gets, half-closes when the client does."""

    def on_data(self, data: bytes, flow_bytes: int) -> None:
        self.stream.write(data)
        self.stream.ack(flow_bytes)

    def on_end(self) -> None:
        self.stream.write_eof()


async def pair() -> tuple[HboneSession, HboneSession, list[HboneStream]]:
    loop = asyncio.get_running_loop()
    accepted: list[HboneStream] = []

    def on_connect(_s: HboneSession, st: HboneStream) -> None:
        accepted.append(st)
        st.respond(200)
        st.attach(Echo(st))

    client = HboneSession(Role.CLIENT, loop)
    server = HboneSession(Role.SERVER, loop, on_connect=on_connect)
    tc, ts = MemTransport(loop, client), MemTransport(loop, server)
    tc.peer, ts.peer = ts, tc
    server.connection_made(ts)
    client.connection_made(tc)
    return client, server, accepted


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_failing_handler_resets_only_its_stream() -> None:
    client, _server, _ = await pair()
    bad, good = client.open_stream("10.0.0.1:80"), client.open_stream("10.0.0.2:80")
    await asyncio.wait_for(asyncio.gather(bad.response, good.response), 1)
    hb, hg = Collect(bad, fail_on_data=True), Collect(good)
    bad.attach(hb)
    good.attach(hg)
    bad.write(b"boom")
    good.write(b"fine")
    await settle()
    assert hb.reset_code == ErrorCode.INTERNAL_ERROR       # the failing stream was reset ...
    assert client.stream_errors == 1 and "socket behind this stream" in client.last_stream_error
    assert hg.data == b"fine" and client.usable             # ... and the session carries on
    again = client.open_stream("10.0.0.3:80")
    await asyncio.wait_for(again.response, 1)


async def test_finished_streams_are_forgotten_and_a_draining_session_closes() -> None:
    client, server, accepted = await pair()
    st = client.open_stream("10.0.0.1:80")
    await asyncio.wait_for(st.response, 1)
    h = Collect(st)
    st.attach(h)
    st.write(b"ping")
    st.write_eof()
    await settle()
    assert h.data == b"ping" and h.ended
    assert not client.streams and not server.streams        # both ends forgot the closed stream
    second = client.open_stream("10.0.0.1:80")
    await asyncio.wait_for(second.response, 1)
    client.drain("done")                                    # GOAWAY, but one stream is still open
    await settle()
    assert not client.closed.done()
    second.attach(Collect(second))
    second.write_eof()
    await settle()
    assert len(accepted) == 2
    await asyncio.wait_for(client.closed, 1)                # closed once the last stream ended
