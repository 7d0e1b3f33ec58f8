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
to the `meshfed.status_api` logger, or to the `log` callback given; the path and query are the
client's words, escaped (`ztunnel.api.logsetup.printable`) before they reach a log line.

Who may talk to it (review finding 3, DNS rebinding): a page on an attacker's name that rebinds
that name to 127.0.0.1 makes the operator's browser send same-origin requests here, with its own
name in `Host`. So every request's Host must name this server (`host_refusal`): `localhost`, the
literal address it listens on (on a wildcard address: any IP literal, which no DNS answer can
stand for), or a name given with `allowed_hosts` (`controller run --status-allowed-host`);
anything else is answered 421 Misdirected Request, a malformed or repeated Host (or none, in
HTTP/1.1) 400. Only the name is compared, not the port: rebinding controls the name, and a relay
(the lab's host portal, `kubectl port-forward`) legitimately changes the port.

Bounds (review finding 5): every request must arrive whole, its line, headers and body, within
`request_deadline_s` of the server starting to wait for it (one deadline, not one per read: a
client that trickles a byte at a time cannot stretch it; an idle keep-alive connection is closed
by the same deadline); at most `max_connections` connections are served at once, each on its own
thread, and one over that is answered 503 at once and closed, costing no thread; the listen
backlog is `LISTEN_BACKLOG`, so a burst of connections waits for a slot instead of being refused
by the kernel. Answers are written with `WRITE_TIMEOUT_S` per write.

Errors: a bad argument is a 400 naming it; an unexpected failure is a 500 with a generic body
(the detail goes to the log, never to the client).

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

import io
import ipaddress
import json
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlparse

from federation.controller.api_token import STATUS_API_TOKEN_FILE, token_matches
from federation.server import metrics
from federation.server.console import Console, Page, is_console_path, is_public
from ztunnel.api.logsetup import printable


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


# Request log: writes (POST) and every answer >= 400 at INFO, successful reads at DEBUG: a console
# or a `watch meshfed status` polls every second, and one line per poll would bury the state
# changes an operator reads the log for. `--log-level debug` shows every request.
access_log = logging.getLogger("federation.server.status_api.access")
server_log = logging.getLogger(__name__)   # failures (the detail a 500 does not tell the client)
_SECRET_QUERY = re.compile(r"(?i)((?:^|&)[^=&]*(?:token|secret|password|key)[^=&]*=)[^&]*")


def request_log_level(method: str, status: int) -> int:
    return logging.INFO if method != "GET" or status >= 400 else logging.DEBUG


def loggable_path(path: str) -> str:
    """The request path with the values of secret-looking query parameters masked."""
    base, sep, query = path.partition("?")
    return base + sep + _SECRET_QUERY.sub(r"\1[REDACTED]", query) if sep else base


MAX_POST_BODY_BYTES = 64 * 1024   # the reconcile trigger needs no body; a Git hook may send a small one
REQUEST_DEADLINE_S = 10.0          # a whole request (line, headers, body) arrives within this, or is dropped
WRITE_TIMEOUT_S = 10.0             # each write of an answer; a client that does not read is dropped
MAX_CONNECTIONS = 64               # served at once (one thread each); more get 503 at once
LISTEN_BACKLOG = 128               # connections the kernel holds while every slot is busy (stdlib default: 5)
DEFAULT_HOST_NAMES = ("localhost",)


def _host_name(value: str) -> str | None:
    """The name of a Host header value (`name`, `name:port`, `[v6]`, `[v6]:port`), lowercased,
    without one trailing dot; None when it is not of that shape."""
    v = value.strip().lower()
    if v.startswith("["):
        name, sep, rest = v[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
    else:
        name, sep, port = v.partition(":")
        if sep and not port.isdigit():
            return None
    name = name[:-1] if name.endswith(".") else name
    if not name or any(ch.isspace() or ch in "/\\@?#" for ch in name):
        return None
    return name


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def admitted_host_names(bind_host: str, allowed_hosts: Iterable[str] = ()) -> frozenset[str]:
    """The names a Host header may carry for a server listening on `bind_host`: `localhost`, the
    literal bind address (unless it is a wildcard: see `host_refusal`), and `allowed_hosts`
    (names, or name:port, whose port is ignored). ValueError names a bad entry."""
    names = set(DEFAULT_HOST_NAMES)
    bind = bind_host.strip("[]").lower()
    if bind and not _is_wildcard(bind):
        names.add(str(ipaddress.ip_address(bind)) if _is_ip(bind) else bind)
    for h in allowed_hosts:
        name = _host_name(h)
        if name is None:
            raise ValueError(f"allowed host {h!r} is not a host name (NAME or NAME:PORT, e.g. "
                             "meshfed-controller-status.meshfed-system.svc)")
        names.add(str(ipaddress.ip_address(name)) if _is_ip(name) else name)
    return frozenset(names)


def _is_wildcard(bind: str) -> bool:
    return bind in ("", "0.0.0.0", "::")


def host_refusal(hosts: list[str], http_version: str, admitted: frozenset[str], any_ip_literal: bool
                 ) -> tuple[int, str]:
    """(0, "") when a request whose Host headers are `hosts` may be served, else (status, why).

    An HTTP/1.0 request without Host is served (it names nobody; no browser sends one); HTTP/1.1
    requires exactly one (RFC 9112 §3.2: 400 otherwise). A name not in `admitted` is 421, unless it
    is an IP literal and the server listens on a wildcard address (`any_ip_literal`): DNS rebinding
    needs a name it controls, and an IP literal is none."""
    if len(hosts) > 1:
        return 400, "more than one Host header"
    if not hosts:
        return (0, "") if http_version == "HTTP/1.0" else (400, "HTTP/1.1 needs a Host header")
    name = _host_name(hosts[0])
    if name is None:
        return 400, "the Host header is not a host name"
    if name in admitted:
        return 0, ""
    if _is_ip(name) and (any_ip_literal or str(ipaddress.ip_address(name)) in admitted):
        return 0, ""   # an IP literal, or another spelling of an admitted address (`::0001` for `::1`)
    return 421, (f"this status API does not serve the name in Host ({printable(name, 100)}): use "
                 f"{' or '.join(sorted(admitted))}, or start the controller with --status-allowed-host NAME")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _log_request(entry: dict[str, Any]) -> None:
    """The default request log: one line per request on `access_log`, its fields as the event's."""
    level = request_log_level(str(entry.get("method") or ""), int(entry.get("status") or 0))
    if not access_log.isEnabledFor(level):
        return
    target = str(entry.get("path", "")) + (f"?{entry['query']}" if entry.get("query") else "")  # escaped in `_log`
    access_log.log(level, "%s %s %s %.1f ms from %s%s", entry.get("method"), target, entry.get("status"),
                   float(entry.get("ms") or 0.0), entry.get("client"),
                   " (authenticated)" if entry.get("authenticated") else "",
                   extra={"fields": {"event": "HttpRequest", **{k: v for k, v in entry.items() if k != "ts"}}})


class StatusServer:
    def __init__(self, source: StatusSource, listen: str = "127.0.0.1:0", token: str | None = None,
                 log: Callable[[dict[str, Any]], None] | None = None, reads_need_token: bool | None = None,
                 allowed_hosts: Iterable[str] = (), request_deadline_s: float = REQUEST_DEADLINE_S,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        """`reads_need_token`: None = only when not on loopback; True = on loopback too (needs `token`).
        `allowed_hosts`: names besides `localhost` and the listen address that Host may carry."""
        host, _, port = listen.rpartition(":")
        host = host or "127.0.0.1"
        admitted = admitted_host_names(host, allowed_hosts)
        any_ip_literal = _is_wildcard(host.strip("[]"))
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
            _status = 0
            _authenticated = False
            _started = 0.0
            _deadline_s = 0.0

            def setup(self) -> None:
                super().setup()
                # reads against the request's deadline, writes with their own timeout (module doc);
                # the stdlib's file objects are closed (each holds a reference on the socket)
                self.rfile.close()
                self.rfile = io.BufferedReader(_DeadlineReader(self.connection, lambda: self._deadline_s))
                self.wfile = _TimedWriter(self.connection)

            def handle_one_request(self) -> None:
                self._deadline_s = time.monotonic() + request_deadline_s
                super().handle_one_request()

            def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
                pass  # `_log` writes one structured line per request, with what it knows (authenticated)

            def log_message(self, format: str, *args: Any) -> None:
                # what the stdlib reports besides requests (malformed requests, timeouts): it may quote
                # the client's request line
                access_log.info("%s: %s", self.client_address[0], printable(format % args))

            def _host_refused(self) -> bool:
                code, why = host_refusal(self.headers.get_all("Host") or [], self.request_version, admitted,
                                         any_ip_literal)
                if code:
                    self.close_connection = True
                    self._send(code, json.dumps({"error": why}).encode(), "application/json")
                return bool(code)

            def _fail(self, what: str) -> None:
                """An unexpected failure: the detail to the log, a generic answer to the client."""
                server_log.exception("status API: %s %s failed", self.command, printable(urlparse(self.path).path))
                self._send(500, json.dumps({"error": f"internal error while {what}; the controller's log "
                                                     "has the detail"}).encode(), "application/json")

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
                    url = urlparse(self.path)
                    entry = {"ts": round(time.time(), 3), "method": printable(self.command, 16),
                             "path": printable(url.path),
                             "status": self._status, "client": self.client_address[0],
                             "authenticated": self._authenticated,
                             "ms": round((time.perf_counter() - self._started) * 1000, 2)}
                    if url.query:   # secret-looking values masked (`loggable_path`)
                        entry["query"] = printable(loggable_path(f"?{url.query}")[1:])
                    log_fn(entry)
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
                if self._host_refused():
                    return
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
                except Exception:
                    self._fail("answering this read")

            def _post(self) -> None:
                """POST /api/v1/reconcile: a push landed (a Git server's hook): fetch the branch now."""
                if self._host_refused():
                    return
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
                except Exception:
                    self._fail("triggering a reconcile")
                    return
                self._send(202, b'{"triggered": true}', "application/json")

        self.httpd = _BoundedHTTPServer((host.strip("[]"), int(port or 0)), Handler, max_connections)
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


class _DeadlineReader(io.RawIOBase):
    """A connection's reads against one deadline (`deadline_s()`, monotonic): each read may wait
    only what is left of it, so trickling bytes cannot stretch a request; past it, TimeoutError
    (which the stdlib handler turns into closing the connection)."""

    def __init__(self, sock: socket.socket, deadline_s: Callable[[], float]) -> None:
        super().__init__()
        self._sock, self._deadline_s = sock, deadline_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left_s = self._deadline_s() - time.monotonic()
        if left_s <= 0:
            raise TimeoutError("the request did not arrive whole within its deadline")
        self._sock.settimeout(left_s)
        return self._sock.recv_into(buffer)


class _TimedWriter(io.BufferedIOBase):
    """Unbuffered writes (as the stdlib's `_SocketWriter`), each bounded by `WRITE_TIMEOUT_S`."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self._sock.settimeout(WRITE_TIMEOUT_S)
        self._sock.sendall(b)
        with memoryview(b) as view:
            return view.nbytes

    def fileno(self) -> int:
        return self._sock.fileno()


_BUSY_BODY = b'{"error": "the status API is busy: retry in a second"}'
BUSY_ANSWER = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
               b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` at once: one over that is answered 503
    on the accepting thread without blocking (a client that cannot take 150 bytes now gets the
    closed connection as its answer) and closed."""

    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, max_connections: int) -> None:
        self.slots = threading.BoundedSemaphore(max_connections)
        self.busy_refusals = 0
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.busy_refusals += 1
            try:
                request.setblocking(False)
                request.send(BUSY_ANSWER)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()   # no thread started: nobody else will
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that went away mid-answer: not worth the stdlib's traceback on stderr
        server_log.debug("status API: the connection from %s failed", client_address[0], exc_info=True)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def _float(v: str | None, name: str = "since_s") -> float | None:
    if not v:
        return None
    try:
        f = float(v)
    except ValueError:
        raise BadRequest(f"{name}={printable(v, 40)!r} is not a time (Unix seconds)") from None
    if not math.isfinite(f) or f < 0:
        raise BadRequest(f"{name}={v!r} is not a time (Unix seconds, 0 or more)")
    return f


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
