"""The node proxy's DNS decisions (`ztunnel.dns.answer`), bytes in and bytes out: global names,
NODATA for the family a VIP is not in, forwarding unchanged, NXDOMAIN/SERVFAIL without an upstream,
TTL, truncation over UDP vs the full answer over TCP, and malformed input."""

from __future__ import annotations

from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztunnel import __main__ as ztunnel_main
from ztunnel.api.config import Service, ServicePortMap
from ztunnel.dns.answer import (
    CLASSIC_UDP_PAYLOAD,
    DEFAULT_TTL_S,
    MAX_UDP_PAYLOAD,
    DnsTable,
    Drop,
    Forward,
    Reply,
    ReplyCache,
    Unanswered,
    decide,
    failure_reply,
    upstream_reply,
)
from ztunnel.dns.server import DnsConfigError, nameservers, parse_upstream, upstreams_from_flags

VIP = "10.96.0.11"


def svc(name: str, vip: str, hostname: str | None = None, ns: str = "shop") -> Service:
    return Service(hostname or f"{name}.{ns}.svc.clusterset.local", ns, name, vip, (ServicePortMap(80, 8080),), ())


TABLE = DnsTable.from_services([svc("checkout", VIP), svc("v6only", "fd00::11"),
                                svc("cart", "10.96.0.12", hostname="cart.shop.svc.mesh.example")])


def ask(name: str, rdtype: str = "A", *, table: DnsTable = TABLE, over_tcp: bool = False, upstream: bool = False,
        unanswered: Unanswered = Unanswered.SERVFAIL, ttl_s: int = DEFAULT_TTL_S, **query_kw: object
        ) -> tuple[dns.message.Message, Reply]:
    q = dns.message.make_query(name, rdtype, **query_kw)  # type: ignore[arg-type]
    d = decide(q.to_wire(), table, over_tcp=over_tcp, has_upstream=upstream, unanswered=unanswered, ttl_s=ttl_s)
    assert isinstance(d, Reply), d
    r = dns.message.from_wire(d.wire)
    assert r.id == q.id and r.question == q.question and r.flags & dns.flags.QR
    return r, d


def addresses(r: dns.message.Message) -> list[str]:
    return [rd.to_text() for rrset in r.answer for rd in rrset]


def test_a_global_name_resolves_to_its_vip_authoritatively_with_the_ttl() -> None:
    r, d = ask("checkout.shop.svc.clusterset.local.", ttl_s=17)
    assert d.outcome == "mesh" and r.rcode() == dns.rcode.NOERROR
    assert addresses(r) == [VIP]
    assert r.answer[0].ttl == 17
    assert r.flags & dns.flags.AA and r.flags & dns.flags.RA


def test_the_default_ttl_is_ztunnels_30_seconds() -> None:
    r, _ = ask("checkout.shop.svc.clusterset.local.")
    assert r.answer[0].ttl == DEFAULT_TTL_S == 30


def test_names_match_case_insensitively_and_the_answer_keeps_the_askers_case() -> None:
    r, _ = ask("CheckOut.SHOP.svc.ClusterSet.local.")
    assert addresses(r) == [VIP]
    assert r.answer[0].name.to_text() == "CheckOut.SHOP.svc.ClusterSet.local."


def test_a_custom_clusterset_domain_and_the_mcs_zone_both_resolve() -> None:
    for name in ("cart.shop.svc.mesh.example.", "cart.shop.svc.clusterset.local."):
        r, _ = ask(name)
        assert addresses(r) == ["10.96.0.12"], name


@pytest.mark.parametrize("name, rdtype, expected", [
    ("checkout.shop.svc.clusterset.local.", "AAAA", []),          # v4-only VIP: NODATA, not NXDOMAIN
    ("checkout.shop.svc.clusterset.local.", "MX", []),
    ("checkout.shop.svc.clusterset.local.", "TXT", []),
    ("v6only.shop.svc.clusterset.local.", "A", []),
    ("v6only.shop.svc.clusterset.local.", "AAAA", ["fd00::11"]),
    ("checkout.shop.svc.clusterset.local.", "ANY", [VIP]),
])
def test_a_known_name_without_records_of_the_type_is_nodata(name: str, rdtype: str, expected: list[str]) -> None:
    r, d = ask(name, rdtype)
    assert r.rcode() == dns.rcode.NOERROR, "the name exists: NXDOMAIN would hide its other records (RFC 8020)"
    assert addresses(r) == expected
    assert d.outcome == ("mesh" if expected else "nodata")


