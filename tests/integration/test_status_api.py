"""The status API: a POST cannot make the controller buffer (or wait for) an unbounded body; writes
need the controller's bearer token (compared in constant time), and so does everything when the
API listens beyond loopback (it refuses to start there without one) or reads are told to need it
(the console's fragments too, its page and static files not); every request is logged, never with
its token; the CLI and the lab's Git push hook send the token from its file; the graph and
revision routes; the console's security headers."""

from __future__ import annotations

import json
import socket
import time
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
        s.sendall(f"POST /api/v1/reconcile HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {content_length}\r\n{auth}"
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


# --- the review's findings 3, 5, 8 (/work/tools/review-scripts: status_api.py, slowloris.py) ---------

def _raw(port: int, data: bytes, timeout_s: float = 3.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
        return out


class FailingSource(Source):
    def trust(self) -> list[dict[str, Any]]:
        raise RuntimeError("the CA key at /var/lib/meshfed/ca-east.key is unreadable")


def test_a_rebinding_page_is_misdirected_and_the_names_of_this_server_are_served() -> None:
    """Finding 3: the reviewer's page on attacker.example:15014, rebound to 127.0.0.1, read the
    trust roots as a same-origin request. Now its Host is answered 421 (reads and writes alike);
    localhost, the listen address and a configured name are served."""
    src = Source()
    srv = StatusServer(src, "127.0.0.1:0", token=TOKEN, log=lambda e: None, allowed_hosts=["status.example"]).start()
    p = srv.port
    try:
        evil = _raw(p, b"GET /api/v1/trust HTTP/1.1\r\nHost: attacker.example:%d\r\nOrigin: "
                       b"http://attacker.example:%d\r\nConnection: close\r\n\r\n" % (p, p))
        assert evil.startswith(b"HTTP/1.0 421") and b"--status-allowed-host" in evil
        post = _raw(p, f"POST /api/v1/reconcile HTTP/1.1\r\nHost: attacker.example\r\nAuthorization: Bearer {TOKEN}"
                       "\r\nContent-Length: 0\r\n\r\n".encode())
        assert post.startswith(b"HTTP/1.0 421") and src.triggered == 0
        for host in (b"localhost:%d" % p, b"127.0.0.1:%d" % p, b"status.example"):
            ok = _raw(p, b"GET /api/v1/trust HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
            assert ok.startswith(b"HTTP/1.0 200"), (host, ok[:60])
        assert _raw(p, b"GET /api/v1/trust HTTP/1.1\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.0 400")
    finally:
        srv.stop()


def test_reads_need_the_token_on_loopback_when_the_controller_is_told_so(tmp_path: Path) -> None:
    """Finding 3: `controller run --status-reads-need-token` reaches the status server (a shared
    machine: every local user could read the fleet's state on loopback)."""
    from click.testing import CliRunner

    from federation.cli.main import cli

    captured: list[Any] = []
    import federation.ray.driver as driver

    real_run = driver.run
    driver.run = lambda opts: captured.append(opts)   # type: ignore[assignment]
    try:
        out = CliRunner().invoke(cli, ["controller", "run", "--repo", str(tmp_path), "--state-dir",
                                       str(tmp_path / "s"), "--status-reads-need-token",
                                       "--status-allowed-host", "status.example"])
        assert out.exit_code == 0, out.output
        bad = CliRunner().invoke(cli, ["controller", "run", "--repo", str(tmp_path), "--status-allowed-host", "a b"])
        assert bad.exit_code == 64 and "--status-allowed-host" in bad.output
    finally:
        driver.run = real_run   # type: ignore[assignment]
    (opts,) = captured
    assert opts.status_reads_need_token and opts.status_allowed_hosts == ("status.example",)
    srv = StatusServer(Source(), "127.0.0.1:0", token=TOKEN, log=lambda e: None,
                       reads_need_token=True if opts.status_reads_need_token else None,
                       allowed_hosts=opts.status_allowed_hosts).start()
    try:
        assert _get(srv.port, "/api/v1/status")[0] == 401
        assert _get(srv.port, "/api/v1/status", token=TOKEN)[0] == 200
    finally:
        srv.stop()


def test_a_client_trickling_its_request_is_dropped_at_the_whole_request_deadline() -> None:
    """Finding 5 (slowloris.py): a byte every 0.3 s kept a per-read timeout of 1 s from ever firing;
    the whole request must arrive within the deadline, so the server closes the connection."""
    srv = StatusServer(Source(), "127.0.0.1:0", log=lambda e: None, request_deadline_s=1.0).start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-a: ")
            t0 = time.monotonic()
            closed_after_s = None
            while time.monotonic() - t0 < 6:
                time.sleep(0.3)
                try:
                    s.sendall(b"a")
                except OSError:
                    closed_after_s = time.monotonic() - t0
                    break
                s.setblocking(False)
                try:
                    if s.recv(1) == b"":
                        closed_after_s = time.monotonic() - t0
                        break
                except BlockingIOError:
                    pass
                except OSError:
                    closed_after_s = time.monotonic() - t0
                    break
                finally:
                    s.setblocking(True)
            assert closed_after_s is not None, "the trickling client was still served after 6 s"
        # a whole request within the deadline is served as before
        assert _raw(srv.port, b"GET /healthz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")
    finally:
        srv.stop()


def test_connections_over_the_cap_get_503_at_once_and_the_backlog_holds_a_burst() -> None:
    """Finding 5: every connection held a thread with no cap, and the listen backlog was 5 (a burst
    was refused by the kernel: `meshfed status` and the Git hook too). Over `max_connections` the
    answer is an immediate 503; a burst waits in a backlog of LISTEN_BACKLOG."""
    from federation.server.status_api import LISTEN_BACKLOG

    srv = StatusServer(Source(), "127.0.0.1:0", log=lambda e: None, max_connections=3).start()
    held = []
    try:
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=3)
            s.sendall(b"GET /healthz HTTP/1.1\r\nX-a: ")
            held.append(s)
        time.sleep(0.2)
        t0 = time.monotonic()
        busy = _raw(srv.port, b"GET /healthz HTTP/1.0\r\n\r\n")
        assert busy.startswith(b"HTTP/1.0 503") and b"busy" in busy and time.monotonic() - t0 < 2
        for s in held:
            s.close()
        time.sleep(0.2)
        assert _raw(srv.port, b"GET /healthz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")
    finally:
        for s in held:
            s.close()
        srv.stop()
    # nobody accepts: 100 connections at once must still complete their handshake (backlog 5 would
    # drop the SYNs of all but ~6 of them, and their connects time out)
    idle = StatusServer(Source(), "127.0.0.1:0", log=lambda e: None)
    burst = []
    try:
        assert LISTEN_BACKLOG >= 100
        for _ in range(100):
            burst.append(socket.create_connection(("127.0.0.1", idle.port), timeout=1.5))
    finally:
        for s in burst:
            s.close()
        idle.httpd.server_close()


def test_a_bad_argument_is_400_and_a_failure_is_500_without_its_detail(caplog: pytest.LogCaptureFixture) -> None:
    """Finding 8: `?since_s=abc` was a 500 quoting `ValueError: could not convert...`, and every 500
    echoed the exception to the client. Now: 400 naming the argument; 500 with a generic body, the
    detail in the controller's log."""
    import logging

    srv = StatusServer(FailingSource(), "127.0.0.1:0", log=lambda e: None).start()
    try:
        code, _, body = _fetch(srv.url + "/api/v1/failover-history?since_s=abc")
        assert code == 400 and "since_s" in json.loads(body)["error"]
        with caplog.at_level(logging.ERROR, logger="federation.server.status_api"):
            code, _, body = _fetch(srv.url + "/api/v1/trust")
        assert code == 500 and b"ca-east.key" not in body and b"RuntimeError" not in body
        assert any("ca-east.key" in (r.exc_text or "") or "ca-east.key" in str(r.exc_info) for r in caplog.records)
    finally:
        srv.stop()


def test_the_request_log_escapes_what_the_client_wrote() -> None:
    """Finding 6/8 (status_api.py case 3): a path with ESC sequences and a CR was logged raw."""
    import io

    from federation.server import status_api
    from ztunnel.api import logsetup

    entries: list[dict[str, Any]] = []
    srv = StatusServer(Source(), "127.0.0.1:0", log=entries.append).start()
    try:
        _raw(srv.port, b"GET /x\x1b[2K\x1b[1Gfake-line?q=\r HTTP/1.0\r\n\r\n")
    finally:
        srv.stop()
    (entry,) = entries
    assert entry["path"] == "/x\\x1b[2K\\x1b[1Gfake-line" and "\x1b" not in json.dumps(entry)
    buf = io.StringIO()
    logsetup.configure("debug", "text", buf)
    try:
        status_api._log_request({**entry, "status": 404})
    finally:
        logsetup.reset()
    assert "\x1b" not in buf.getvalue() and "fake-line" in buf.getvalue()
