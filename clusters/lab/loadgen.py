"""Open-loop load generator: every request's outcome, and which cluster served it, as JSON lines.

Open loop means request i starts at `t0 + i / rate` whether or not earlier ones finished, so a
stalled backend shows up as failures and latency instead of silently slowing the generator down
(the coordinated-omission trap of closed-loop tools). By default each request uses a *new*
connection: that is what failover figures are about ("new connections served by the next
cluster"). With `--keep-alive` requests reuse idle HTTP/1.1 connections (a pool that grows with
concurrency), each retired after `--max-requests-per-connection` requests, the way a client's
connection pool behaves: an L4 mesh pins a kept connection to the backend it was opened to, so
failover and failback happen as connections break or retire (`reused` says which requests rode
an old connection).

Outcomes, as the chaos figures count them:
- `ok`: a complete 2xx response — or, with `--ok-status CODE`, a response with exactly that status
  (a probe of a method a policy denies is right when it gets 403; a 2xx would be the failure);
- `fail`: the request provably was not served — connect refused/reset/unreachable or timed out
  before the request was written, or any other response (the server said no);
- `indeterminate`: the request was written but no complete answer came (reset or timeout
  after sending): it may or may not have been served.

`classify()` is the pure decision; the I/O around it only reports what happened.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass
from typing import IO

OK, FAIL, INDETERMINATE = "ok", "fail", "indeterminate"


@dataclass(frozen=True, slots=True)
class RequestResult:
    seq: int
    start_s: float         # wall clock when the request was due
    latency_ms: float
    outcome: str
    status: int = 0
    cluster: str = ""
    pod: str = ""
    peer_identity: str = ""
    error: str = ""
    reused: bool = False   # sent on a connection an earlier request opened (--keep-alive)


def classify(connected: bool, request_sent: bool, status: int, error: str, ok_status: int = 0) -> str:
    """ok / fail / indeterminate from what the client saw (see the module docstring). `ok_status`:
    the one status that is right (0: any 2xx)."""
    if status:
        right = status == ok_status if ok_status else 200 <= status < 300
        return OK if right else FAIL
    if not connected or not request_sent:
        return FAIL
    return INDETERMINATE if error else FAIL


async def _socks5_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int) -> None:
    writer.write(b"\x05\x01\x00")
    await writer.drain()
    if await reader.readexactly(2) != b"\x05\x00":
        raise ConnectionError("SOCKS5 proxy refused our no-auth greeting")
    name = host.encode()
    writer.write(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", port))
    await writer.drain()
    rep = await reader.readexactly(4)
    if rep[1] != 0:
        raise ConnectionRefusedError(f"SOCKS5 CONNECT to {host}:{port} failed with code {rep[1]}")
    skip = {1: 4, 4: 16}.get(rep[3])
    if skip is None:
        skip = (await reader.readexactly(1))[0]
    await reader.readexactly(skip + 2)


@dataclass
class Conn:
    """An open HTTP/1.1 connection and how many requests it carried."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    requests: int = 0


class Pool:
    """Idle keep-alive connections (LIFO, like most client pools). Invariants: a connection is
    either idle here or used by exactly one request; a connection that saw an error, a
    `Connection: close` or its `max_requests`-th request is closed, never returned."""

    def __init__(self, max_requests: int) -> None:
        self.max_requests = max_requests
        self.idle: list[Conn] = []

    def take(self) -> Conn | None:
        while self.idle:
            c = self.idle.pop()
            if not c.writer.is_closing() and not c.reader.at_eof():
                return c
            c.writer.close()
        return None

    def give_back(self, c: Conn, keep: bool) -> None:
        if keep and c.requests < self.max_requests and not c.writer.is_closing():
            self.idle.append(c)
        else:
            c.writer.close()

    def close(self) -> None:
        for c in self.idle:
            c.writer.close()
        self.idle.clear()


async def _open(host: str, port: int, socks: tuple[str, int] | None) -> Conn:
    if socks:
        reader, writer = await asyncio.open_connection(*socks)
        await _socks5_connect(reader, writer, host, port)
    else:
        reader, writer = await asyncio.open_connection(host, port, family=socket.AF_INET)
    return Conn(reader, writer)


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


