"""Who the node proxy's DNS responder answers (review finding 4). Pure: no sockets.

The responder exists for the node's captured pods: their udp/tcp 53 is redirected to it
(`ztunnel.proxy.capture_rules`), and it forwards what the mesh does not know to the cluster's
resolver. On the kind DaemonSet it listens on every address of a host-network pod, so without a
check any host that reaches a node's IP on 15053 would get recursion through kube-dns (the
cluster's service names) and an amplifier (a ~50-byte query, replies up to 1232 bytes).

A source is answered when it is
- one of the node's captured pods (`enrolled`: the same set the capture rules redirect, from the
  config the proxy holds now), or
- in a network given with `--dns-allow-from CIDR` (the cluster's pod CIDRs on kind: a pod whose
  address the config does not list yet still resolves), or
- the node itself on loopback (127.0.0.1, ::1: an operator's `dig @127.0.0.1 -p 15053`).

Not the node network: on kind every node of every cluster on the machine shares one Docker network
with the host, and nothing there is redirected to us. Anything else gets no answer at all: over
UDP silence (a refusal would still be a reflected packet, and the source may be spoofed), over
TCP the connection is closed at once.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

NODE_ITSELF = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))


class DnsClientsError(ValueError):
    """A `--dns-allow-from` value that is not a network; the message names the fix."""


def parse_networks(values: Iterable[str]) -> tuple[IpNetwork, ...]:
    out: list[IpNetwork] = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            raise DnsClientsError(f"--dns-allow-from {v!r} is not a network: give a CIDR such as 10.244.0.0/16 "
                                  "(the cluster's pod CIDR)") from None
    return tuple(dict.fromkeys(out))


def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped   # a dual-stack socket reports an IPv4 client as ::ffff:a.b.c.d
    return addr


@dataclass(frozen=True, slots=True)
class DnsClients:
    """The networks answered besides the captured pods (`allowed`), and the node itself."""

    allowed: tuple[IpNetwork, ...] = ()

    def admits(self, ip: str, enrolled: frozenset[str]) -> bool:
        addr = _address(ip)
        if addr is None:
            return False
        if str(addr) in enrolled:
            return True
        return any(addr in net for net in (*NODE_ITSELF, *self.allowed) if addr.version == net.version)
