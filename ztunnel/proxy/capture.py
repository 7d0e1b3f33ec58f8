"""Outbound capture: connections an application on this node opened, taken over by the node proxy.

Two doors, one protocol: the transparent listener (iptables nat REDIRECT in the node's network
namespace, as istio-cni programs it; the original destination comes back with SO_ORIGINAL_DST)
and the explicit SOCKS5 listener for workloads that cannot be captured. `CaptureProtocol` reads
the destination, buffers the application's early bytes while the tunnel is set up, then hands the
connection to a relay.

Bounded per connection, whatever the application does: a SOCKS5 client must finish its greeting
and request within the proxy's `handshake_timeout_s` (else it is answered "general failure" and
closed), SOCKS5 handshakes in flight are capped per source address and in total (the proxy's
`HandshakeGate`, shared with inbound TLS), and the bytes sent ahead of the tunnel are held up to
`relay.EARLY_BUFFER_BYTES` — beyond that the socket is simply not read until the tunnel is bound.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

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
        self._handshaking = False               # admitted by the proxy's handshake gate, not released
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)   # uvloop's transports are not asyncio's classes
        self.transport = transport
        self.peer_ip = (transport.get_extra_info("peername") or ("", 0))[0]
        if self.proxy.draining:
            transport.abort()
            return
        self.relay.connection_made(transport)
        if self.socks is not None:
            if not self.proxy.admit_handshake(self.peer_ip, "source"):
                transport.abort()
                return
            self._handshaking = True
            self._timer = asyncio.get_running_loop().call_later(self.proxy.opts.handshake_timeout_s,
                                                                self._handshake_timed_out)
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
        self._handshake_over()
        self.proxy.spawn(self.proxy.handle_outbound(self, host, port, is_hostname))

    def _handshake_over(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._handshaking:
            self._handshaking = False
            self.proxy.handshakes.release(self.peer_ip)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if not self._started:
            self.proxy.telemetry.refusal("source", "socks_handshake_timeout")
            self.refuse(f"no SOCKS5 request within {self.proxy.opts.handshake_timeout_s:g}s", 1)
        self._handshake_over()

    def data_received(self, data: bytes) -> None:
        if self.socks is not None and not self._started:
            try:
                reply, req, rest = self.socks.feed(data)
            except Socks5Error as e:
                self.refuse(str(e), e.reply_code)
                self._handshake_over()
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
        self._handshake_over()
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
