"""The status API on loopback: a POST cannot make the controller buffer (or wait for) an unbounded
body; the graph and revision routes; the read check every read passes (the console's fragments
too, its page and static files not); the console's security headers."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest

from federation.server.console import CSP
from federation.server.status_api import MAX_POST_BODY_BYTES, Headers, StatusServer


class Source:
    def __init__(self) -> None:
        self.triggered = 0
        self.revision_queries: list[tuple[str | None, int]] = []

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

    def graph(self) -> dict[str, Any]:
        return {"revision": "a" * 40, "networks": {}, "clusters": [], "trust": [], "services": [], "failovers": []}

    def revisions(self, sha: str | None, limit: int) -> list[dict[str, Any]]:
        self.revision_queries.append((sha, limit))
        return []

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


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_graph_and_revisions_routes_validate_their_arguments() -> None:
    src = Source()
    srv = StatusServer(src, "127.0.0.1:0").start()
    try:
        code, _, body = _get(srv.url + "/api/v1/graph")
        assert code == 200 and json.loads(body)["failovers"] == []
        assert _get(srv.url + "/api/v1/revisions?sha=ABCD1234&limit=5")[0] == 200
        assert _get(srv.url + "/api/v1/revisions")[0] == 200
        assert src.revision_queries == [("abcd1234", 5), (None, 20)]
        for bad in ("sha=abc", "sha=zzzz", "sha=ab%25d", "limit=0", "limit=10000", "limit=x"):
            code, _, body = _get(srv.url + "/api/v1/revisions?" + bad)
            assert code == 400 and json.loads(body)["error"], bad
        assert len(src.revision_queries) == 2          # refused before asking the controller
    finally:
        srv.stop()


def test_the_console_is_served_on_the_same_listener_with_a_strict_csp() -> None:
    srv = StatusServer(Source(), "127.0.0.1:0").start()
    try:
        code, headers, body = _get(srv.url + "/console/")
        assert code == 200 and headers["Content-Type"].startswith("text/html")
        assert headers["Content-Security-Policy"] == CSP and headers["X-Content-Type-Options"] == "nosniff"
        assert b'hx-get="/console/live"' in body
        code, headers, _ = _get(srv.url + "/console/live")
        assert code == 200 and headers["Cache-Control"] == "no-store" and headers["Content-Security-Policy"] == CSP
        assert _get(srv.url + "/console/static/htmx.min.js")[1]["Content-Type"].startswith("text/javascript")
        assert _get(srv.url + "/console/static/../status_api.py")[0] == 404
    finally:
        srv.stop()


@pytest.mark.parametrize("path, public", [
    ("/console/", True), ("/console/static/console.js", True), ("/", True),
    ("/console/live", False), ("/console/explain?service=checkout&from=east", False),
    ("/console/commit?sha=abcd", False), ("/api/v1/status", False), ("/api/v1/graph", False),
    ("/metrics", False),
])
def test_every_read_of_state_passes_the_read_check_and_the_page_does_not_need_to(path: str, public: bool) -> None:
    asked: list[str | None] = []

    def only_bearer(headers: Headers) -> bool:
        asked.append(headers.get("Authorization"))
        return headers.get("Authorization") == "Bearer t0ken"

    srv = StatusServer(Source(), "127.0.0.1:0", authorize_read=only_bearer).start()
    try:
        code, headers, body = _get(srv.url + path)
        if public:
            assert code in (200, 302) and asked == []
        else:
            assert code == 401 and headers["WWW-Authenticate"] == 'Bearer realm="meshfed"'
            assert b"Authorization: Bearer" in body and asked == [None]
            assert _get(srv.url + path, {"Authorization": "Bearer t0ken"})[0] == 200
    finally:
        srv.stop()
