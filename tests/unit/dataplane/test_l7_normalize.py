"""Request normalization (`ztunnel.proxy.l7.normalize`) and the bypasses of the security review
(finding 1): every spelling of a denied path or host is refused by the DENY rule, and what goes
upstream is the normalized request line the rule was decided on. In memory: bytes through the
real codecs (llhttp, h2) into `plan_request`, then the upstream request line from `Http1Client`."""

from __future__ import annotations

import h2.config
import h2.connection
import pytest

from ztunnel.api import authz
from ztunnel.api.config import (
    Authorization,
    AuthzMatch,
    HttpBackend,
    HttpMatch,
    HttpRoute,
    HttpRouteRule,
    StringMatch,
)
from ztunnel.proxy.l7.engine import Arrival, Forward, L7Index, Refuse, plan_request
from ztunnel.proxy.l7.h2c import H2Server, StreamRequest
from ztunnel.proxy.l7.http1 import Http1Client, Http1Server, RequestReady
from ztunnel.proxy.l7.normalize import (
    Authority,
    Malformed,
    normalize_host,
    normalize_path,
    normalize_request,
    remove_dot_segments,
)
from ztunnel.proxy.l7.routing import RequestHead

from .test_l7_routing import HOST, PARENT, index

PEER = authz.peer_from_identity("spiffe://east.mesh/ns/shop/sa/frontend")
TARGET = ("Service/shop/checkout",)
DENY_ADMIN = Authorization("no-admin", "shop", "DENY", (AuthzMatch(paths=("/admin*",)),), targets=TARGET)
DENY_HOST = Authorization("no-internal", "shop", "DENY", (AuthzMatch(hosts=("internal.example.com",)),), targets=TARGET)
ALLOW_PUBLIC = Authorization("public-only", "shop", "ALLOW", (AuthzMatch(paths=("/public/*",)),), targets=TARGET)


def h1_head(target: bytes, host: bytes = b"checkout", extra: bytes = b"") -> RequestHead:
    ev = Http1Server().receive(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra + b"\r\n", 0.0)
    assert len(ev) == 1 and isinstance(ev[0], RequestReady), ev
    return ev[0].head


def plan(head: RequestHead, *policies: Authorization, ix: L7Index | None = None) -> Forward | Refuse:
    ix = ix or index(authorizations=policies)
    return plan_request(ix, Arrival(ix.services_by_host[HOST], 80), PEER, head, 0.5)


def upstream_line(p: Forward | Refuse) -> bytes:
    assert isinstance(p, Forward), p
    return Http1Client().request(p.request, b"").split(b"\r\n")[0]


# --- the review's table: each spelling of /admin/users is denied ---------------------------------

@pytest.mark.parametrize("target", [
    b"/admin/users", b"//admin/users", b"///admin//users", b"/./admin/users", b"/x/../admin/users",
    b"/%61dmin/users", b"/%2e/admin", b"/%2E%2E/admin", b"/admin/.", b"/admin/x/..", b"/public/../admin",
    b"/..%2f..", b"/%2Fadmin", b"/admin%2fusers", b"/%5Cadmin", b"/\\admin", b"/admin%00",
    b"http://checkout/admin/users", b"HTTP://checkout//admin", b"/admin#x",
])
def test_every_spelling_of_a_denied_path_is_refused(target: bytes) -> None:
    p = plan(h1_head(target), DENY_ADMIN)
    assert isinstance(p, Refuse) and p.status in (400, 403), (target, p)


@pytest.mark.parametrize(("target", "upstream"), [
    (b"//public///a", b"GET /public/a HTTP/1.1"),
    (b"/x/../public/./a", b"GET /public/a HTTP/1.1"),
    (b"/%70ublic/%7e%41?q=%2F", b"GET /public/~A?q=%2F HTTP/1.1"),   # the query is not the path
    (b"/public/%c3%a9", b"GET /public/%C3%A9 HTTP/1.1"),            # reserved or non-ASCII: kept, hex upper
    (b"/public/%2561", b"GET /public/%2561 HTTP/1.1"),              # decoded once, never twice
    (b"http://checkout/public/a?x=1", b"GET /public/a?x=1 HTTP/1.1"),
])
def test_the_upstream_sees_the_path_authorization_saw(target: bytes, upstream: bytes) -> None:
    assert upstream_line(plan(h1_head(target), DENY_ADMIN)) == upstream


def test_allow_rules_cannot_be_escaped_with_dot_segments() -> None:
    assert isinstance(plan(h1_head(b"/public/a"), ALLOW_PUBLIC), Forward)
    for escape in (b"/public/../admin", b"/public/%2e%2e/admin", b"/public/..\\admin"):
        p = plan(h1_head(escape), ALLOW_PUBLIC)
        assert isinstance(p, Refuse) and p.status == 403, escape


@pytest.mark.parametrize("host", [b"internal.example.com", b"internal.example.com.", b"internal.example.com.:80",
                                  b"INTERNAL.Example.COM", b"Internal.example.com.:8080"])
def test_every_spelling_of_a_denied_host_is_refused(host: bytes) -> None:
    p = plan(h1_head(b"/", host=host), DENY_HOST)
    assert isinstance(p, Refuse) and p.status == 403, host


def test_the_forwarded_host_is_the_normalized_one_and_two_hosts_are_refused() -> None:
    p = plan(h1_head(b"/", host=b"Checkout.:8080"))
    assert isinstance(p, Forward) and p.request.host == "checkout:8080"
    assert b"host: checkout:8080\r\n" in Http1Client().request(p.request, b"")
    dup = plan(h1_head(b"/", host=b"ok.example.com", extra=b"Host: internal.example.com\r\n"), DENY_HOST)
    assert isinstance(dup, Refuse) and dup.status == 400 and "repeated Host" in dup.reason
    other = plan(h1_head(b"http://internal.example.com/", host=b"checkout"), DENY_HOST)
    assert isinstance(other, Refuse) and other.status == 400 and "two hosts" in other.reason


