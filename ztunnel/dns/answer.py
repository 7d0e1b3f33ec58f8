"""What the node proxy's DNS responder does with one query — decided purely, bytes in, bytes out.

`decide()` takes a query's wire bytes (as a pod sent them over UDP or TCP) and the proxy's
`DnsTable`, and returns one of:

- `Reply`: the bytes to send back. Names of the mesh are answered here, authoritatively, with the
  VIPs of the config (TTL `ttl_s`); a query the proxy cannot parse gets FORMERR, an opcode other than
  QUERY gets NOTIMP; a name the mesh does not know gets the `Unanswered` rcode when the proxy has
  no upstream resolver;
- `Forward`: the query, unchanged, to send to the upstream resolver; `upstream_reply()` then checks
  the answer belongs to it (ID, question) and passes it on unchanged, or `failure_reply()` says
  SERVFAIL when no upstream answered;
- `Drop`: nothing to send (a response sent to us: answering it could start a loop).

Answers to known names, as the MCS DNS specification and Istio's DNS proxy give them:
- `A` → the IPv4 VIPs, `AAAA` → the IPv6 VIPs; a family the service has no VIP in is NOERROR with
  no records (NODATA), never NXDOMAIN: the name exists, and a resolver that cached NXDOMAIN for
  the AAAA query would hide the A record too (RFC 8020);
- any other type (MX, TXT, SRV…) → NODATA; ANY → every VIP (RFC 8482 lets us answer minimally).

Truncation (RFC 1035 §4.2.1, RFC 6891): a UDP reply carries at most 512 bytes, or what the query's
EDNS0 OPT offers, never more than 1232 (DNS flag day 2020). A larger reply goes out over UDP as
header + question with TC set (no partial answer set to mislead a cache); the client then asks
over TCP, where the full answer goes (up to TCP's 65535). Upstream replies are held to the same
limit: an upstream that ignores it cannot make us send an oversized datagram.

Invariants: nothing here reads the clock or a socket; every reply's ID and question are the
query's; `Reply.wire` over UDP is never longer than the query's UDP limit.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from ztunnel.api.config import Service

MCS_ZONE = "clusterset.local"     # the MCS DNS spec's zone, whatever the Federation's clustersetDomain
CLUSTER_ZONE = "cluster.local"    # Kubernetes' own zone: a global service's name in every cluster
DEFAULT_TTL_S = 30                # ztunnel's DNS proxy answers with 30 s too
CLASSIC_UDP_PAYLOAD = 512         # RFC 1035: a UDP reply without EDNS0
MAX_UDP_PAYLOAD = 1232            # DNS flag day 2020: never more over UDP, whatever the client offers
MAX_TCP_MESSAGE = 65535           # the 2-byte length prefix of DNS over TCP
HEADER_LEN = 12

_QR, _RD, _RA = 0x8000, 0x0100, 0x0080
_OPCODE_MASK = 0x7800


class Unanswered(str, Enum):
    """What a name the mesh does not know gets when the proxy has no upstream resolver."""

    NXDOMAIN = "nxdomain"   # as a resolver for which nothing else exists (the lab: no internet)
    SERVFAIL = "servfail"   # as a resolver that could not reach anyone


@dataclass(frozen=True, slots=True)
class DnsTable:
    """The names the proxy answers itself: lower-case, without the final dot → their VIPs."""

    addresses: Mapping[str, tuple[str, ...]]

    @staticmethod
    def from_services(services: Iterable[Service]) -> DnsTable:
        """Every global service under its hostname (`<svc>.<ns>.svc.<clustersetDomain>`), under
        the MCS name `<svc>.<ns>.svc.clusterset.local` (the same name when the domain is the
        default), and under its cluster-local name `<svc>.<ns>.svc.cluster.local`: Istio's
        namespace sameness, a service of the same name and namespace in every cluster is one
        service (what a DestinationRule host like the Istio guide's names, and what apps written for
        one cluster dial). A service without a VIP is still a known name (NODATA, not NXDOMAIN)."""
        out: dict[str, list[str]] = {}
        for s in services:
            for name in {s.hostname.lower().rstrip("."), f"{s.name}.{s.namespace}.svc.{MCS_ZONE}".lower(),
                         f"{s.name}.{s.namespace}.svc.{CLUSTER_ZONE}".lower()}:
                vips = out.setdefault(name, [])
                if s.vip and s.vip not in vips:
                    vips.append(s.vip)
        return DnsTable({n: tuple(v) for n, v in out.items()})


EMPTY_TABLE = DnsTable({})


@dataclass(frozen=True, slots=True)
class Reply:
    wire: bytes
    outcome: str              # mesh | nodata | unanswered | formerr | notimp | upstream | servfail
    truncated: bool = False   # TC set: the client should ask again over TCP


@dataclass(frozen=True, slots=True)
class Forward:
    """Send `query` (the client's bytes, unchanged) to the upstream resolver."""

    query: bytes
    message: dns.message.Message = field(compare=False, repr=False)
    udp_limit: int            # what the client accepts over UDP (the reply is held to it)


@dataclass(frozen=True, slots=True)
class Drop:
    reason: str


Decision = Reply | Forward | Drop


def udp_limit(msg: dns.message.Message) -> int:
    """How large a UDP reply to `msg` may be: 512 without EDNS0, else its offer within [512, 1232]."""
    if msg.edns < 0:
        return CLASSIC_UDP_PAYLOAD
    return max(CLASSIC_UDP_PAYLOAD, min(int(msg.payload), MAX_UDP_PAYLOAD))


def decide(query: bytes, table: DnsTable, *, over_tcp: bool, has_upstream: bool,
           unanswered: Unanswered = Unanswered.SERVFAIL, ttl_s: int = DEFAULT_TTL_S) -> Decision:
    if len(query) < HEADER_LEN:
        return Drop(f"{len(query)} bytes is shorter than a DNS header")
    if int.from_bytes(query[2:4], "big") & _QR:
        return Drop("a response, not a query (answering it could start a loop)")
    try:
        msg = dns.message.from_wire(query)
    except Exception:  # dnspython raises many types for malformed input; all mean the same here
        return Reply(_header_only(query, dns.rcode.FORMERR), "formerr")
    if msg.opcode() != dns.opcode.QUERY:
        return Reply(_header_only(query, dns.rcode.NOTIMP), "notimp")
    if len(msg.question) != 1:
        return Reply(_header_only(query, dns.rcode.FORMERR), "formerr")
    q = msg.question[0]
    name = q.name.to_text(omit_final_dot=True).lower()
    addresses = table.addresses.get(name)
    limit = MAX_TCP_MESSAGE if over_tcp else udp_limit(msg)
    if addresses is not None and q.rdclass in (dns.rdataclass.IN, dns.rdataclass.ANY):
        return _answer(msg, q, addresses, ttl_s, limit)
    if has_upstream:
        return Forward(query, msg, udp_limit(msg))
    rcode = dns.rcode.NXDOMAIN if unanswered is Unanswered.NXDOMAIN else dns.rcode.SERVFAIL
    return Reply(_encode(_response(msg, rcode), msg, limit)[0], "unanswered")


class ReplyCache:
    """The replies `decide` computed itself (global names, NODATA, unanswered), by the query's bytes
    after its ID: a stub resolver asks the same few names again and again (with ndots:5 every
    lookup of a global name is four queries, the search-list ones included), and building a reply
    with dnspython costs ~0.2 ms of the proxy's event loop. A hit costs a dict lookup and a copy.

    Invariants: an entry is valid for one table object (a new config's table empties the cache)
    and one set of answer options (one cache per server); at most `max_entries` entries, least
    recently used evicted first; forwarded queries and malformed input are never cached."""

    CACHED = frozenset({"mesh", "nodata", "unanswered"})

    def __init__(self, max_entries: int = 1024) -> None:
        self.max_entries = max_entries
        self._table: DnsTable | None = None
        self._entries: OrderedDict[tuple[bool, bytes], Reply] = OrderedDict()
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def decide(self, query: bytes, table: DnsTable, *, over_tcp: bool, has_upstream: bool,
               unanswered: Unanswered = Unanswered.SERVFAIL, ttl_s: int = DEFAULT_TTL_S) -> Decision:
        if table is not self._table:
            self._entries.clear()
            self._table = table
        key = (over_tcp, query[2:])
        hit = self._entries.get(key) if len(query) >= HEADER_LEN else None
        if hit is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return Reply(query[:2] + hit.wire[2:], hit.outcome, hit.truncated)
        d = decide(query, table, over_tcp=over_tcp, has_upstream=has_upstream, unanswered=unanswered, ttl_s=ttl_s)
        if isinstance(d, Reply) and d.outcome in self.CACHED:
            self._entries[key] = d
            if len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return d


def upstream_reply(fwd: Forward, reply: bytes, *, over_tcp: bool) -> Reply | None:
    """The upstream's reply for the client, unchanged — or cut to header + question with TC when it
    is larger than the client takes over UDP. None: not a reply to this query (wrong ID or
    question, unparsable): ignore it."""
    try:
        msg = dns.message.from_wire(reply)
    except Exception:
        return None
    if not fwd.message.is_response(msg):
        return None
    if not over_tcp and len(reply) > fwd.udp_limit:
        cut = _response(fwd.message, msg.rcode())
        cut.flags = msg.flags | dns.flags.TC
        return Reply(_encode(cut, fwd.message, fwd.udp_limit)[0], "upstream", truncated=True)
    return Reply(reply, "upstream", truncated=bool(msg.flags & dns.flags.TC))


def failure_reply(fwd: Forward, *, over_tcp: bool) -> Reply:
    """SERVFAIL for a forwarded query no upstream answered (in time)."""
    limit = MAX_TCP_MESSAGE if over_tcp else fwd.udp_limit
    return Reply(_encode(_response(fwd.message, dns.rcode.SERVFAIL), fwd.message, limit)[0], "servfail")


# --- building replies --------------------------------------------------------------------------


def _response(query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
    resp = dns.message.make_response(query, recursion_available=True, our_payload=MAX_UDP_PAYLOAD)
    resp.set_rcode(rcode)
    return resp


def _answer(query: dns.message.Message, q: dns.rrset.RRset, addresses: tuple[str, ...], ttl_s: int,
            limit: int) -> Reply:
    v4 = [a for a in addresses if ipaddress.ip_address(a).version == 4]
    v6 = [a for a in addresses if ipaddress.ip_address(a).version == 6]
    wanted: list[tuple[str, list[str]]] = []
    if q.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY) and v4:
        wanted.append(("A", v4))
    if q.rdtype in (dns.rdatatype.AAAA, dns.rdatatype.ANY) and v6:
        wanted.append(("AAAA", v6))
    resp = _response(query, dns.rcode.NOERROR)
    resp.flags |= dns.flags.AA
    for rdtype, values in wanted:
        resp.answer.append(dns.rrset.from_text(q.name, ttl_s, "IN", rdtype, *values))
    wire, truncated = _encode(resp, query, limit)
    return Reply(wire, "mesh" if wanted else "nodata", truncated)


def _encode(resp: dns.message.Message, query: dns.message.Message, limit: int) -> tuple[bytes, bool]:
    """`resp` on the wire, or (when longer than `limit`) its header and question with TC set."""
    try:
        return resp.to_wire(max_size=limit), False
    except dns.exception.TooBig:
        pass
    cut = _response(query, resp.rcode())
    cut.flags = resp.flags | dns.flags.TC
    return cut.to_wire(max_size=max(limit, CLASSIC_UDP_PAYLOAD)), True


def _header_only(query: bytes, rcode: dns.rcode.Rcode) -> bytes:
    """A reply of just a header (for queries we cannot parse): their ID, opcode and RD, our rcode."""
    flags = int.from_bytes(query[2:4], "big")
    out = _QR | (flags & _OPCODE_MASK) | (flags & _RD) | _RA | (rcode & 0xF)
    return query[:2] + out.to_bytes(2, "big") + bytes(8)