def test_a_service_without_a_vip_is_a_known_name_with_no_address() -> None:
    r, _ = ask("novip.shop.svc.clusterset.local.", table=DnsTable.from_services([svc("novip", "")]), upstream=True)
    assert r.rcode() == dns.rcode.NOERROR and not r.answer


def test_an_unknown_name_is_forwarded_byte_for_byte() -> None:
    q = dns.message.make_query("www.example.com.", "A", use_edns=0, payload=4096)
    wire = q.to_wire()
    d = decide(wire, TABLE, over_tcp=False, has_upstream=True)
    assert isinstance(d, Forward)
    assert d.query == wire
    assert d.udp_limit == MAX_UDP_PAYLOAD  # the client offered 4096; flag day caps UDP at 1232


@pytest.mark.parametrize("unanswered, rcode", [(Unanswered.NXDOMAIN, dns.rcode.NXDOMAIN),
                                               (Unanswered.SERVFAIL, dns.rcode.SERVFAIL)])
def test_without_an_upstream_an_unknown_name_gets_the_configured_rcode(unanswered: Unanswered, rcode: int) -> None:
    r, d = ask("www.example.com.", unanswered=unanswered)
    assert r.rcode() == rcode and not r.answer and d.outcome == "unanswered"
    # a search-list expansion of a global name is just another unknown name
    r, _ = ask("checkout.shop.svc.clusterset.local.shop.svc.cluster.local.", unanswered=unanswered)
    assert r.rcode() == rcode


# --- truncation --------------------------------------------------------------------------------

MANY = DnsTable({"big.shop.svc.clusterset.local": tuple(f"10.96.1.{i}" for i in range(1, 61))})


def test_an_answer_too_large_for_udp_is_cut_to_the_question_with_tc() -> None:
    r, d = ask("big.shop.svc.clusterset.local.", table=MANY)
    assert d.truncated and r.flags & dns.flags.TC
    assert not r.answer, "no partial answer set: a cache must not keep it"
    assert len(d.wire) <= CLASSIC_UDP_PAYLOAD


def test_over_tcp_the_same_question_gets_every_record() -> None:
    r, d = ask("big.shop.svc.clusterset.local.", table=MANY, over_tcp=True)
    assert not d.truncated and not r.flags & dns.flags.TC
    assert len(addresses(r)) == 60


def test_edns_raises_the_udp_limit_up_to_1232_bytes() -> None:
    r, d = ask("big.shop.svc.clusterset.local.", table=MANY, use_edns=0, payload=4096)
    assert not d.truncated and len(addresses(r)) == 60 and 512 < len(d.wire) <= MAX_UDP_PAYLOAD
    huge = DnsTable({"big.shop.svc.clusterset.local": tuple(f"10.96.{i // 250}.{i % 250 + 1}" for i in range(120))})
    r, d = ask("big.shop.svc.clusterset.local.", table=huge, use_edns=0, payload=4096)
    assert d.truncated and len(d.wire) <= MAX_UDP_PAYLOAD


def _upstream_answer(q: dns.message.Message, n: int, rcode: dns.rcode.Rcode = dns.rcode.NOERROR) -> bytes:
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    if n:
        r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A",
                                            *(f"192.0.2.{i}" for i in range(1, n + 1))))
    return r.to_wire()


def test_an_upstream_reply_passes_unchanged_unless_it_exceeds_the_clients_udp_limit() -> None:
    q = dns.message.make_query("headless.example.", "A")
    fwd = decide(q.to_wire(), TABLE, over_tcp=False, has_upstream=True)
    assert isinstance(fwd, Forward)
    small = _upstream_answer(q, 2)
    assert upstream_reply(fwd, small, over_tcp=False) == Reply(small, "upstream")
    big = _upstream_answer(q, 60)  # an upstream that ignores the 512-byte limit
    cut = upstream_reply(fwd, big, over_tcp=False)
    assert cut is not None and cut.truncated and len(cut.wire) <= CLASSIC_UDP_PAYLOAD
    m = dns.message.from_wire(cut.wire)
    assert m.flags & dns.flags.TC and not m.answer and m.id == q.id
    full = upstream_reply(fwd, big, over_tcp=True)
    assert full is not None and full.wire == big


