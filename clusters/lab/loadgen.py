"""Open-loop load generator: every request's outcome, and which cluster served it, as JSON lines.

Open loop means request i starts at `t0 + i / rate` whether or not earlier ones finished, so a
stalled backend shows up as failures and latency instead of silently slowing the generator down
(the coordinated-omission trap of closed-loop tools). Each request uses a *new* connection: that
is what failover figures are about ("new connections served by the next cluster").

Outcomes, as the chaos figures count them:
- `ok`: a complete 2xx response;
- `fail`: the request provably was not served — connect refused/reset/unreachable or timed out
  before the request was written, or a non-2xx response (the server said no);
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


def classify(connected: bool, request_sent: bool, status: int, error: str) -> str:
    """ok / fail / indeterminate from what the client saw (see the module docstring)."""
    if status:
        return OK if 200 <= status < 300 else FAIL
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


async def one_request(seq: int, host: str, port: int, path: str, timeout_s: float,
                      socks: tuple[str, int] | None = None) -> RequestResult:
    due = time.time()
    t0 = time.monotonic()
    connected = sent = False
    status = 0
    error = ""
    body: dict[str, object] = {}
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            if socks:
                reader, writer = await asyncio.open_connection(*socks)
                await _socks5_connect(reader, writer, host, port)
            else:
                reader, writer = await asyncio.open_connection(host, port, family=socket.AF_INET)
            connected = True
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            sent = True
            head = await reader.readuntil(b"\r\n\r\n")
            status_line = head.split(b"\r\n", 1)[0].split(b" ")
            code = int(status_line[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            raw = await reader.readexactly(length) if length else b""
            status = code
            with contextlib.suppress(ValueError):
                body = json.loads(raw or b"{}")
    except TimeoutError:
        error = "timeout"
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
        error = type(e).__name__ + (f": {e}" if str(e) else "")
    finally:
        if writer is not None:
            writer.close()
    return RequestResult(
        seq=seq, start_s=due, latency_ms=(time.monotonic() - t0) * 1000.0,
        outcome=classify(connected, sent, status, error), status=status,
        cluster=str(body.get("cluster", "")), pod=str(body.get("pod", "")),
        peer_identity=str(body.get("peer_identity", "")), error=error,
    )


async def run(host: str, port: int, rate_per_s: float, duration_s: float, out: IO[str], path: str = "/",
              timeout_s: float = 2.0, socks: tuple[str, int] | None = None) -> int:
    """Fire requests open-loop until `duration_s` (<= 0: until SIGTERM); returns requests fired."""
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
                o = await one_request(n, host, port, path, timeout_s, socks)
                out.write(json.dumps(asdict(o)) + "\n")
                out.flush()

            tg.create_task(fire(seq))
            seq += 1
    return seq


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="open-loop HTTP load generator (JSONL outcomes)")
    ap.add_argument("url", help="http://HOST:PORT/PATH")
    ap.add_argument("--rate", type=float, default=20.0, help="requests per second")
    ap.add_argument("--duration-s", type=float, default=0.0, help="0 = until SIGTERM")
    ap.add_argument("--timeout-s", type=float, default=2.0)
    ap.add_argument("--out", default="-", help="JSONL file (default stdout)")
    ap.add_argument("--socks", default="", help="HOST:PORT of a SOCKS5 proxy (the node ztunnel's :15080)")
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
        asyncio.run(run(host, int(port_s or 80), a.rate, a.duration_s, out, "/" + path, a.timeout_s, socks))
    finally:
        if out is not sys.stdout:
            out.close()


if __name__ == "__main__":
    main()
