"""Outbound capture: connections an application on this node opened, taken over by the node proxy.

Two doors, one protocol: the transparent listener (iptables nat REDIRECT in the node's network
namespace, as istio-cni programs it; the original destination comes back with SO_ORIGINAL_DST)
and the explicit SOCKS5 listener for workloads that cannot be captured. `CaptureProtocol` reads
the destination, buffers the application's early bytes (bounded) while the tunnel is set up, then
hands the connection to a relay.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from ztunnel.hbone.framer import ErrorCode
from ztunnel.proxy.relay import HboneStream, PlainRelay, RelayStats, abort_with_reset
from ztunnel.proxy.socks5 import Socks5Error, Socks5Handshake

if TYPE_CHECKING:
    from ztunnel.proxy.node import NodeProxy


SO_ORIGINAL_DST = 80


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """The pre-REDIRECT destination of a captured connection (iptables nat REDIRECT, as istio-cni)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    return parse_sockaddr_in(raw)


def parse_sockaddr_in(raw: bytes) -> tuple[str, int]:
    """struct sockaddr_in → (ip, port)."""
    port = int.from_bytes(raw[2:4], "big")
    ip = str(ipaddress.IPv4Address(raw[4:8]))
    return ip, port


class CaptureProtocol(asyncio.Protocol):
    """An application connection captured for outbound: reads the SOCKS5 request (or the original
    destination), buffers early bytes while the tunnel is being set up, then hands over to a relay."""

    def __init__(self, proxy: NodeProxy, socks: bool) -> None:
        self.proxy = proxy
        self.socks = Socks5Handshake() if socks else None
        self.transport: asyncio.Transport | None = None
        self.peer_ip = ""
        self.relay = PlainRelay()
        self._started = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer_ip = (transport.get_extra_info("peername") or ("", 0))[0]
        if self.proxy.draining:
            transport.abort()
            return
        self.relay.connection_made(transport)
        if self.socks is None:
            sock: socket.socket = transport.get_extra_info("socket")
            try:
                host, port = original_destination(sock)  # type: ignore[arg-type]
            except OSError:
                self.refuse("no original destination (SO_ORIGINAL_DST): is the iptables REDIRECT installed?", 1)
                return
            if (host, port) in self.proxy.own_addresses:
                self.refuse("connection to the proxy's own outbound port refused (loop)", 2)
                return
            self._begin(host, port, False)

    def _begin(self, host: str, port: int, is_hostname: bool) -> None:
        self._started = True
        self.proxy.spawn(self.proxy.handle_outbound(self, host, port, is_hostname))

    def data_received(self, data: bytes) -> None:
        if self.socks is not None and not self._started:
            try:
                reply, req, rest = self.socks.feed(data)
            except Socks5Error as e:
                self.refuse(str(e), e.reply_code)
                return
            if reply and self.transport is not None:
                self.transport.write(reply)
            if req is not None:
                if rest:
                    self.relay.data_received(rest)
                self._begin(req.host, req.port, req.is_hostname)
            return
        self.relay.data_received(data)

    def eof_received(self) -> bool:
        return self.relay.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.connection_lost(exc)

    def pause_writing(self) -> None:
        self.relay.pause_writing()

    def resume_writing(self) -> None:
        self.relay.resume_writing()

    def refuse(self, reason: str, socks_code: int) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if self.socks is not None:
            t.write(Socks5Handshake.reply(socks_code))
            t.close()
        else:
            abort_with_reset(t)

    def start_relay(self, stream: HboneStream, on_done: Callable[[RelayStats], None]) -> None:
        t = self.transport
        if t is None or t.is_closing():
            stream.reset(ErrorCode.CANCEL)
            return
        if self.socks is not None:
            t.write(Socks5Handshake.reply(0))
        self.relay._on_done = on_done
        self.relay.bind(stream)