async def one_request(seq: int, host: str, port: int, path: str, timeout_s: float,
                      socks: tuple[str, int] | None = None, pool: Pool | None = None, method: str = "GET",
                      ok_status: int = 0) -> RequestResult:
    due = time.time()
    t0 = time.monotonic()
    connected = sent = reused = False
    status = 0
    error = ""
    body: dict[str, object] = {}
    conn: Conn | None = pool.take() if pool is not None else None
    keep = False
    try:
        async with asyncio.timeout(timeout_s):
            if conn is None:
                conn = await _open(host, port, socks)
            else:
                reused = True
            connected = True
            conn.requests += 1
            header = "keep-alive" if pool is not None else "close"
            # a body-carrying method says its (empty) body's length: a server must not wait for one
            length_header = "Content-Length: 0\r\n" if method in ("POST", "PUT", "PATCH") else ""
            conn.writer.write(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: {header}\r\n"
                              f"{length_header}\r\n".encode())
            await conn.writer.drain()
            sent = True
            head = await conn.reader.readuntil(b"\r\n\r\n")
            status_line = head.split(b"\r\n", 1)[0].split(b" ")
            code = int(status_line[1])
            length = 0
            closing = False
            for line in head.split(b"\r\n")[1:]:
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
                elif line.lower().replace(b" ", b"") == b"connection:close":
                    closing = True
            raw = await conn.reader.readexactly(length) if length and method != "HEAD" else b""
            status = code
            keep = pool is not None and not closing
            with contextlib.suppress(ValueError):
                body = json.loads(raw or b"{}")
    except TimeoutError:
        error = "timeout"
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
        error = type(e).__name__ + (f": {e}" if str(e) else "")
    finally:
        if conn is not None:
            if pool is not None:
                pool.give_back(conn, keep and not error)
            else:
                conn.writer.close()
    return RequestResult(
        seq=seq, start_s=due, latency_ms=(time.monotonic() - t0) * 1000.0,
        outcome=classify(connected, sent, status, error, ok_status), status=status,
        cluster=str(body.get("cluster", "")), pod=str(body.get("pod", "")),
        peer_identity=str(body.get("peer_identity", "")), error=error, reused=reused,
    )


async def run(host: str, port: int, rate_per_s: float, duration_s: float, out: IO[str], path: str = "/",
              timeout_s: float = 2.0, socks: tuple[str, int] | None = None,
              keep_alive_max_requests: int = 0, method: str = "GET", ok_status: int = 0) -> int:
    """Fire requests open-loop until `duration_s` (<= 0: until SIGTERM); returns requests fired.
    `keep_alive_max_requests` > 0 reuses connections, each for at most that many requests."""
    pool = Pool(keep_alive_max_requests) if keep_alive_max_requests > 0 else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    interval_s = 1.0 / rate_per_s
    t0 = loop.time()
    seq = 0
    async with asyncio.TaskGroup() as tg:
        while not stop.is_set():
            due = t0 + seq * interval_s
            if duration_s > 0 and due - t0 >= duration_s:
                break
            delay = due - loop.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    break

            async def fire(n: int) -> None:
                o = await one_request(n, host, port, path, timeout_s, socks, pool, method, ok_status)
                out.write(json.dumps(asdict(o)) + "\n")
                out.flush()

            tg.create_task(fire(seq))
            seq += 1
    if pool is not None:
        pool.close()
    return seq


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="open-loop HTTP load generator (JSONL outcomes)")
    ap.add_argument("url", help="http://HOST:PORT/PATH")
    ap.add_argument("--rate", type=float, default=20.0, help="requests per second")
    ap.add_argument("--duration-s", type=float, default=0.0, help="0 = until SIGTERM")
    ap.add_argument("--timeout-s", type=float, default=2.0)
    ap.add_argument("--out", default="-", help="JSONL file (default stdout)")
    ap.add_argument("--socks", default="", help="HOST:PORT of a SOCKS5 proxy (the node ztunnel's :15080)")
    ap.add_argument("--keep-alive", action="store_true", help="reuse connections (default: one per request)")
    ap.add_argument("--max-requests-per-connection", type=int, default=100,
                    help="with --keep-alive: retire a connection after this many requests")
    ap.add_argument("--method", default="GET", choices=METHODS, help="the request method (default GET)")
    ap.add_argument("--ok-status", type=int, default=0,
                    help="the one status that counts as ok (default 0: any 2xx), e.g. 403 for a denied method")
    a = ap.parse_args(argv)
    rest = a.url.split("://", 1)[-1]
    hostport, _, path = rest.partition("/")
    host, _, port_s = hostport.partition(":")
    socks = None
    if a.socks:
        sh, _, sp = a.socks.rpartition(":")
        socks = (sh, int(sp))
    out = sys.stdout if a.out == "-" else open(a.out, "a", buffering=1)  # noqa: SIM115
    try:
        asyncio.run(run(host, int(port_s or 80), a.rate, a.duration_s, out, "/" + path, a.timeout_s, socks,
                        a.max_requests_per_connection if a.keep_alive else 0, a.method, a.ok_status))
    finally:
        if out is not sys.stdout:
            out.close()


if __name__ == "__main__":
    main()
