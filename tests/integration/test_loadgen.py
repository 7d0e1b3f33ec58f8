"""The open-loop load generator against real demo servers on loopback: new connections per request
(the default) and kept connections (`--keep-alive`), which an L4 mesh pins to one backend until
they break or retire — the chaos experiments' two traffic shapes."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from collections.abc import AsyncIterator

import pytest

from clusters.lab.demo_server import DemoServer
from clusters.lab.loadgen import FAIL, INDETERMINATE, OK, run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class Counted(DemoServer):
    """A demo server that counts the connections it accepted."""

    def __init__(self, pod: str) -> None:
        super().__init__("east", "shop", pod, "node-1")
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await super().handle(reader, writer)


@pytest.fixture()
async def server() -> AsyncIterator[tuple[Counted, int, asyncio.Server]]:
    srv = Counted("checkout-0")
    s = await asyncio.start_server(srv.handle, "127.0.0.1", 0, family=socket.AF_INET)
    port = s.sockets[0].getsockname()[1]
    yield srv, port, s
    s.close()


def _records(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


async def test_new_connection_per_request(server: tuple[Counted, int, asyncio.Server]) -> None:
    srv, port, _ = server
    out = io.StringIO()
    fired = await run("127.0.0.1", port, 100.0, 0.3, out, timeout_s=1.0)
    recs = _records(out)
    assert len(recs) == fired >= 25
    assert all(r["outcome"] == OK and r["pod"] == "checkout-0" and r["reused"] is False for r in recs)
    assert srv.connections == len(recs)


async def test_keep_alive_reuses_connections_and_retires_them(server: tuple[Counted, int, asyncio.Server]) -> None:
    srv, port, _ = server
    out = io.StringIO()
    fired = await run("127.0.0.1", port, 100.0, 0.5, out, timeout_s=1.0, keep_alive_max_requests=10)
    recs = _records(out)
    assert len(recs) == fired >= 40
    assert all(r["outcome"] == OK for r in recs)
    reused = sum(1 for r in recs if r["reused"])
    assert reused >= len(recs) // 2, f"only {reused} of {len(recs)} requests rode a kept connection"
    # every connection carried at most 10 requests: at least len/10 connections were opened
    assert len(recs) // 10 <= srv.connections < len(recs)


async def test_requests_on_kept_connections_to_a_backend_that_stops_answering_are_not_ok(
        server: tuple[Counted, int, asyncio.Server]) -> None:
    """A backend that hangs under kept connections: a request written on one gets no answer —
    indeterminate (it may have been served), never counted ok, and says why."""
    srv, port, _ = server
    out = io.StringIO()

    async def kill_midway() -> None:
        await asyncio.sleep(0.25)
        srv.set_behaviour("Hang")          # requests on open connections get no answer

    task = asyncio.create_task(kill_midway())
    await run("127.0.0.1", port, 50.0, 0.6, out, timeout_s=0.3, keep_alive_max_requests=1000)
    await task
    recs = _records(out)
    outcomes = {str(r["outcome"]) for r in recs}
    assert OK in outcomes and (INDETERMINATE in outcomes or FAIL in outcomes), outcomes
    late = [r for r in recs if r["outcome"] != OK]
    assert all(r["error"] for r in late)


async def test_a_method_probe_counts_only_the_expected_status_as_ok() -> None:
    """DELETE with `ok_status=403` (a method a waypoint denies): the refusal is ok, a 2xx a failure;
    the request line carries the method and the path."""
    seen: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head.split(b"\r\n", 1)[0])
        status = b"403 Forbidden" if len(seen) % 2 else b"200 OK"   # every other one gets through
        writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 19\r\n\r\nRBAC: access denied")
        await writer.drain()
        writer.close()

    s = await asyncio.start_server(answer, "127.0.0.1", 0, family=socket.AF_INET)
    port = s.sockets[0].getsockname()[1]
    try:
        out = io.StringIO()
        await run("127.0.0.1", port, 50.0, 0.2, out, path="/orders/7", timeout_s=1.0, method="DELETE", ok_status=403)
    finally:
        s.close()
    recs = _records(out)
    assert len(recs) >= 6 and set(seen) == {b"DELETE /orders/7 HTTP/1.1"}
    by_status = {st: {r["outcome"] for r in recs if r["status"] == st} for st in {r["status"] for r in recs}}
    assert by_status == {403: {OK}, 200: {FAIL}}