def test_route_matches_see_the_normalized_path() -> None:
    route = HttpRoute("shop", "r", "HTTPRoute", (PARENT,), (
        HttpRouteRule(name="exact", matches=(HttpMatch(path=StringMatch("Exact", "/admin")),),
                      backends=(HttpBackend("Service", HOST, 80),)),))
    ix = index(route)
    for target in (b"/admin", b"//admin", b"/x/../admin", b"/%61dmin", b"/admin/."[:-2]):
        p = plan(h1_head(target), ix=ix)
        assert isinstance(p, Forward) and p.route_name.endswith("rule exact"), target


def h2_head(path: str, authority: str = "checkout", method: str = "GET",
            extra: tuple[tuple[str, str], ...] = ()) -> RequestHead:
    cli = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="latin-1"))
    cli.initiate_connection()
    srv = H2Server()
    srv.receive(cli.data_to_send(), 0.0)
    cli.receive_data(srv.data_to_send())
    cli.send_headers(1, [(":method", method), (":scheme", "http"), (":authority", authority), (":path", path),
                         *extra], end_stream=True)
    [ev] = srv.receive(cli.data_to_send(), 0.0)
    assert isinstance(ev, StreamRequest)
    return ev.head


def test_h2c_requests_get_the_same_normal_form() -> None:
    assert isinstance(plan(h2_head("//admin/users"), DENY_ADMIN), Refuse)
    assert isinstance(plan(h2_head("/", authority="INTERNAL.example.com."), DENY_HOST), Refuse)
    assert upstream_line(plan(h2_head("/a/./b/../c"))) == b"GET /a/c HTTP/1.1"
    # h2 itself refuses an `:authority` and a Host that differ byte for byte; spelled alike, they are one host
    mismatch = plan(RequestHead("GET", "/", "checkout", (("host", "internal.example.com"),)), DENY_HOST)
    assert isinstance(mismatch, Refuse) and mismatch.status == 400
    assert isinstance(plan(RequestHead("GET", "/", "Checkout.", (("host", "checkout:80"),))), Forward)
    # what h2 lets through that an HTTP/1.1 request line cannot carry: refused, never forwarded
    spaced = plan(h2_head("/ok HTTP/1.1"))
    assert isinstance(spaced, Refuse) and spaced.status == 400


# --- the pure functions -------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "normal"), [
    ("/", "/"), ("/a/b", "/a/b"), ("/a/./b", "/a/b"), ("/a/../b", "/b"), ("/../a", "/a"), ("/a/..", "/"),
    ("/a/.", "/a/"), ("/a//b", "/a/b"), ("/a//../b", "/a/b"), ("/a/b/", "/a/b/"), ("/%41%2d%5F", "/A-_"),
    ("/a%20b", "/a%20b"), ("/a%3fb", "/a%3Fb"), ("/a\\b", "/a/b"), ("/.%2e/a", "/a"), ("/a..b/c.", "/a..b/c."),
])
def test_normalize_path(path: str, normal: str) -> None:
    assert normalize_path(path) == normal
    assert normalize_path(normal) == normal   # idempotent


@pytest.mark.parametrize("path", ["/a%2fb", "/a%5cb", "/%00", "/%1f", "/%7F", "/%", "/%4", "/%zz"])
def test_normalize_path_rejects(path: str) -> None:
    bad = normalize_path(path)
    assert isinstance(bad, Malformed) and bad.status == 400


def test_remove_dot_segments_is_rfc_3986() -> None:  # RFC 3986 §5.2.4's own examples, for absolute paths
    assert remove_dot_segments("/a/b/c/./../../g") == "/a/g"
    assert remove_dot_segments("/mid/content=5/../6") == "/mid/6"


@pytest.mark.parametrize(("host", "normal"), [
    ("Example.COM", Authority("example.com", None)), ("example.com.", Authority("example.com", None)),
    ("example.com.:8080", Authority("example.com", 8080)), ("[::1]:80", Authority("[::1]", 80)),
    ("10.0.0.1:1", Authority("10.0.0.1", 1)), ("", Authority("", None)),
])
def test_normalize_host(host: str, normal: Authority) -> None:
    assert normalize_host(host) == normal


@pytest.mark.parametrize("host", ["a..b", ".", "a.b:0", "a.b:70000", "a.b:x", "a b", "a/b", "[zz]", "a%2eb", "[::1]x"])
def test_normalize_host_rejects(host: str) -> None:
    assert isinstance(normalize_host(host), Malformed)


@pytest.mark.parametrize(("method", "target", "status"), [
    ("get", "/", 400), ("GET /x HTTP/1.1\r\n", "/", 400), ("CONNECT", "/", 501), ("GET", "*", 400),
    ("GET", "x", 400), ("GET", "ftp://a/b", 400), ("GET", "http://u@a/b", 400), ("GET", "/a b", 400),
    ("GET", "", 400), ("GET", "/\u00e9", 400),
])
def test_malformed_requests(method: str, target: str, status: int) -> None:
    bad = normalize_request(RequestHead(method, target, "a"))
    assert isinstance(bad, Malformed) and bad.status == status, bad


def test_options_asterisk_and_an_already_normal_request_are_kept() -> None:
    head = RequestHead("OPTIONS", "*", "a")
    assert normalize_request(head) is head
    same = RequestHead("GET", "/a?b=%2F", "a:80", (("host", "a:80"),))
    assert normalize_request(same) is same
