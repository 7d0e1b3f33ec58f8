"""The status API on loopback: a POST cannot make the controller buffer (or wait for) an unbounded body."""

from __future__ import annotations

import socket
from typing import Any

from federation.server.status_api import MAX_POST_BODY_BYTES, StatusServer


class Source:
    def __init__(self) -> None:
        self.triggered = 0

    def status(self) -> dict[str, Any]:
        return {"clusters": {}}

    def services(self) -> list[dict[str, Any]]:
        return []

    def endpoints(self, service: str, from_cluster: str | None) -> dict[str, Any]:
        return {}

    def failover_history(self, service: str | None, since_s: float | None) -> list[dict[str, Any]]:
        return []

    def checks(self) -> list[dict[str, Any]]:
        return []

    def trust(self) -> list[dict[str, Any]]:
        return []

    def trust_view(self) -> dict[str, Any]:
        return {}

    def explain(self, service: str, from_cluster: str, zone: str | None) -> dict[str, Any]:
        return {}

    def trigger_git(self) -> None:
        self.triggered += 1


def _post(port: int, content_length: str, body: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(f"POST /api/v1/reconcile HTTP/1.1\r\nHost: x\r\nContent-Length: {content_length}\r\n"
                  "Connection: close\r\n\r\n".encode() + body)
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        return out


def test_oversized_or_bogus_body_is_refused_at_once_and_a_plain_trigger_works() -> None:
    src = Source()
    srv = StatusServer(src, "127.0.0.1:0").start()
    try:
        # without a cap the server would wait for (and buffer) a gigabyte that never comes
        assert _post(srv.port, str(10**9)).startswith(b"HTTP/1.0 413")
        assert _post(srv.port, str(MAX_POST_BODY_BYTES + 1)).startswith(b"HTTP/1.0 413")
        assert _post(srv.port, "-5").startswith(b"HTTP/1.0 413")
        assert src.triggered == 0
        assert _post(srv.port, "2", b"{}").startswith(b"HTTP/1.0 202")
        assert src.triggered == 1
    finally:
        srv.stop()
