"""The lab's demo workload: an HTTP echo that says who served the request and who asked.

Every response is JSON: the serving cluster, namespace, pod and node, and the caller's *verified*
SPIFFE identity. The server never sees TLS (the node ztunnel terminates mTLS), so the identity
comes from the inbound ztunnel the way Istio's ztunnel hands it to a sandwiched waypoint: a PROXY
protocol v2 header in front of the connection, with the peer's SPIFFE URI in TLV type 0xD0. The
header is optional (a connection that does not start with the v2 signature is plain HTTP, and the
identity is reported as ""), so the server also works with no mesh at all. Pods that want the
header carry the label `networking.meshfed.dev/inbound-proxy-protocol: v2` (see `PROXY_LABEL`).

Model-server mode (`--model NAME`): an OpenAI-style model server for the inference demo.
`POST /v1/completions` and `/v1/chat/completions` take a JSON body; a request naming another model
gets 404; requests are served `--model-concurrency` at a time, each taking `--model-latency-ms`,
the rest wait in a queue; `GET /metrics` reports that queue the way vLLM does
(`vllm:num_requests_waiting`, `vllm:num_requests_running`, labelled `model_name`) plus
`meshfed_model_info{model=...} 1`, which meshfed's endpoint picker reads.

Every echo answer carries the request's headers too, so a test can see what a waypoint changed.

Behaviour is switchable at run time (healthy, 503, slow, hang) through a control endpoint: a tiny
HTTP server on a Unix socket in the lab's state directory (`GET /healthz`, `GET /behaviour`,
`PUT /behaviour/<Mode>`). A Unix socket crosses network namespaces, so the lab's kubelet can probe
readiness without a route into the pod, and nothing on the pod's network can flip it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import struct
import time
from dataclasses import dataclass

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
TLV_PEER_IDENTITY = 0xD0
PROXY_LABEL = "networking.meshfed.dev/inbound-proxy-protocol"
BEHAVIOURS = ("Healthy", "Error503", "Slow", "Hang")
MAX_HEADER_BYTES = 16 * 1024


class ProxyHeaderError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    source: str
    destination: str
    peer_identity: str


def build_proxy_v2(src: tuple[str, int], dst: tuple[str, int], peer_identity: str) -> bytes:
    """A PROXY v2 header (TCP over IPv4) with the peer identity TLV; used by tests and the lab."""
    addrs = (ipaddress.IPv4Address(src[0]).packed + ipaddress.IPv4Address(dst[0]).packed
             + struct.pack("!HH", src[1], dst[1]))
    ident = peer_identity.encode()
    tlv = struct.pack("!BH", TLV_PEER_IDENTITY, len(ident)) + ident if ident else b""
    body = addrs + tlv
    return PROXY_V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def parse_proxy_v2(header: bytes, body: bytes) -> ProxyInfo:
    """Parse the 16-byte fixed part and its body (pure)."""
    if header[:12] != PROXY_V2_SIGNATURE:
        raise ProxyHeaderError("not a PROXY v2 header")
    ver_cmd, fam = header[12], header[13]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"PROXY version {ver_cmd >> 4} is not 2")
    src = dst = ""
    offset = 0
    if fam == 0x11 and len(body) >= 12:
        s, d = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
        sp, dp = struct.unpack("!HH", body[8:12])
        src, dst, offset = f"{s}:{sp}", f"{d}:{dp}", 12
    elif fam == 0x21 and len(body) >= 36:
        s6, d6 = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
        sp, dp = struct.unpack("!HH", body[32:36])
        src, dst, offset = f"[{s6}]:{sp}", f"[{d6}]:{dp}", 36
    identity = ""
    while offset + 3 <= len(body):
        t, n = body[offset], struct.unpack("!H", body[offset + 1:offset + 3])[0]
        value = body[offset + 3:offset + 3 + n]
        if len(value) != n:
            raise ProxyHeaderError("truncated TLV in PROXY header")
        if t == TLV_PEER_IDENTITY:
            identity = value.decode("utf-8", "replace")
        offset += 3 + n
    return ProxyInfo(src, dst, identity)


class DemoServer:
    """Invariants: `behaviour` is one of BEHAVIOURS; `ready` is set once the data port listens."""

    def __init__(self, cluster: str, namespace: str, pod: str, node: str, behaviour: str = "Healthy",
                 slow_ms: float = 500.0, model: str = "", model_latency_ms: float = 50.0,
                 model_concurrency: int = 1) -> None:
        self.cluster, self.namespace, self.pod, self.node = cluster, namespace, pod, node
        self.behaviour = behaviour
        self.slow_ms = slow_ms
        self.ready = asyncio.Event()
        self.served = 0
        self.address = ""
        self.model = model
        self.model_latency_ms = model_latency_ms
        self._slots = asyncio.Semaphore(max(1, model_concurrency))
        self.waiting = 0
        self.running = 0

    def set_behaviour(self, mode: str) -> None:
        for b in BEHAVIOURS:
            if b.lower() == mode.lower() or (mode == "503" and b == "Error503"):
                self.behaviour = b
                return
        raise ValueError(f"unknown behaviour {mode!r}; one of {', '.join(BEHAVIOURS)}")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        peer_addr = f"{peer[0]}:{peer[1]}" if peer else ""
        identity = ""
        try:
            # HTTP starts with a method letter; PROXY v2 starts with CR: one byte tells them apart.
            prefix = await reader.read(1)
            if not prefix:
                return
            if prefix == b"\r":
                fixed = prefix + await reader.readexactly(15)
                n = struct.unpack("!H", fixed[14:16])[0]
                info = parse_proxy_v2(fixed, await reader.readexactly(n))
                identity, peer_addr = info.peer_identity, info.source or peer_addr
                prefix = b""
            while True:
                request = await read_request(reader, prefix)
                prefix = b""
                if request is None:
                    return
                if self.model and (request.path.startswith("/v1/") or request.path == "/metrics"):
                    await self._model(writer, request, identity)
                else:
                    await self._respond(writer, request.method, request.path, identity, peer_addr,
                                        request.keep_alive, request.headers)
                if not request.keep_alive:
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ProxyHeaderError, ValueError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, writer: asyncio.StreamWriter, method: str, path: str, identity: str,
                       peer_addr: str, keep_alive: bool, headers: dict[str, str] | None = None) -> None:
        behaviour = self.behaviour
        if behaviour == "Hang":
            await asyncio.Event().wait()  # never answers; the caller times out (or gives up)
        if behaviour == "Slow":
            await asyncio.sleep(self.slow_ms / 1000.0)
        status = 503 if behaviour == "Error503" else 200
        self.served += 1
        body = json.dumps({
            "cluster": self.cluster, "namespace": self.namespace, "pod": self.pod, "node": self.node,
            "address": self.address, "peer_identity": identity, "peer_address": peer_addr,
            "method": method, "path": path, "behaviour": behaviour, "served_at_s": time.time(),
            "headers": headers or {},
        }).encode()
        reason = "OK" if status == 200 else "Service Unavailable"
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nX-Served-By: {self.cluster}/{self.pod}\r\n"
                f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
        writer.write(head.encode() + body)
        await writer.drain()

    async def _model(self, writer: asyncio.StreamWriter, request: Request, identity: str) -> None:
        """The model-server endpoints (see the module docstring)."""
        if request.path == "/metrics":
            label = f'model_name="{self.model}"'
            text = (f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{{label}}} {self.waiting}\n"
                    f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{{label}}} {self.running}\n"
                    f'meshfed_model_info{{model="{self.model}"}} 1\n')
            _write(writer, 200, text.encode(), request.keep_alive, "text/plain; version=0.0.4")
            await writer.drain()
            return
        if self.behaviour == "Error503":
            _write(writer, 503, b'{"error": "unavailable"}', request.keep_alive)
            await writer.drain()
            return
        try:
            data = json.loads(request.body or b"{}")
        except ValueError:
            data = None
        if not isinstance(data, dict):
            _write(writer, 400, b'{"error": "the body must be a JSON object"}', request.keep_alive)
            await writer.drain()
            return
        asked = str(data.get("model") or self.model)
        if asked != self.model:
            _write(writer, 404, json.dumps({"error": f"model {asked} not found; this server serves {self.model}"})
                   .encode(), request.keep_alive)
            await writer.drain()
            return
        self.waiting += 1
        try:
            async with self._slots:
                self.waiting -= 1
                self.running += 1
                try:
                    await asyncio.sleep(self.model_latency_ms / 1000.0)
                finally:
                    self.running -= 1
        except BaseException:
            raise
        self.served += 1
        body = json.dumps({
            "id": f"cmpl-{self.pod}-{self.served}", "object": "text_completion", "model": self.model,
            "choices": [{"index": 0, "text": f"hello from {self.model}", "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5},
            "cluster": self.cluster, "pod": self.pod, "peer_identity": identity,
        }).encode()
        _write(writer, 200, body, request.keep_alive)
        await writer.drain()

    async def handle_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            req = await read_request(reader)
            if req is None:
                return
            method, path = req.method, req.path
            code, payload = 200, dict[str, object]()
            if path == "/healthz":
                code = 200 if self.ready.is_set() else 503
                payload = {"ready": self.ready.is_set(), "pid": os.getpid()}
            elif path == "/behaviour" and method == "GET":
                payload = {"behaviour": self.behaviour}
            elif path.startswith("/behaviour/") and method in ("PUT", "POST"):
                try:
                    self.set_behaviour(path.rsplit("/", 1)[1])
                    payload = {"behaviour": self.behaviour}
                except ValueError as e:
                    code, payload = 400, {"error": str(e)}
            elif path == "/stats":
                payload = {"served": self.served, "behaviour": self.behaviour}
            else:
                code, payload = 404, {"error": f"no such control path {path}"}
            body = json.dumps(payload).encode()
            writer.write(f"HTTP/1.1 {code} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    keep_alive: bool
    headers: dict[str, str]
    body: bytes


MAX_BODY_BYTES = 1 << 20


async def read_request(reader: asyncio.StreamReader, prefix: bytes = b"") -> Request | None:
    """Read one HTTP/1.1 request (head and body, bounded); None at a clean end of stream."""
    try:
        head = prefix + await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial and not prefix:
            return None
        raise
    except asyncio.LimitOverrunError:
        raise ValueError("request head too large") from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise ValueError("bad request line")
    method, path, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "0") or 0)
    if length > MAX_BODY_BYTES:
        raise ValueError("request body too large")
    body = await reader.readexactly(length) if length else b""
    conn = headers.get("connection", "").lower()
    keep_alive = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
    return Request(method, path, keep_alive, headers, body)


def _write(writer: asyncio.StreamWriter, status: int, body: bytes, keep_alive: bool,
           content_type: str = "application/json") -> None:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}.get(status, "X")
    writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                 f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n".encode() + body)


async def serve(args: argparse.Namespace) -> None:
    server = DemoServer(args.cluster, args.namespace, args.pod, args.node, args.behaviour, args.slow_ms,
                        args.model, args.model_latency_ms, args.model_concurrency)
    server.address = args.address
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    control = None
    if args.control:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.control)
        control = await asyncio.start_unix_server(server.handle_control, path=args.control)
    data = await asyncio.start_server(server.handle, host=args.listen, port=args.port, reuse_address=True,
                                      limit=MAX_HEADER_BYTES, family=socket.AF_INET)
    server.ready.set()
    async with data:
        await stop.wait()
    if control is not None:
        control.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.control)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="meshfed lab demo echo server")
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--pod", required=True)
    ap.add_argument("--node", default="")
    ap.add_argument("--address", default="", help="the pod IP (reported in responses)")
    ap.add_argument("--listen", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--behaviour", default="Healthy", choices=BEHAVIOURS)
    ap.add_argument("--slow-ms", type=float, default=500.0)
    ap.add_argument("--control", default="", help="Unix socket path of the control endpoint")
    ap.add_argument("--model", default="", help="serve this model (OpenAI-style /v1/completions) instead of echoing")
    ap.add_argument("--model-latency-ms", type=float, default=50.0, help="time each completion takes")
    ap.add_argument("--model-concurrency", type=int, default=1, help="completions served at once; others queue")
    asyncio.run(serve(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
