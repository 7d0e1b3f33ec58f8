"""The node proxy's DNS listeners and forwarder: the sockets around `ztunnel.dns.answer`.

One port, two transports (DNS is served on both): UDP datagrams and TCP connections carrying
2-byte length-prefixed messages (RFC 1035 §4.2.2, several queries per connection, answered in
order). Each query goes through `answer.decide`; what it says to forward is sent, unchanged, to the
upstream resolvers in order (UDP for a UDP client, TCP for a TCP client, each attempt bounded by
`upstream_timeout_s`) and the first reply that belongs to the query is passed back; when none
answers the client gets SERVFAIL.

Where the upstreams come from (`--dns-upstream`): explicit `IP[:PORT]`s, or the nameservers of
/etc/resolv.conf (the DaemonSet runs on the host network with dnsPolicy ClusterFirstWithHostNet,
so that is kube-dns), or none — then a name the mesh does not know gets `--dns-unanswered`.
The proxy's own upstream queries leave from the node's namespace, which the pod capture rules do
not touch, so they are never redirected back to the proxy.

Who is answered (`ztunnel.dns.clients`): the node's captured pods (`enrolled()`, the addresses the
capture rules redirect), the networks of `DnsOptions.allow_from` (`--dns-allow-from`), and the
node itself on loopback; any other source gets silence over UDP and a closed connection over TCP,
counted as `refused_source` (and logged, the 1st, 2nd, 4th, 8th... time).

Bounds on what peers can make us hold: a UDP datagram is one read of at most 64 KiB; a TCP
message at most 65535 bytes (its prefix); at most `max_inflight` forwarded UDP queries wait for an
upstream (more get SERVFAIL at once) and at most `max_tcp_connections` TCP clients are served
(more are closed), each closed after `tcp_idle_timeout_s` without a query, and as soon as an answer
cannot be written within `tcp_idle_timeout_s` (a client that pipelines queries and never reads
would otherwise hold its slot for ever). The kernel's send buffer of a TCP client is capped at
`TCP_SEND_BUFFER_BYTES` (DNS answers are small; autotuned it grows to megabytes, which a client
that never reads makes us fill, and it took that many answers before the write timeout could
start).

Ownership: every task this server starts is in `_tasks` and cancelled by `close()`; `ready` is
set once both listeners are bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztunnel.dns.answer import (
    DEFAULT_TTL_S,
    DnsTable,
    Drop,
    Forward,
    Reply,
    ReplyCache,
    Unanswered,
    failure_reply,
    upstream_reply,
)
from ztunnel.dns.clients import DnsClients

RESOLV_CONF = Path("/etc/resolv.conf")
PORT_PAIR_ATTEMPTS = 8       # port 0: free UDP ports tried until one is free for TCP too
MAX_NAMESERVERS = 3          # glibc reads at most three (MAXNS)
TCP_SEND_BUFFER_BYTES = 64 * 1024   # per TCP client: hundreds of answers (the kernel doubles it)

logger = logging.getLogger(__name__)


async def bind_udp_and_tcp(host: str, port: int, udp: Callable[[], asyncio.DatagramProtocol],
                           tcp: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                           ) -> tuple[asyncio.DatagramTransport, asyncio.Server, int]:
    """A DNS server's two sockets on one port: UDP, then TCP on the same number. With port 0 the
    kernel picks a free UDP port, which may be taken for TCP by someone else (seen in CI): then
    another UDP port is tried, `PORT_PAIR_ATTEMPTS` times in all."""
    loop = asyncio.get_running_loop()
    attempts = PORT_PAIR_ATTEMPTS if port == 0 else 1
    for attempt in range(attempts):
        transport, _ = await loop.create_datagram_endpoint(udp, local_addr=(host, port))
        bound = int(transport.get_extra_info("sockname")[1])
        try:
            server = await asyncio.start_server(tcp, host, bound, reuse_address=True)
        except OSError as e:
            transport.close()
            if e.errno != errno.EADDRINUSE or attempt == attempts - 1:
                raise
            continue
        return transport, server, bound
    raise AssertionError("unreachable: the last attempt raises or returns")


class DnsConfigError(ValueError):
    """A DNS flag the proxy cannot use; the message names the fix."""


@dataclass(frozen=True, slots=True)
class DnsOptions:
    upstreams: tuple[tuple[str, int], ...] = ()
    unanswered: Unanswered = Unanswered.SERVFAIL
    ttl_s: int = DEFAULT_TTL_S
    upstream_timeout_s: float = 2.0
    max_inflight: int = 256
    max_tcp_connections: int = 128
    tcp_idle_timeout_s: float = 10.0
    allow_from: DnsClients = DnsClients()   # networks answered besides the captured pods and loopback


def parse_upstream(text: str) -> tuple[str, int]:
    """`IP`, `IP:PORT` or `[IPv6]:PORT` → (ip, port); port 53 when absent."""
    t = text.strip()
    host, port = t, 53
    if t.startswith("["):
        host, _, rest = t[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise DnsConfigError(f"DNS upstream {text!r}: write [IPv6]:PORT, e.g. [fd00::10]:53")
            port = _port(text, rest[1:])
    elif t.count(":") == 1:
        host, _, p = t.partition(":")
        port = _port(text, p)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise DnsConfigError(f"DNS upstream {text!r} is not an IP address (a resolver is named by address, "
                             "e.g. 10.96.0.10 or 10.96.0.10:53)") from None
    return host, port


def _port(text: str, p: str) -> int:
    if not p.isdigit() or not 0 < int(p) < 65536:
        raise DnsConfigError(f"DNS upstream {text!r}: port {p!r} is not in 1..65535")
    return int(p)


def nameservers(resolv_conf: str) -> tuple[tuple[str, int], ...]:
    """The `nameserver` lines of a resolv.conf (the first three, as glibc), port 53."""
    out: list[tuple[str, int]] = []
    for line in resolv_conf.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver" and len(out) < MAX_NAMESERVERS:
            with contextlib.suppress(DnsConfigError):
                out.append(parse_upstream(parts[1].split("%", 1)[0]))
    return tuple(out)


def upstreams_from_flags(values: list[str] | None, resolv_conf: Path = RESOLV_CONF) -> tuple[tuple[str, int], ...]:
    """`--dns-upstream` values → addresses. None given or `resolv.conf`: the nameservers there;
    `none`: no upstream (unknown names get `--dns-unanswered`)."""
    out: list[tuple[str, int]] = []
    for v in values or ["resolv.conf"]:
        if v == "none":
            continue
        if v == "resolv.conf":
            try:
                out.extend(nameservers(resolv_conf.read_text()))
            except OSError as e:
                raise DnsConfigError(f"cannot read {resolv_conf} for DNS upstreams ({e}); pass --dns-upstream IP "
                                     "or --dns-upstream none") from None
            continue
        out.append(parse_upstream(v))
    return tuple(dict.fromkeys(out))


class DnsServer:
    def __init__(self, table: Callable[[], DnsTable], options: DnsOptions,
                 log: Callable[..., None] | None = None, count: Callable[[str], None] | None = None,
                 enrolled: Callable[[], frozenset[str]] = frozenset) -> None:
        """`enrolled()`: the addresses of the node's captured pods now (from the proxy's config)."""
        self.table = table
        self.options = options
        self.enrolled = enrolled
        if log is None:
            from ztunnel.api.logsetup import event_log

            log = event_log(logger, lambda f: logging.WARNING if "failed" in str(f.get("kind")) else logging.INFO)
        self.log = log
        self.count = count or (lambda _outcome: None)  # metrics: meshfed_dns_queries_total{outcome}
        self.stats: Counter[str] = Counter()
        self.ready = asyncio.Event()
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._udp_pending = 0
        self._replies = ReplyCache()

    async def start(self, host: str, port: int) -> int:
        """Bind UDP and TCP on `host:port` (port 0: one free port for both); returns the port."""
        self._udp, self._tcp, self.port = await bind_udp_and_tcp(
            host, port, lambda: _UdpListener(self), self._serve_tcp)
        self.ready.set()
        return self.port

    async def close(self) -> None:
        self.ready.clear()
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for w in list(self._writers):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _decide(self, query: bytes, over_tcp: bool) -> Reply | Forward | Drop:
        o = self.options
        d = self._replies.decide(query, self.table(), over_tcp=over_tcp, has_upstream=bool(o.upstreams),
                                 unanswered=o.unanswered, ttl_s=o.ttl_s)
        self._count(d)
        return d

    def _admits(self, addr: Any) -> bool:
        """May this source be answered? (`ztunnel.dns.clients`.) A refusal is counted and logged."""
        ip = str(addr[0]) if isinstance(addr, tuple) and addr else ""
        if self.options.allow_from.admits(ip, self.enrolled()):
            return True
        self._note("refused_source")
        n = self.stats["refused_source"]
        if n & (n - 1) == 0:   # the 1st, 2nd, 4th, 8th… refusal
            self.log(kind="dns_client_refused", client=ip, refused=n,
                     hint="only the node's captured pods, --dns-allow-from networks and loopback are answered")
        return False

    def _note(self, outcome: str) -> None:
        self.stats[outcome] += 1
        self.count(outcome)

    def _count(self, d: Reply | Forward | Drop) -> None:
        if isinstance(d, Reply):
            self._note(d.outcome)
            if d.truncated:
                self._note("truncated")
        else:
            self._note("forwarded" if isinstance(d, Forward) else "dropped")

    # --- UDP ------------------------------------------------------------------------------------

    def on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self._admits(addr):
            return   # silence: a refusal would still be a reflected packet to a maybe spoofed source
        d = self._decide(data, over_tcp=False)
        if isinstance(d, Reply):
            self._send_udp(d.wire, addr)
        elif isinstance(d, Forward):
            if self._udp_pending >= self.options.max_inflight:
                r = failure_reply(d, over_tcp=False)
                self._note("overloaded")
                self._send_udp(r.wire, addr)
                return
            self._udp_pending += 1
            self._spawn(self._forward_udp(d, addr))

    async def _forward_udp(self, fwd: Forward, addr: tuple[str, int]) -> None:
        try:
            reply = await self._ask_upstreams(fwd, over_tcp=False)
        finally:
            self._udp_pending -= 1
        self._send_udp(reply.wire, addr)

    def _send_udp(self, wire: bytes, addr: tuple[str, int]) -> None:
        if self._udp is not None and not self._udp.is_closing():
            self._udp.sendto(wire, addr)

    # --- TCP ------------------------------------------------------------------------------------

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= self.options.max_tcp_connections:
            self._note("tcp_refused")
            writer.close()
            return
        if not self._admits(writer.get_extra_info("peername")):
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        _bound_send_buffer(writer)
        idle = self.options.tcp_idle_timeout_s
        try:
            while True:
                try:
                    size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), idle), "big")
                    query = await asyncio.wait_for(reader.readexactly(size), idle)
                except (TimeoutError, asyncio.IncompleteReadError, OSError):
                    return
                d = self._decide(query, over_tcp=True)
                if isinstance(d, Drop):
                    return
                reply = d if isinstance(d, Reply) else await self._ask_upstreams(d, over_tcp=True)
                if writer.transport.is_closing():
                    return   # the client left while upstream answered (uvloop raises on such a write)
                writer.write(len(reply.wire).to_bytes(2, "big") + reply.wire)
                # a client that pipelines queries and never reads would hold its slot in drain() for ever
                await asyncio.wait_for(writer.drain(), idle)
        except TimeoutError:
            self._note("tcp_write_timeout")
            writer.transport.abort()   # its unread answers are dropped, not flushed: close() would wait on them
            return
        except OSError:
            return
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    # --- upstream -------------------------------------------------------------------------------

    async def _ask_upstreams(self, fwd: Forward, *, over_tcp: bool) -> Reply:
        errors: list[str] = []
        for host, port in self.options.upstreams:
            try:
                if over_tcp:
                    reply = await asyncio.wait_for(self._tcp_exchange(host, port, fwd),
                                                   self.options.upstream_timeout_s)
                else:
                    reply = await self._udp_exchange(host, port, fwd)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, RuntimeError) as e:   # uvloop: a reset write
                errors.append(f"{host}:{port}: {type(e).__name__} {e}".strip())
                continue
            if reply is not None:
                self._note("upstream_truncated" if reply.truncated else "upstream_answered")
                return reply
            errors.append(f"{host}:{port}: a reply that does not answer the query")
        self._note("servfail")
        if self.stats["servfail"] & (self.stats["servfail"] - 1) == 0:  # the 1st, 2nd, 4th, 8th… failure
            self.log(kind="dns_upstream_failed", failures=self.stats["servfail"], errors=errors[-3:],
                     hint="check --dns-upstream (or the nameservers in /etc/resolv.conf) is reachable from the node")
        return failure_reply(fwd, over_tcp=over_tcp)

    async def _udp_exchange(self, host: str, port: int, fwd: Forward) -> Reply | None:
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[Reply] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(lambda: _UpstreamUdp(fwd, answered),
                                                           remote_addr=(host, port))
        try:
            transport.sendto(fwd.query)
            return await asyncio.wait_for(answered, self.options.upstream_timeout_s)
        finally:
            transport.close()

    async def _tcp_exchange(self, host: str, port: int, fwd: Forward) -> Reply | None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(len(fwd.query).to_bytes(2, "big") + fwd.query)
            await writer.drain()
            size = int.from_bytes(await reader.readexactly(2), "big")
            return upstream_reply(fwd, await reader.readexactly(size), over_tcp=True)
        finally:
            writer.close()


def _bound_send_buffer(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, TCP_SEND_BUFFER_BYTES)


class _UdpListener(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.server.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error about an earlier reply: nothing to do for the listener


class _UpstreamUdp(asyncio.DatagramProtocol):
    """One forwarded query's socket (connected to the upstream: only its datagrams arrive here).
    Datagrams that do not answer the query (spoofed or stale IDs) are ignored."""

    def __init__(self, fwd: Forward, answered: asyncio.Future[Reply]) -> None:
        self.fwd = fwd
        self.answered = answered

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = upstream_reply(self.fwd, data, over_tcp=False)
        if reply is not None and not self.answered.done():
            self.answered.set_result(reply)

    def error_received(self, exc: Exception) -> None:
        if not self.answered.done():
            self.answered.set_exception(exc)  # ICMP port unreachable: try the next upstream now
