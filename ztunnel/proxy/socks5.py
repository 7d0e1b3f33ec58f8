"""SOCKS5 (RFC 1928), server side: the explicit outbound door of a node proxy (port 15080).

Sans-IO: `Socks5Handshake.feed(bytes)` returns what to send, the CONNECT request once complete, and
the bytes the client sent after it. Method 0 (no authentication) and CONNECT only; anything else
is answered with the RFC's reply code and refused.

Bounded by construction: bytes are kept only while a message is incomplete, and a greeting is at
most 257 bytes, a request at most 262, so the buffer never holds more than that plus one read;
whatever follows the request is handed back at once (`capture` bounds it from there, and times
out a client that never completes its request).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


class Socks5Error(Exception):
    def __init__(self, reply_code: int, message: str) -> None:
        super().__init__(message)
        self.reply_code = reply_code


@dataclass(frozen=True, slots=True)
class Socks5Request:
    host: str
    port: int
    is_hostname: bool


class Socks5Handshake:
    """SOCKS5 server side, RFC 1928, method 0 (no auth), command CONNECT only.

    `feed(data)` returns (bytes to send, request or None, leftover bytes after the request).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._greeted = False

    def feed(self, data: bytes) -> tuple[bytes, Socks5Request | None, bytes]:
        self._buf += data
        out = b""
        if not self._greeted:
            if len(self._buf) < 2:
                return b"", None, b""
            if self._buf[0] != 5:
                raise Socks5Error(1, "not SOCKS5 (version byte is not 5)")
            n = self._buf[1]
            if len(self._buf) < 2 + n:
                return b"", None, b""
            methods = bytes(self._buf[2:2 + n])
            del self._buf[:2 + n]
            if 0 not in methods:
                raise Socks5Error(1, "client offers no 'no authentication' method")
            self._greeted = True
            out = b"\x05\x00"
        b = self._buf
        if len(b) < 5:
            return out, None, b""
        if b[0] != 5 or b[1] != 1:
            raise Socks5Error(7, f"only CONNECT is supported (command {b[1]})")
        atyp = b[3]
        if atyp == 1:
            need = 4 + 4 + 2
            if len(b) < need:
                return out, None, b""
            host, is_name = str(ipaddress.IPv4Address(bytes(b[4:8]))), False
        elif atyp == 4:
            need = 4 + 16 + 2
            if len(b) < need:
                return out, None, b""
            host, is_name = str(ipaddress.IPv6Address(bytes(b[4:20]))), False
        elif atyp == 3:
            ln = b[4]
            need = 5 + ln + 2
            if len(b) < need:
                return out, None, b""
            host, is_name = bytes(b[5:5 + ln]).decode("ascii", "replace"), True
        else:
            raise Socks5Error(8, f"address type {atyp} not supported")
        port = int.from_bytes(b[need - 2:need], "big")
        rest = bytes(b[need:])
        self._buf.clear()
        return out, Socks5Request(host, port, is_name), rest

    @staticmethod
    def reply(code: int) -> bytes:
        """0 = succeeded, 1 = general failure, 2 = not allowed, 4 = host unreachable, 5 = refused."""
        return bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])
