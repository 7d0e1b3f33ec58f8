"""HTTPRoute matching, filters and per-request backend choice (Gateway API semantics). Pure.

Which rule a request gets (`select_rule`): every (route, rule, match) whose parent is where the
request arrived (a Service for a waypoint, a Gateway listener for an ingress gateway), whose
hostnames admit the request's host, and whose match admits the request, competes; the winner is
the first in Gateway API's precedence order:

1. an Exact path match over a PathPrefix match, a PathPrefix match over a regular expression
   (and any of them over none); a longer prefix over a shorter one;
2. a match with a method over one without;
3. more header matches; then more query-parameter matches;
4. then the oldest route — the fleet repo has no creation time, so routes are ordered by
   namespace/name — and within a route, rule order, then match order.

A rule without `matches` matches every request with path prefix "/" (as Gateway API defaults).
Path prefixes match whole segments (`/v1` matches `/v1` and `/v1/x`, not `/v10`); regular
expressions match the whole value; header names are case-insensitive, values exact.

Hostnames (routes on a Gateway): a route's `hostnames` and its listener's `hostname` must both
admit the request's Host (port stripped); `*.example.com` admits one or more labels before
`example.com`. Routes on a Service (GAMMA) ignore hostnames: the Service is the destination.

Filters (`rewrite_request`): RequestHeaderModifier (set replaces, add appends, remove deletes);
URLRewrite (hostname replaces Host; ReplaceFullPath replaces the path; ReplacePrefixMatch replaces
the matched prefix, keeping the rest and the query). Backends (`draw_backend`): one per request,
with probability weight / sum of positive weights; weight 0 takes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import parse_qsl

from ztunnel.api.config import HeaderModifier, HttpBackend, HttpMatch, HttpRoute, HttpRouteRule, Listener

Headers = tuple[tuple[str, str], ...]  # (lower-case name, value), in order


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A request as the engine sees it. `target` is the request target (path and query)."""

    method: str
    target: str
    host: str
    headers: Headers = ()

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0] or "/"

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    def header(self, name: str) -> str | None:
        """The value of `name` (repeated headers joined with ","), or None."""
        values = [v for k, v in self.headers if k == name]
        return ",".join(values) if values else None


@dataclass(frozen=True, slots=True)
class RuleChoice:
    """The rule a request matched, and which of its matches (-1: the rule has none)."""

    route: HttpRoute
    rule: HttpRouteRule
    rule_index: int
    match: HttpMatch | None

    @property
    def name(self) -> str:
        label = self.rule.name or str(self.rule_index)
        return f"{self.route.kind} {self.route.key} rule {label}"


@lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except re.error:
        return None


def _value_matches(kind: str, pattern: str, value: str) -> bool:
    if kind == "RegularExpression":
        rx = _regex(pattern)
        return rx is not None and rx.fullmatch(value) is not None
    return value == pattern


def _prefix_matches(prefix: str, path: str) -> bool:
    p = prefix.rstrip("/") or "/"
    if p == "/":
        return True
    return path == p or path.startswith(p + "/")


def match_request(m: HttpMatch, req: RequestHead) -> bool:
    if m.method and req.method != m.method:
        return False
    if m.path is not None:
        path = req.path
        if m.path.kind == "Exact" and path != m.path.value:
            return False
        if m.path.kind == "PathPrefix" and not _prefix_matches(m.path.value, path):
            return False
        if m.path.kind == "RegularExpression" and not _value_matches("RegularExpression", m.path.value, path):
            return False
    for h in m.headers:
        value = req.header(h.name)
        if value is None or not _value_matches(h.kind, h.value, value):
            return False
    if m.query:
        params: dict[str, str] = {}
        for k, v in parse_qsl(req.query, keep_blank_values=True):
            params.setdefault(k, v)  # Gateway API: the first value of a repeated parameter
        for q in m.query:
            if q.name not in params or not _value_matches(q.kind, q.value, params[q.name]):
                return False
    return True


def _precedence(m: HttpMatch | None) -> tuple[int, int, int, int, int]:
    """Smaller sorts first (wins)."""
    if m is None or m.path is None:
        kind, length = 1, 1  # the default: PathPrefix "/"
    else:
        kind = {"Exact": 0, "PathPrefix": 1, "RegularExpression": 2}.get(m.path.kind, 3)
        length = len(m.path.value)
    return (kind, -length, 0 if m is not None and m.method else 1,
            -(len(m.headers) if m else 0), -(len(m.query) if m else 0))


