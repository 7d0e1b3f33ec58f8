"""The SOCKS5 fallback listener's parser (sans-IO: bytes in, reply bytes and a request out),
and the PROXY v2 identity header the inbound side writes."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clusters.lab.demo_server import parse_proxy_v2
from ztunnel.proxy import proxyproto
from ztunnel.proxy.capture import parse_sockaddr_in
from ztunnel.proxy.socks5 import Socks5Error, Socks5Handshake, Socks5Request

GREETING = b"\x05\x01\x00"


def connect_ipv4(ip: str, port: int) -> bytes:
    return b"\x05\x01\x00\x01" + socket.inet_aton(ip) + port.to_bytes(2, "big")


def connect_name(name: str, port: int) -> bytes:
    return b"\x05\x01\x00\x03" + bytes([len(name)]) + name.encode() + port.to_bytes(2, "big")


@pytest.mark.parametrize(("request_bytes", "expected"), [
    (connect_ipv4("10.0.0.7", 80), Socks5Request("10.0.0.7", 80, False)),
    (connect_name("echo.default.svc.clusterset.local", 8080),
     Socks5Request("echo.default.svc.clusterset.local", 8080, True)),
    (b"\x05\x01\x00\x04" + socket.inet_pton(socket.AF_INET6, "fd00::5") + (443).to_bytes(2, "big"),
     Socks5Request("fd00::5", 443, False)),
])
def test_greeting_and_connect_in_one_packet(request_bytes: bytes, expected: Socks5Request) -> None:
    out, req, rest = Socks5Handshake().feed(GREETING + request_bytes + b"early data")
    assert out == b"\x05\x00"            # method "no authentication"
    assert req == expected
    assert rest == b"early data"         # bytes after the request belong to the tunnel


@given(st.data())
def test_any_split_of_the_bytes_gives_the_same_request(data: st.DataObject) -> None:
    wire = GREETING + connect_name("svc.ns.svc.clusterset.local", 15000) + b"payload"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    h = Socks5Handshake()
    replies, found, rest = b"", None, b""
    for piece in pieces:
        if found is not None:
            rest += piece
            continue
        out, req, leftover = h.feed(piece)
        replies += out
        if req is not None:
            found, rest = req, leftover
    assert replies == b"\x05\x00"
    assert found == Socks5Request("svc.ns.svc.clusterset.local", 15000, True)
    assert rest == b"payload"


@pytest.mark.parametrize(("wire", "code"), [
    (b"\x04\x01\x00\x50", 1),                                     # SOCKS4
    (b"\x05\x01\x02", 1),                                         # only username/password offered
    (GREETING + b"\x05\x02\x00\x01" + bytes(6), 7),               # BIND is not supported
    (GREETING + b"\x05\x03\x00\x01" + bytes(6), 7),               # UDP ASSOCIATE is not supported
    (GREETING + b"\x05\x01\x00\x09" + bytes(6), 8),               # unknown address type
])
def test_refusals_carry_the_socks_reply_code(wire: bytes, code: int) -> None:
    with pytest.raises(Socks5Error) as ei:
        Socks5Handshake().feed(wire)
    assert ei.value.reply_code == code


def test_incomplete_input_waits_for_more() -> None:
    h = Socks5Handshake()
    assert h.feed(b"\x05") == (b"", None, b"")
    out, req, _ = h.feed(b"\x01\x00\x05\x01\x00\x01\x0a")
    assert out == b"\x05\x00" and req is None
    out, req, _ = h.feed(b"\x00\x00\x01\x00\x50")
    assert out == b"" and req == Socks5Request("10.0.0.1", 80, False)


@pytest.mark.parametrize("code", [0, 1, 2, 4, 5])
def test_reply_format(code: int) -> None:
    r = Socks5Handshake.reply(code)
    assert len(r) == 10 and r[0] == 5 and r[1] == code and r[3] == 1


def test_sockaddr_in_of_so_original_dst() -> None:
    raw = (socket.AF_INET.to_bytes(2, "little") + (8080).to_bytes(2, "big") + socket.inet_aton("10.96.0.10")
           + bytes(8))
    assert parse_sockaddr_in(raw) == ("10.96.0.10", 8080)


# --- PROXY v2 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("src", "dst"), [
    (("10.1.0.5", 40000), ("10.2.0.9", 8080)),
    (("fd00::1", 1234), ("fd00::2", 80)),
    (("10.1.0.5", 40000), ("fd00::2", 80)),   # mixed families: source left unspecified
    (("", 0), ("10.2.0.9", 8080)),            # unknown source
])
def test_proxy_v2_header_is_read_by_the_demo_servers_parser(src: tuple[str, int], dst: tuple[str, int]) -> None:
    ident = "spiffe://east.mesh/ns/shop/sa/frontend"
    hdr = proxyproto.build_header(src, dst, ident)
    n = int.from_bytes(hdr[14:16], "big")
    assert len(hdr) == 16 + n
    info = parse_proxy_v2(hdr[:16], hdr[16:])
    assert info.peer_identity == ident
    assert info.destination.endswith(f":{dst[1]}") and dst[0] in info.destination


@pytest.mark.parametrize(("labels", "wanted"), [
    ({proxyproto.LABEL: "v2"}, True), ({proxyproto.LABEL: "V2"}, True),
    ({proxyproto.LABEL: "v1"}, False), ({}, False),
])
def test_proxy_v2_is_opt_in_by_label(labels: dict[str, str], wanted: bool) -> None:
    assert proxyproto.wants_proxy_v2(labels) is wanted