def test_the_upstreams_own_tc_and_rcode_reach_the_client() -> None:
    q = dns.message.make_query("nope.example.", "A")
    fwd = decide(q.to_wire(), TABLE, over_tcp=False, has_upstream=True)
    assert isinstance(fwd, Forward)
    nx = upstream_reply(fwd, _upstream_answer(q, 0, dns.rcode.NXDOMAIN), over_tcp=False)
    assert nx is not None and dns.message.from_wire(nx.wire).rcode() == dns.rcode.NXDOMAIN
    tc = dns.message.make_response(q)
    tc.flags |= dns.flags.TC
    r = upstream_reply(fwd, tc.to_wire(), over_tcp=False)
    assert r is not None and r.truncated


def test_a_reply_that_is_not_for_the_query_is_ignored() -> None:
    q = dns.message.make_query("www.example.", "A")
    fwd = decide(q.to_wire(), TABLE, over_tcp=False, has_upstream=True)
    assert isinstance(fwd, Forward)
    other_id = dns.message.make_response(q)
    other_id.id = (q.id + 1) % 65536
    other_name = dns.message.make_response(dns.message.make_query("evil.example.", "A"))
    other_name.id = q.id
    for bad in (other_id.to_wire(), other_name.to_wire(), q.to_wire(), b"\x00" * 5):
        assert upstream_reply(fwd, bad, over_tcp=False) is None
    fail = dns.message.from_wire(failure_reply(fwd, over_tcp=False).wire)
    assert fail.rcode() == dns.rcode.SERVFAIL and fail.id == q.id


# --- the reply cache --------------------------------------------------------------------------------


def test_the_reply_cache_answers_a_repeated_question_with_the_new_id() -> None:
    cache = ReplyCache(max_entries=2)
    q1 = dns.message.make_query("checkout.shop.svc.clusterset.local.", "A")
    first = cache.decide(q1.to_wire(), TABLE, over_tcp=False, has_upstream=False)
    q2 = dns.message.make_query("checkout.shop.svc.clusterset.local.", "A")
    q2.id = (q1.id + 1) % 65536
    again = cache.decide(q2.to_wire(), TABLE, over_tcp=False, has_upstream=False)
    assert cache.hits == 1 and isinstance(first, Reply) and isinstance(again, Reply)
    direct = decide(q2.to_wire(), TABLE, over_tcp=False, has_upstream=False)
    assert isinstance(direct, Reply) and again.wire == direct.wire  # byte for byte what decide says
    assert dns.message.from_wire(again.wire).id == q2.id


def test_the_reply_cache_follows_the_table_is_bounded_and_never_holds_forwards() -> None:
    cache = ReplyCache(max_entries=2)
    q = dns.message.make_query("checkout.shop.svc.clusterset.local.", "A").to_wire()
    cache.decide(q, TABLE, over_tcp=False, has_upstream=True)
    moved = DnsTable({"checkout.shop.svc.clusterset.local": ("10.96.0.99",)})
    r = cache.decide(q, moved, over_tcp=False, has_upstream=True)
    assert isinstance(r, Reply) and addresses(dns.message.from_wire(r.wire)) == ["10.96.0.99"] and cache.hits == 0
    for name in ("a.example.", "b.example.", "c.example."):
        d = cache.decide(dns.message.make_query(name, "A").to_wire(), moved, over_tcp=False, has_upstream=True)
        assert isinstance(d, Forward)
    assert len(cache) == 1
    for name in ("a.example.", "b.example.", "c.example."):
        cache.decide(dns.message.make_query(name, "A").to_wire(), moved, over_tcp=False, has_upstream=False)
    assert len(cache) == 2, "least recently used evicted"
    assert isinstance(cache.decide(b"\x01\x02", moved, over_tcp=False, has_upstream=False), Drop)


# --- malformed input -----------------------------------------------------------------------------


