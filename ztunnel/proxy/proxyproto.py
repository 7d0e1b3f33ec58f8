"""PROXY protocol v2 header with the peer's verified identity (pure; bytes out, no I/O).

The node ztunnel terminates mTLS, so the workload behind it never sees who called. Pods that want
to know opt in with the label `networking.meshfed.dev/inbound-proxy-protocol: v2`: the inbound
ztunnel then writes, before any tunnel byte, a PROXY v2 header (haproxy's PROXY protocol spec §2.2)
carrying the source and destination addresses and the peer's SPIFFE ID in TLV type 0xD0 — the way
Istio's ztunnel hands the identity to a sandwiched waypoint. The identity is the one verified on the
HBONE mTLS connection (end to end through a gateway), never a header the peer chose.

Layout: 12-byte signature, version/command 0x21 (v2, PROXY), family 0x11 (TCP/IPv4) or 0x21
(TCP/IPv6), 16-bit length, addresses, ports, then TLVs (type, 16-bit length, value).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping
from typing import Final

SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
TLV_PEER_IDENTITY: Final = 0xD0
LABEL: Final = "networking.meshfed.dev/inbound-proxy-protocol"
_V2_PROXY: Final = 0x21
_TCP4: Final = 0x11
_TCP6: Final = 0x21


def wants_proxy_v2(labels: Mapping[str, str]) -> bool:
    """Does a workload with these labels ask for the PROXY v2 identity header?"""
    return labels.get(LABEL, "").lower() == "v2"


def build_header(source: tuple[str, int], destination: tuple[str, int], peer_identity: str) -> bytes:
    """The header for one connection. Mixed address families fall back to the destination's family
    with an unspecified source (the identity TLV is what matters to the workload)."""
    dst_ip = ipaddress.ip_address(destination[0])
    try:
        src_ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(source[0])
    except ValueError:
        src_ip = ipaddress.IPv4Address(0) if dst_ip.version == 4 else ipaddress.IPv6Address(0)
    src_port = source[1]
    if src_ip.version != dst_ip.version:
        src_ip = ipaddress.IPv4Address(0) if dst_ip.version == 4 else ipaddress.IPv6Address(0)
        src_port = 0
    family = _TCP4 if dst_ip.version == 4 else _TCP6
    addrs = src_ip.packed + dst_ip.packed + struct.pack("!HH", src_port, destination[1])
    ident = peer_identity.encode()
    if len(ident) > 0xFFFF:
        raise ValueError("peer identity too long for a PROXY v2 TLV")
    tlv = struct.pack("!BH", TLV_PEER_IDENTITY, len(ident)) + ident if ident else b""
    body = addrs + tlv
    return SIGNATURE + bytes([_V2_PROXY, family]) + struct.pack("!H", len(body)) + body