def hostname_admits(pattern: str, host: str) -> bool:
    """Gateway API hostname matching (`*.example.com` needs at least one more label)."""
    if not pattern:
        return True
    host = strip_port(host).lower().rstrip(".")
    pattern = pattern.lower()
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def strip_port(host: str) -> str:
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def select_rule(routes: Iterable[HttpRoute], parents: Sequence[str], req: RequestHead,
                listener: Listener | None = None) -> RuleChoice | None:
    """The rule that takes `req` among `routes` attached to any of `parents` (see the module
    docstring); None when no rule matches (the proxy answers 404)."""
    wanted = set(parents)
    best: tuple[tuple[object, ...], RuleChoice] | None = None
    for route in routes:  # in key order (L7Index keeps them sorted): the tie-break is the first
        if not wanted.intersection(route.parents):
            continue
        gateway_parent = any(p.startswith("Gateway/") for p in route.parents)
        if gateway_parent:
            if listener is not None and listener.hostname and not hostname_admits(listener.hostname, req.host):
                continue
            if route.hostnames and not any(hostname_admits(h, req.host) for h in route.hostnames):
                continue
        for ri, rule in enumerate(route.rules):
            matches: Sequence[HttpMatch | None] = rule.matches or (None,)
            for mi, m in enumerate(matches):
                if m is not None and not match_request(m, req):
                    continue
                key = (*_precedence(m), route.key, ri, mi)
                if best is None or key < best[0]:
                    best = (key, RuleChoice(route, rule, ri, m))
    return best[1] if best is not None else None


def service_parents(hostname: str, port: int) -> tuple[str, str]:
    """The parent keys a request to `hostname:port` (arriving at a waypoint) belongs to."""
    return (f"Service/{hostname}:{port}", f"Service/{hostname}:0")


def gateway_parents(listener: Listener) -> tuple[str, str]:
    """The parent keys a request arriving on `listener` belongs to."""
    return (f"Gateway/{listener.gateway}/{listener.name}", f"Gateway/{listener.gateway}/")


# --- filters -----------------------------------------------------------------------------------


def modify_headers(headers: Headers, mod: HeaderModifier | None) -> Headers:
    if mod is None:
        return headers
    drop = {h.name for h in mod.set} | set(mod.remove)
    out = [(k, v) for k, v in headers if k not in drop]
    out += [(h.name, h.value) for h in mod.set]
    out += [(h.name, h.value) for h in mod.add]
    return tuple(out)


def rewrite_request(req: RequestHead, choice: RuleChoice) -> RequestHead:
    """Apply the rule's request filters: header modifier, then URL rewrite."""
    rule = choice.rule
    headers = modify_headers(req.headers, rule.request_headers)
    host, target = req.host, req.target
    rw = rule.rewrite
    if rw is not None:
        if rw.hostname:
            host = rw.hostname
            headers = (*((k, v) for k, v in headers if k != "host"), ("host", host))
        if rw.path_kind:
            path, query = req.path, req.query
            if rw.path_kind == "ReplaceFullPath":
                path = rw.path
            else:
                prefix = (choice.match.path.value if choice.match is not None and choice.match.path is not None
                          else "/").rstrip("/")
                rest = path[len(prefix):] if path.startswith(prefix) else path
                new_prefix = rw.path.rstrip("/")
                path = (new_prefix + rest) if rest.startswith("/") or not rest else f"{new_prefix}/{rest}"
                path = path or "/"
            target = path + (f"?{query}" if query else "")
    return RequestHead(req.method, target, host, headers)


# --- backends ----------------------------------------------------------------------------------


def draw_backend(backends: Sequence[HttpBackend], rand: float) -> HttpBackend | None:
    """One backend for `rand` in [0, 1), by weight (cumulative in rule order). None when no
    backend has a positive weight (the rule sends nothing: 500, as Gateway API says)."""
    total = sum(b.weight for b in backends if b.weight > 0)
    if total <= 0:
        return None
    target = min(max(rand, 0.0), 1.0 - 1e-12) * total
    acc = 0
    last: HttpBackend | None = None
    for b in backends:
        if b.weight <= 0:
            continue
        acc += b.weight
        last = b
        if target < acc:
            return b
    return last
