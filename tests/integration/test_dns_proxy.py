"""The node proxy's DNS responder on loopback sockets (`ztunnel.dns.server`), with a fake upstream
resolver: global names answered from the config, other names forwarded unchanged over the
client's transport, truncation over UDP and the full answer over TCP through the forwarder, and
what happens when upstreams are down, silent, spoofed or overwhelmed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from ztunnel.api.config import Service, ServicePortMap
from ztunnel.dns.answer import DnsTable, Unanswered
from ztunnel.dns.server import DnsOptions, DnsServer, bind_udp_and_tcp

pytestmark = pytest.mark.timeout(30)

LO = "127.0.0.1"
VIP = "10.96.0.11"
TABLE = DnsTable.from_services([Service("checkout.shop.svc.clusterset.local", "shop", "checkout", VIP,
                                        (ServicePortMap(80, 8080),), ())])


@dataclass
class FakeUpstream:
    """A resolver on loopback: `www.example.` has one address, `headless.example.` 60 (a headless
    Service's pods), anything else is NXDOMAIN. Records every query's bytes and transport."""

    delay_s: float = 0.0
    spoof_first: bool = False
    seen: list[tuple[str, bytes]] = field(default_factory=list)
    port: int = 0
    _udp: asyncio.DatagramTransport | None = None
    _tcp: asyncio.Server | None = None

    def answer(self, wire: bytes) -> bytes:
        q = dns.message.from_wire(wire)
        r = dns.message.make_response(q)
        name = q.question[0].name.to_text()
        n = {"www.example.": 1, "headless.example.": 60}.get(name, 0)
        if n:
            r.answer.append(dns.rrset.from_text(name, 60, "IN", "A", *(f"192.0.2.{i}" for i in range(1, n + 1))))
        else:
            r.set_rcode(dns.rcode.NXDOMAIN)
        return r.to_wire()

    async def start(self) -> FakeUpstream:
        up = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.t = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                up.seen.append(("udp", data))

                async def later() -> None:
                    await asyncio.sleep(up.delay_s)
                    reply = up.answer(data)
                    if up.spoof_first:
                        bogus = bytearray(reply)
                        bogus[0] ^= 0xFF
                        self.t.sendto(bytes(bogus), addr)  # type: ignore[attr-defined]
                    if len(reply) > 512:  # a well-behaved server truncates over UDP
                        m = dns.message.from_wire(reply)
                        m.answer.clear()
                        m.flags |= dns.flags.TC
                        reply = m.to_wire()
                    self.t.sendto(reply, addr)  # type: ignore[attr-defined]

                asyncio.ensure_future(later())  # noqa: RUF006 - the fake lives as long as the test loop

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            n = int.from_bytes(await reader.readexactly(2), "big")
            data = await reader.readexactly(n)
            up.seen.append(("tcp", data))
            reply = up.answer(data)
            writer.write(len(reply).to_bytes(2, "big") + reply)
            await writer.drain()
            writer.close()

        self._udp, self._tcp, self.port = await bind_udp_and_tcp(LO, 0, Udp, tcp)   # port 0: a free pair
        return self

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    up = await FakeUpstream().start()
    yield up
    up.close()


@pytest.fixture
async def servers() -> AsyncIterator[list[DnsServer]]:
    made: list[DnsServer] = []
    yield made
    for s in made:
        await s.close()


async def start(servers: list[DnsServer], table: Callable[[], DnsTable] = lambda: TABLE,
                **opts: object) -> DnsServer:
    s = DnsServer(table, DnsOptions(**opts))  # type: ignore[arg-type]
    await s.start(LO, 0)
    servers.append(s)
    return s


async def udp(s: DnsServer, name: str, rdtype: str = "A", timeout_s: float = 5.0) -> dns.message.Message:
    return await dns.asyncquery.udp(dns.message.make_query(name, rdtype), LO, timeout=timeout_s, port=s.port)


async def tcp(s: DnsServer, name: str, rdtype: str = "A") -> dns.message.Message:
    return await dns.asyncquery.tcp(dns.message.make_query(name, rdtype), LO, timeout=5, port=s.port)


def addresses(r: dns.message.Message) -> list[str]:
    return [rd.to_text() for rrset in r.answer for rd in rrset]


async def test_global_names_are_answered_from_the_config_over_udp_and_tcp(servers: list[DnsServer],
                                                                          upstream: FakeUpstream) -> None:
    s = await start(servers, upstreams=((LO, upstream.port),))
    for ask in (udp, tcp):
        r = await ask(s, "checkout.shop.svc.clusterset.local.")
        assert addresses(r) == [VIP] and r.answer[0].ttl == 30
        r = await ask(s, "checkout.shop.svc.clusterset.local.", "AAAA")
        assert r.rcode() == dns.rcode.NOERROR and not r.answer
    assert upstream.seen == [], "names of the mesh never leave the node"


async def test_the_table_follows_the_config(servers: list[DnsServer]) -> None:
    current = [TABLE]
    s = await start(servers, lambda: current[0], unanswered=Unanswered.NXDOMAIN)
    assert addresses(await udp(s, "checkout.shop.svc.clusterset.local.")) == [VIP]
    current[0] = DnsTable({})
    assert (await udp(s, "checkout.shop.svc.clusterset.local.")).rcode() == dns.rcode.NXDOMAIN


async def test_other_names_are_forwarded_unchanged_on_the_clients_transport(servers: list[DnsServer],
                                                                            upstream: FakeUpstream) -> None:
    s = await start(servers, upstreams=((LO, upstream.port),))
    q = dns.message.make_query("www.example.", "A", use_edns=0, payload=1232)
    r = await dns.asyncquery.udp(q, LO, timeout=5, port=s.port)
    assert addresses(r) == ["192.0.2.1"]
    assert upstream.seen == [("udp", q.to_wire())]
    r = await tcp(s, "nope.example.")
    assert r.rcode() == dns.rcode.NXDOMAIN and upstream.seen[-1][0] == "tcp"


async def test_a_large_forwarded_answer_is_truncated_over_udp_and_whole_over_tcp(servers: list[DnsServer],
                                                                                 upstream: FakeUpstream) -> None:
    s = await start(servers, upstreams=((LO, upstream.port),))
    r = await udp(s, "headless.example.")
    assert r.flags & dns.flags.TC and not r.answer
    r = await tcp(s, "headless.example.")
    assert not r.flags & dns.flags.TC and len(addresses(r)) == 60
    # what a stub resolver does with it: retry over TCP on TC
    r, used_tcp = await dns.asyncquery.udp_with_fallback(dns.message.make_query("headless.example.", "A"), LO,
                                                         timeout=5, port=s.port)
    assert used_tcp and len(addresses(r)) == 60


async def test_without_an_upstream_unknown_names_get_the_configured_answer(servers: list[DnsServer]) -> None:
    counted: list[str] = []
    nx = DnsServer(lambda: TABLE, DnsOptions(unanswered=Unanswered.NXDOMAIN), count=counted.append)
    await nx.start(LO, 0)
    servers.append(nx)
    sf = await start(servers, unanswered=Unanswered.SERVFAIL)
    assert (await udp(nx, "www.example.")).rcode() == dns.rcode.NXDOMAIN
    assert (await tcp(sf, "www.example.")).rcode() == dns.rcode.SERVFAIL
    assert (await udp(nx, "checkout.shop.svc.clusterset.local.")).answer
    assert counted == ["unanswered", "mesh"], "each query counted once, by outcome (the metric)"


async def test_a_dead_upstream_is_skipped_and_none_answering_is_servfail(servers: list[DnsServer],
                                                                        upstream: FakeUpstream) -> None:
    closed = await FakeUpstream().start()
    closed.close()  # nothing listens there any more: ICMP port unreachable / connection refused
    s = await start(servers, upstreams=((LO, closed.port), (LO, upstream.port)), upstream_timeout_s=1.0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert addresses(await udp(s, "www.example.")) == ["192.0.2.1"]
    assert addresses(await tcp(s, "www.example.")) == ["192.0.2.1"]
    assert loop.time() - t0 < 1.0, "a refused upstream is skipped at once, not after the timeout"
    only_dead = await start(servers, upstreams=((LO, closed.port),), upstream_timeout_s=1.0)
    assert (await udp(only_dead, "www.example.")).rcode() == dns.rcode.SERVFAIL
    assert only_dead.stats["servfail"] == 1


async def test_a_silent_upstream_times_out_into_servfail(servers: list[DnsServer]) -> None:
    slow = await FakeUpstream(delay_s=5.0).start()
    try:
        s = await start(servers, upstreams=((LO, slow.port),), upstream_timeout_s=0.3)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert (await udp(s, "www.example.")).rcode() == dns.rcode.SERVFAIL
        assert 0.25 < loop.time() - t0 < 2.0
    finally:
        slow.close()


async def test_a_spoofed_reply_is_ignored(servers: list[DnsServer]) -> None:
    spoofing = await FakeUpstream(spoof_first=True).start()
    try:
        s = await start(servers, upstreams=((LO, spoofing.port),))
        r = await udp(s, "www.example.")
        assert addresses(r) == ["192.0.2.1"]
    finally:
        spoofing.close()


async def test_forwarded_queries_in_flight_are_bounded(servers: list[DnsServer]) -> None:
    slow = await FakeUpstream(delay_s=1.0).start()
    try:
        s = await start(servers, upstreams=((LO, slow.port),), max_inflight=1, upstream_timeout_s=3.0)
        first = asyncio.ensure_future(udp(s, "www.example."))
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert (await udp(s, "nope.example.")).rcode() == dns.rcode.SERVFAIL
        assert loop.time() - t0 < 0.5, "over the bound: SERVFAIL at once, nothing queued"
        assert addresses(await first) == ["192.0.2.1"]
        assert s.stats["overloaded"] == 1
    finally:
        slow.close()


async def test_several_queries_on_one_tcp_connection_are_answered_in_order(servers: list[DnsServer],
                                                                           upstream: FakeUpstream) -> None:
    s = await start(servers, upstreams=((LO, upstream.port),))
    reader, writer = await asyncio.open_connection(LO, s.port)
    queries = [dns.message.make_query(n, "A") for n in ("checkout.shop.svc.clusterset.local.", "www.example.",
                                                        "nope.example.")]
    writer.write(b"".join(len(w).to_bytes(2, "big") + w for w in (q.to_wire() for q in queries)))
    await writer.drain()
    answers = []
    for _ in queries:
        n = int.from_bytes(await reader.readexactly(2), "big")
        answers.append(dns.message.from_wire(await reader.readexactly(n)))
    writer.close()
    assert [a.id for a in answers] == [q.id for q in queries]
    assert addresses(answers[0]) == [VIP] and addresses(answers[1]) == ["192.0.2.1"]
    assert answers[2].rcode() == dns.rcode.NXDOMAIN


async def test_tcp_clients_are_bounded_and_idle_ones_closed(servers: list[DnsServer]) -> None:
    s = await start(servers, max_tcp_connections=1, tcp_idle_timeout_s=0.3)
    r1, w1 = await asyncio.open_connection(LO, s.port)
    await asyncio.sleep(0.05)
    r2, w2 = await asyncio.open_connection(LO, s.port)
    assert await asyncio.wait_for(r2.read(), 2) == b"", "the second client is closed at once"
    assert await asyncio.wait_for(r1.read(), 2) == b"", "the idle one after the idle timeout"
    w1.close()
    w2.close()
    assert s.stats["tcp_refused"] == 1


async def test_a_source_that_is_not_a_captured_pod_or_the_node_gets_no_answer(servers: list[DnsServer]) -> None:
    """Review finding 4 (dns_open.py): the responder answered (and forwarded for) any source. From
    127.0.0.2 (neither a captured pod, nor an allowed network, nor the node's 127.0.0.1) a UDP query
    gets silence and a TCP connection is closed at once; once the config lists that address as a
    captured pod it is answered."""
    pods: set[str] = set()
    s = DnsServer(lambda: TABLE, DnsOptions(), enrolled=lambda: frozenset(pods))
    await s.start(LO, 0)
    servers.append(s)
    query = dns.message.make_query("checkout.shop.svc.clusterset.local", "A")
    with pytest.raises(dns.exception.Timeout):
        await dns.asyncquery.udp(query, LO, timeout=0.5, port=s.port, source="127.0.0.2")
    r, w = await asyncio.open_connection(LO, s.port, local_addr=("127.0.0.2", 0))
    w.write(len(query.to_wire()).to_bytes(2, "big") + query.to_wire())
    try:   # closed with our query unread: the kernel may say so with a reset
        assert await asyncio.wait_for(r.read(), 2) == b"", "an outsider's TCP connection is closed unanswered"
    except ConnectionResetError:
        pass
    w.close()
    assert s.stats["refused_source"] == 2 and s.stats["mesh"] == 0
    assert addresses(await udp(s, "checkout.shop.svc.clusterset.local")) == [VIP]   # the node itself
    pods.add("127.0.0.2")
    got = await dns.asyncquery.udp(query, LO, timeout=2, port=s.port, source="127.0.0.2")
    assert addresses(got) == [VIP]


async def test_a_tcp_client_that_never_reads_its_answers_is_dropped(servers: list[DnsServer]) -> None:
    """Review finding 4: a client that pipelines queries and never reads kept the responder stuck in
    `drain()` past the idle timeout, holding one of `max_tcp_connections` slots for ever (128 such
    clients shut TCP DNS out for every pod of the node)."""
    import socket

    s = await start(servers, tcp_idle_timeout_s=0.5)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # a small window: the answers back up fast
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (LO, s.port))
    wire = dns.message.make_query("checkout.shop.svc.clusterset.local", "A").to_wire()
    batch = (len(wire).to_bytes(2, "big") + wire) * 256
    try:
        # send until the server stops taking queries (it is blocked writing answers nobody reads)
        stuck_since = None
        deadline = loop.time() + 20
        while loop.time() < deadline and not (stuck_since is not None and loop.time() - stuck_since > 1.0):
            try:
                sock.send(batch)
                stuck_since = None
            except BlockingIOError:
                stuck_since = stuck_since or loop.time()
            except OSError:
                break   # already dropped
            await asyncio.sleep(0.001)
        assert await wait_for_condition(lambda: not s._writers, 5.0), "the non-reading client still holds its slot"
        assert s.stats["tcp_write_timeout"] == 1
    finally:
        sock.close()


async def test_a_tcp_clients_kernel_send_buffer_is_bounded(servers: list[DnsServer]) -> None:
    """A peer that never reads made us fill an autotuned send buffer (megabytes of answers per
    connection, before the write timeout could even start); now it is capped."""
    import socket

    from ztunnel.dns.server import TCP_SEND_BUFFER_BYTES

    s = await start(servers)
    _reader, writer = await asyncio.open_connection(LO, s.port)
    try:
        assert await wait_for_condition(lambda: len(s._writers) == 1, 5.0)
        (server_side,) = s._writers
        sndbuf = server_side.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert sndbuf <= 2 * TCP_SEND_BUFFER_BYTES      # Linux reports twice what was set
    finally:
        writer.close()


async def wait_for_condition(pred: Callable[[], bool], timeout_s: float) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


async def test_port_zero_finds_a_port_free_for_udp_and_tcp(servers: list[DnsServer],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Port 0 lets the kernel pick a free UDP port; that number may already be taken for TCP (CI
    once failed on EADDRINUSE that way). The first UDP port handed out here is one whose TCP twin is
    held: the server moves on to another pair instead of failing."""
    import socket

    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.bind((LO, 0))
    held.listen()
    taken = held.getsockname()[1]
    loop = asyncio.get_running_loop()
    real = loop.create_datagram_endpoint
    calls: list[int] = []

    async def first_on_the_taken_port(factory: Any, local_addr: tuple[str, int] | None = None, **kw: Any) -> Any:
        if local_addr is None or local_addr[1] != 0:      # the test's own queries: untouched
            return await real(factory, local_addr=local_addr, **kw)
        calls.append(local_addr[1])
        return await real(factory, local_addr=(local_addr[0], taken) if len(calls) == 1 else local_addr, **kw)

    monkeypatch.setattr(loop, "create_datagram_endpoint", first_on_the_taken_port)
    try:
        s = await start(servers)
        assert len(calls) == 2 and s.port != taken
        assert addresses(await udp(s, "checkout.shop.svc.clusterset.local.")) and \
            addresses(await tcp(s, "checkout.shop.svc.clusterset.local."))
    finally:
        held.close()
