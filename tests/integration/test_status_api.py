"""The status API: a POST cannot make the controller buffer (or wait for) an unbounded body; writes
need the controller's bearer token (compared in constant time), and so does everything when the
API listens beyond loopback (it refuses to start there without one) or reads are told to need it
(the console's fragments too, its page and static files not); every request is logged, never with
its token; the CLI and the lab's Git push hook send the token from its file; the graph and
revision routes; the console's security headers."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from federation.server.console import CSP
from federation.server.status_api import MAX_POST_BODY_BYTES, StatusServer


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


TOKEN = "t0ken-for-the-status-api-tests"


def _post(port: int, content_length: str, body: bytes = b"", token: str | None = TOKEN) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(f"POST /api/v1/reconcile HTTP/1.1\r\nHost: x\r\nContent-Length: {content_length}\r\n{auth}"
                  "Connection: close\r\n\r\n".encode() + body)
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        return out


def test_oversized_or_bogus_body_is_refused_at_once_and_a_plain_trigger_works() -> None:
    src = Source()
    srv = StatusServer(src, "127.0.0.1:0", token=TOKEN).start()
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


def _fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
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
        code, _, body = _fetch(srv.url + "/api/v1/graph")
        assert code == 200 and json.loads(body)["failovers"] == []
        assert _fetch(srv.url + "/api/v1/revisions?sha=ABCD1234&limit=5")[0] == 200
        assert _fetch(srv.url + "/api/v1/revisions")[0] == 200
        assert src.revision_queries == [("abcd1234", 5), (None, 20)]
        for bad in ("sha=abc", "sha=zzzz", "sha=ab%25d", "limit=0", "limit=10000", "limit=x"):
            code, _, body = _fetch(srv.url + "/api/v1/revisions?" + bad)
            assert code == 400 and json.loads(body)["error"], bad
        assert len(src.revision_queries) == 2          # refused before asking the controller
    finally:
        srv.stop()


def _get(port: int, path: str = "/api/v1/status", token: str | None = None) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=3) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_writes_need_the_token_and_every_request_is_logged() -> None:
    src, log = Source(), []
    srv = StatusServer(src, "127.0.0.1:0", token=TOKEN, log=log.append).start()
    try:
        assert _post(srv.port, "0", token=None).startswith(b"HTTP/1.0 401")          # no token
        assert _post(srv.port, "0", token="x" * len(TOKEN)).startswith(b"HTTP/1.0 401")  # a wrong one
        assert _post(srv.port, "0", token=TOKEN[:-1]).startswith(b"HTTP/1.0 401")   # a prefix of it
        assert src.triggered == 0
        # an unauthenticated POST is refused before its body is read (no 413, no wait)
        assert _post(srv.port, str(10**9), token=None).startswith(b"HTTP/1.0 401")
        assert _post(srv.port, "0").startswith(b"HTTP/1.0 202") and src.triggered == 1
        assert _get(srv.port)[0] == 200                                              # loopback: reads open
    finally:
        srv.stop()
    assert [(e["method"], e["status"], e["authenticated"]) for e in log] == [
        ("POST", 401, False), ("POST", 401, False), ("POST", 401, False), ("POST", 401, False),
        ("POST", 202, True), ("GET", 200, False)]
    assert all(e["path"] in ("/api/v1/reconcile", "/api/v1/status") and e["client"] == "127.0.0.1" for e in log)
    assert TOKEN not in repr(log)


def test_without_a_token_writes_are_disabled() -> None:
    src = Source()
    srv = StatusServer(src, "127.0.0.1:0", log=lambda e: None).start()
    try:
        assert b"writes are disabled" in _post(srv.port, "0", token="anything")
        assert src.triggered == 0
    finally:
        srv.stop()


def test_the_console_is_served_on_the_same_listener_with_a_strict_csp() -> None:
    srv = StatusServer(Source(), "127.0.0.1:0").start()
    try:
        code, headers, body = _fetch(srv.url + "/console/")
        assert code == 200 and headers["Content-Type"].startswith("text/html")
        assert headers["Content-Security-Policy"] == CSP and headers["X-Content-Type-Options"] == "nosniff"
        assert b'hx-get="/console/live"' in body
        code, headers, _ = _fetch(srv.url + "/console/live")
        assert code == 200 and headers["Cache-Control"] == "no-store" and headers["Content-Security-Policy"] == CSP
        assert _fetch(srv.url + "/console/static/htmx.min.js")[1]["Content-Type"].startswith("text/javascript")
        assert _fetch(srv.url + "/console/static/../status_api.py")[0] == 404
    finally:
        srv.stop()


def test_beyond_loopback_everything_needs_the_token() -> None:
    import pytest

    with pytest.raises(ValueError, match="not loopback"):
        StatusServer(Source(), "0.0.0.0:0")
    srv = StatusServer(Source(), "0.0.0.0:0", token=TOKEN, log=lambda e: None).start()
    try:
        for path in ("/api/v1/status", "/metrics", "/api/v1/check"):
            code, body = _get(srv.port, path)
            assert code == 401 and b"token" in body, path
            assert _get(srv.port, path, token="wrong-token-of-some-length")[0] == 401
            assert _get(srv.port, path, token=TOKEN)[0] == 200
    finally:
        srv.stop()


@pytest.mark.parametrize("path, public", [
    ("/console/", True), ("/console/static/console.js", True), ("/", True),
    ("/console/live", False), ("/console/explain?service=checkout&from=east", False),
    ("/console/commit?sha=abcd", False), ("/api/v1/status", False), ("/api/v1/graph", False),
    ("/metrics", False),
])
def test_every_read_of_state_passes_the_read_check_and_the_page_does_not_need_to(path: str, public: bool) -> None:
    srv = StatusServer(Source(), "127.0.0.1:0", token="t0ken-of-the-controller", log=lambda e: None,
                       reads_need_token=True).start()
    try:
        code, headers, body = _fetch(srv.url + path)
        if public:
            assert code in (200, 302)   # without any Authorization header
        else:
            assert code == 401 and headers["WWW-Authenticate"] == 'Bearer realm="meshfed"'
            assert b"Authorization: Bearer" in body
            assert _fetch(srv.url + path, {"Authorization": "Bearer wrong"})[0] == 401
            assert _fetch(srv.url + path, {"Authorization": "Bearer t0ken-of-the-controller"})[0] == 200
    finally:
        srv.stop()


def test_the_in_cluster_controllers_readiness_probe_needs_no_token() -> None:
    """The in-cluster controller serves status on 0.0.0.0 (so: the token for everything); the
    kubelet's probe has no token, so it probes /healthz, which says nothing about the fleet."""
    import gitops
    from clusters.kind.manifests import controller_objects

    snap = gitops.load_worktree(Path(__file__).resolve().parents[2] / "examples" / "fleet")
    deploy = next(o for o in controller_objects(snap, "east", "https://git.example/fleet.git")
                  if o["kind"] == "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    listen = container["args"][container["args"].index("--status-listen") + 1]
    probe = container["readinessProbe"]["httpGet"]
    assert listen.startswith("0.0.0.0:") and probe["port"] == int(listen.rsplit(":", 1)[1])
    srv = StatusServer(Source(), "0.0.0.0:0", token=TOKEN, log=lambda e: None).start()
    try:
        assert _get(srv.port, probe["path"]) == (200, b"ok\n")
        assert _get(srv.port, "/api/v1/status")[0] == 401   # the rest still needs the token
    finally:
        srv.stop()


def test_the_cli_sends_the_token_from_its_file(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from federation.cli.main import cli
    from federation.controller.api_token import ensure_api_token

    token = ensure_api_token(tmp_path / "state")
    token_file = tmp_path / "state" / "status-api-token"
    srv = StatusServer(Source(), "0.0.0.0:0", token=token, log=lambda e: None).start()
    url = f"http://127.0.0.1:{srv.port}"
    try:
        bare = CliRunner().invoke(cli, ["status", "--controller", url, "-o", "json"])
        assert bare.exit_code == 2 and "--token-file" in bare.output
        with_flag = CliRunner().invoke(cli, ["status", "--controller", url, "--token-file", str(token_file),
                                             "-o", "json"])
        assert with_flag.exit_code == 0, with_flag.output
        with_env = CliRunner(env={"MESHFED_CONTROLLER_TOKEN_FILE": str(token_file)}).invoke(
            cli, ["clusters", "--controller", url, "-o", "json"])
        assert with_env.exit_code == 0, with_env.output
        explain = CliRunner().invoke(cli, ["trust", "--controller", url, "--token-file", str(token_file), "-o", "json"])
        assert "wants its token" not in explain.output
        missing = CliRunner().invoke(cli, ["status", "--controller", url, "--token-file", str(tmp_path / "nope")])
        assert missing.exit_code == 64 and "status-api-token" in missing.output
    finally:
        srv.stop()


def test_the_lab_push_hook_notifies_with_the_token(tmp_path: Path) -> None:
    from clusters.lab.bringup import notify_controller
    from federation.controller.api_token import ensure_api_token

    token = ensure_api_token(tmp_path / "controller")
    src = Source()
    srv = StatusServer(src, "127.0.0.1:0", token=token, log=lambda e: None).start()
    url = f"http://127.0.0.1:{srv.port}"
    try:
        ok = notify_controller(url, tmp_path / "controller" / "status-api-token", {"refs/heads/main": "a" * 40})
        assert ok == {"controller_notified": True} and src.triggered == 1
        gone = notify_controller(url, tmp_path / "nowhere" / "status-api-token", {})
        assert gone["controller_notified"] is False and "token" in gone["error"]
        (tmp_path / "other").mkdir(mode=0o700)
        ensure_api_token(tmp_path / "other")   # another controller's token
        wrong = notify_controller(url, tmp_path / "other" / "status-api-token", {})
        assert wrong["controller_notified"] is False and "401" in wrong["error"]
        assert src.triggered == 1
    finally:
        srv.stop()