def test_malformed_queries() -> None:
    assert isinstance(decide(b"\x12\x34", TABLE, over_tcp=False, has_upstream=True), Drop)
    q = dns.message.make_query("checkout.shop.svc.clusterset.local.", "A")
    resp = dns.message.make_response(q).to_wire()
    assert isinstance(decide(resp, TABLE, over_tcp=False, has_upstream=True), Drop)  # never answer an answer
    garbage = decide(q.to_wire()[:-3], TABLE, over_tcp=False, has_upstream=True)
    assert isinstance(garbage, Reply) and garbage.outcome == "formerr"
    assert garbage.wire[:2] == q.to_wire()[:2] and dns.message.from_wire(garbage.wire).rcode() == dns.rcode.FORMERR
    notify = dns.message.make_query("checkout.shop.svc.clusterset.local.", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    d = decide(notify.to_wire(), TABLE, over_tcp=False, has_upstream=True)
    assert isinstance(d, Reply) and dns.message.from_wire(d.wire).rcode() == dns.rcode.NOTIMP
    two = dns.message.make_query("a.example.", "A")
    two.question.append(dns.rrset.RRset(dns.name.from_text("b.example."), 1, 1))
    d = decide(two.to_wire(), TABLE, over_tcp=False, has_upstream=True)
    assert isinstance(d, Reply) and d.outcome == "formerr"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_get_a_bounded_reply_or_nothing_never_an_exception(data: bytes) -> None:
    d = decide(data, MANY, over_tcp=False, has_upstream=False)
    if isinstance(d, Reply):
        assert len(d.wire) <= MAX_UDP_PAYLOAD and d.wire[:2] == data[:2]


# --- flags ------------------------------------------------------------------------------------------


def test_upstreams_come_from_flags_or_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("search shop.svc.cluster.local\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\n"
                    "nameserver bogus\nnameserver 10.0.0.2\nnameserver 10.0.0.3\noptions ndots:5\n")
    assert nameservers(conf.read_text()) == (("10.96.0.10", 53), ("fe80::1", 53), ("10.0.0.2", 53))
    assert upstreams_from_flags(None, conf) == nameservers(conf.read_text())
    assert upstreams_from_flags(["none"], conf) == ()
    assert upstreams_from_flags(["10.0.0.9:5353", "[fd00::1]:53", "10.0.0.9:5353"], conf) == (
        ("10.0.0.9", 5353), ("fd00::1", 53))
    with pytest.raises(DnsConfigError, match="not an IP address"):
        parse_upstream("kube-dns.kube-system")
    with pytest.raises(DnsConfigError, match=r"1\.\.65535"):
        parse_upstream("10.0.0.1:0")
    with pytest.raises(DnsConfigError, match="--dns-upstream none"):
        upstreams_from_flags(["resolv.conf"], tmp_path / "missing")


def test_the_proxys_table_follows_its_config_and_survives_endpoint_only_deltas() -> None:
    from dataclasses import replace

    from ztunnel.api.config import ProxyConfig, ProxyMode, Stamp
    from ztunnel.xds.state import ProxyState

    state = ProxyState()
    table = ztunnel_main.table_of(state)
    assert table().addresses == {}
    base = ProxyConfig("ztunnel/east/n1", ProxyMode.NODE, "east", "east", "east.mesh", Stamp(1, "a", 1),
                       services=(svc("checkout", VIP),))
    assert state.apply(base).applied
    first = table()
    assert first.addresses["checkout.shop.svc.clusterset.local"] == (VIP,)
    assert state.apply(replace(base, stamp=Stamp(1, "a", 2), services=(replace(base.services[0], connect_timeout_s=2.0),))).applied
    assert table() is first, "same names and VIPs: the same table (the reply cache stays warm)"
    assert state.apply(replace(base, stamp=Stamp(1, "a", 3), services=(svc("checkout", "10.96.0.99"),))).applied
    assert table().addresses["checkout.shop.svc.clusterset.local"] == ("10.96.0.99",)


def test_the_proxy_commands_dns_defaults_are_the_modules() -> None:
    args = ztunnel_main.build_parser().parse_args(["--cert-dir", "x"])
    assert args.dns == "" and args.dns_ttl_s == DEFAULT_TTL_S
    assert args.dns_unanswered == Unanswered.SERVFAIL.value
    assert set(ztunnel_main.DNS_UNANSWERED) == {u.value for u in Unanswered}


def test_a_global_service_answers_under_its_cluster_local_name_too() -> None:
    """Namespace sameness: `<svc>.<ns>.svc.cluster.local` is the global service in every cluster (the
    Istio guide's DestinationRule host); the apps' own search domain finds it as written."""
    r, d = ask("checkout.shop.svc.cluster.local.")
    assert d.outcome == "mesh" and addresses(r) == [VIP]
    r, d = ask("cart.shop.svc.cluster.local.")  # a custom clusterset domain: the cluster-local name still works
    assert addresses(r) == ["10.96.0.12"]
    # a cluster-local name that is no global service is the cluster's DNS's (forwarded upstream)
    q = dns.message.make_query("other.shop.svc.cluster.local.", "A")
    assert isinstance(decide(q.to_wire(), TABLE, over_tcp=False, has_upstream=True, unanswered=Unanswered.SERVFAIL,
                             ttl_s=DEFAULT_TTL_S), Forward)
