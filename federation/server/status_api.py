"""The status API: HTTP JSON (the same objects `meshfed ... -o json` prints) and /metrics.

Stdlib `http.server` on a thread: the API is small and polled by people and Prometheus, so a
framework would add nothing. Every handler reads from a `StatusSource` (the controller's
aggregated status, refreshed from the actors), so a slow actor never blocks a request beyond the
source's own cache.

Access: it listens on loopback unless told otherwise. A bearer token
(`federation.controller.api_token`, a 0600 file in the state directory) is required for every
write (`POST /api/v1/reconcile`), and for every read of the controller's state (the JSON routes,
/metrics, the console's fragments) when the address is not loopback or `reads_need_token` says so —
a server on such an address refuses to start without a token. /healthz and the console's page and
static files are public: they hold no data. Tokens are compared in constant
time; an unauthenticated request is answered 401 before any body is read. Every request is
logged (method, path, status, client, whether it was authenticated, duration; never the token)
to the `meshfed.status_api` logger, or to the `log` callback given.

Routes (GET):
  /api/v1/status                      desired/applied revision, clusters, proxies, problems
  /api/v1/clusters                    per cluster: lease, up, endpoints
  /api/v1/services                    global services and their endpoint counts per cluster
  /api/v1/endpoints?service=S&from=C  a service's endpoints as proxies in cluster C see them
  /api/v1/failover-history?service=S&since_s=T
  /api/v1/check                       grouped pass/fail checks with cause and hint
  /api/v1/trust                       CA roots and expiry
  /api/v1/trust-view                  `meshfed trust` data from the live CAs (who trusts whom, problems)
  /api/v1/explain?service=S&from=C&zone=Z   `meshfed explain` on the live engine
  /api/v1/graph                       the federation graph the console draws (`federation.core.graph_view`)
  /api/v1/revisions?sha=S&limit=N     applied/attempted revisions, newest first (S: a SHA prefix)
  /metrics                            meshfed_* metrics (prometheus text format)
  /console/                           the web console (`federation.server.console`): HTML on this
                                      listener; its page and static files are public (they hold no
                                      data), its fragments are reads like the routes above
  /healthz                            200 "ok" while the server answers; never needs the token (a
                                      kubelet's probe has none) and says nothing about the fleet
Routes (POST, with the token):
  /api/v1/reconcile                   a push landed (a Git hook): check the branch now
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlparse

from federation.controller.api_token import STATUS_API_TOKEN_FILE, token_matches
from federation.server import metrics
from federation.server.console import Console, Page, is_console_path, is_public

LOG = logging.getLogger("meshfed.status_api")


class StatusSource(Protocol):
    def status(self) -> dict[str, Any]: ...

    def services(self) -> list[dict[str, Any]]: ...

    def endpoints(self, service: str, from_cluster: str | None) -> dict[str, Any]: ...

    def failover_history(self, service: str | None, since_s: float | None) -> list[dict[str, Any]]: ...

    def checks(self) -> list[dict[str, Any]]: ...

    def trust(self) -> list[dict[str, Any]]: ...

    def trust_view(self) -> dict[str, Any]: ...

    def explain(self, service: str, from_cluster: str, zone: str | None) -> dict[str, Any]: ...

    def graph(self) -> dict[str, Any]: ...

    def revisions(self, sha: str | None, limit: int) -> list[dict[str, Any]]: ...


class BadRequest(ValueError):
    pass


class NotFound(LookupError):
    pass


MAX_REVISIONS = 200
MAX_POST_BODY_BYTES = 64 * 1024   # the reconcile trigger needs no body; a Git hook may send a small one
REQUEST_TIMEOUT_S = 10.0           # a client that stalls mid-request does not hold a thread forever


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _log_request(entry: dict[str, Any]) -> None:
    LOG.info(json.dumps(entry, separators=(",", ":")))


class StatusServer:
    def __init__(self, source: StatusSource, listen: str = "127.0.0.1:0", token: str | None = None,
                 log: Callable[[dict[str, Any]], None] | None = None, reads_need_token: bool | None = None) -> None:
        """`reads_need_token`: None = only when not on loopback; True = on loopback too (needs `token`)."""
        host, _, port = listen.rpartition(":")
        host = host or "127.0.0.1"
        self.loopback = is_loopback(host)
        if not self.loopback and not token:
            raise ValueError(f"the status API would listen on {host}, which is not loopback, without a token: "
                             f"start the controller with its state directory's {STATUS_API_TOKEN_FILE}, or "
                             "listen on 127.0.0.1")
        self.source = source
        self.requests = 0
        if reads_need_token and not token:
            raise ValueError("reads_need_token without a token: no client could read")
        read_needs_token = not self.loopback if reads_need_token is None else reads_need_token
        console = Console(source)
        log_fn = log or _log_request
        server = self
        self.registry = metrics.make_registry(source.status)
        routes: dict[str, Callable[[dict[str, list[str]]], Any]] = {
            "/api/v1/status": lambda q: source.status(),
            "/api/v1/clusters": lambda q: source.status().get("clusters", {}),
            "/api/v1/services": lambda q: source.services(),
            "/api/v1/endpoints": lambda q: source.endpoints(_one(q, "service") or "", _one(q, "from")),
            "/api/v1/failover-history": lambda q: source.failover_history(_one(q, "service"), _float(_one(q, "since_s"))),
            "/api/v1/check": lambda q: source.checks(),
            "/api/v1/trust": lambda q: source.trust(),
            "/api/v1/trust-view": lambda q: source.trust_view(),
            "/api/v1/explain": lambda q: source.explain(_one(q, "service") or "", _one(q, "from") or "",
                                                        _one(q, "zone")),
            "/api/v1/graph": lambda q: source.graph(),
            "/api/v1/revisions": lambda q: source.revisions(_sha(_one(q, "sha")), _limit(_one(q, "limit"))),
        }
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT_S
            _status = 0
            _authenticated = False
            _started = 0.0

            def log_message(self, *_a: Any) -> None:  # replaced by `_log` (one structured line per request)
                pass

            def _send(self, code: int, body: bytes, ctype: str, extra: Mapping[str, str] | None = None) -> None:
                self._status = code
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _authorized(self) -> bool:
                presented = self.headers.get("Authorization") or ""
                scheme, _, credential = presented.partition(" ")
                self._authenticated = bool(token) and scheme.lower() == "bearer" and \
                    token_matches(str(token), credential.strip())
                return self._authenticated

            def _refuse(self, why: str) -> None:
                self.close_connection = True
                self._send(401, json.dumps({"error": why}).encode(), "application/json",
                           {"WWW-Authenticate": 'Bearer realm="meshfed"'})

            def _log(self) -> None:
                server.requests += 1
                try:
                    log_fn({"ts": round(time.time(), 3), "method": self.command, "path": urlparse(self.path).path,
                            "status": self._status, "client": self.client_address[0],
                            "authenticated": self._authenticated,
                            "ms": round((time.perf_counter() - self._started) * 1000, 2)})
                except Exception:
                    pass  # logging must never break a request

            def do_GET(self) -> None:
                self._started = time.perf_counter()
                try:
                    self._get()
                finally:
                    self._log()

            def do_POST(self) -> None:
                self._started = time.perf_counter()
                try:
                    self._post()
                finally:
                    self._log()

            def _get(self) -> None:
                url = urlparse(self.path)
                if url.path == "/healthz":
                    self._send(200, b"ok\n", "text/plain; charset=utf-8")
                    return
                if not is_public(url.path) and not self._authorized() and read_needs_token:
                    self._refuse("this status API wants its token for reads: send the controller's token "
                                 f"(Authorization: Bearer <{STATUS_API_TOKEN_FILE}>; meshfed --token-file; "
                                 "the console: open /console/#token=<token>)")
                    return
                try:
                    if is_console_path(url.path):
                        page: Page = console.handle(url.path, parse_qs(url.query))
                        self._send(page.status, page.body, page.content_type, page.headers)
                        return
                    if url.path == "/metrics":
                        self._send(200, metrics.render(registry), metrics.CONTENT_TYPE)
                        return
                    fn = routes.get(url.path.rstrip("/"))
                    if fn is None:
                        raise NotFound(f"no such path {url.path}; see /api/v1/status")
                    data = fn(parse_qs(url.query))
                    self._send(200, json.dumps(data, default=str).encode(), "application/json")
                except NotFound as e:
                    self._send(404, json.dumps({"error": str(e)}).encode(), "application/json")
                except BadRequest as e:
                    self._send(400, json.dumps({"error": str(e)}).encode(), "application/json")
                except Exception as e:
                    self._send(500, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode(), "application/json")

            def _post(self) -> None:
                """POST /api/v1/reconcile: a push landed (a Git server's hook): fetch the branch now."""
                if not self._authorized():
                    self._refuse("writes need the controller's token (Authorization: Bearer "
                                 f"<state-dir>/{STATUS_API_TOKEN_FILE}; meshfed --token-file)"
                                 if token else "this controller serves no status API token: writes are disabled")
                    return
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if not 0 <= length <= MAX_POST_BODY_BYTES:
                    self.close_connection = True
                    self._send(413, json.dumps({"error": f"request body must be 0..{MAX_POST_BODY_BYTES} bytes "
                                                         "(POST /api/v1/reconcile needs none)"}).encode(),
                               "application/json")
                    return
                if length:
                    self.rfile.read(length)
                trigger = getattr(source, "trigger_git", None)
                if urlparse(self.path).path.rstrip("/") != "/api/v1/reconcile" or trigger is None:
                    self._send(404, json.dumps({"error": "POST only /api/v1/reconcile"}).encode(), "application/json")
                    return
                try:
                    trigger()
                    self._send(202, b'{"triggered": true}', "application/json")
                except Exception as e:
                    self._send(500, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode(), "application/json")

        self.httpd = ThreadingHTTPServer((host.strip("[]"), int(port or 0)), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.httpd.server_address[0]
        return f"http://{host!s}:{self.port}"

    def start(self) -> StatusServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="status-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _float(v: str | None) -> float | None:
    return float(v) if v else None


def _one(q: dict[str, list[str]], key: str) -> str | None:
    v = q.get(key)
    return v[0] if v else None


def _sha(v: str | None) -> str | None:
    if v is None:
        return None
    if not (4 <= len(v) <= 40 and all(ch in "0123456789abcdefABCDEF" for ch in v)):
        raise BadRequest(f"sha={v!r} is not a commit SHA: give 4 to 40 hex digits")
    return v.lower()


def _limit(v: str | None) -> int:
    try:
        n = int(v) if v else 20
    except ValueError:
        raise BadRequest(f"limit={v!r} is not a number (1..{MAX_REVISIONS})") from None
    if not 1 <= n <= MAX_REVISIONS:
        raise BadRequest(f"limit={n} is out of range: 1..{MAX_REVISIONS}")
    return n
