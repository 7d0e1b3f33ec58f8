"""One normal form of a request's target and host, decided once, before authorization and routing,
and forwarded upstream unchanged. Pure.

Why: a path DENY rule compared against the raw target is bypassed by any spelling the backend
reads as the same resource (`//admin`, `/x/../admin`, `/%61dmin`, a trailing dot on the host...).
So `plan_request` (`ztunnel.proxy.l7.engine`) calls `normalize_request` first; authorization,
route matching, filters and the upstream request line all see its result and nothing else.
Istio's `pathNormalization: MERGE_SLASHES` plus Envoy's `path_with_escaped_slashes_action:
REJECT_REQUEST` is the model (Istio's "Authorization Policy Normalization" page lists the same
steps); we reject where Envoy can be configured to, rather than offer options.

The request target (RFC 9112 §3.2):
- origin-form `/path?query` is the normal case; absolute-form `http://host/path?query` becomes
  origin-form, its authority the request's host (a Host header naming another host is a 400:
  two hosts, and whoever reads the other one decides differently); asterisk-form `*` only with
  OPTIONS; authority-form (CONNECT) is not proxied (501), nor is any other form (400);
- a fragment (`#`) is never part of a request target: 400 (a backend that drops it would serve
  `/admin` for `/admin#x`, which an Exact rule did not match);
- every byte must be visible ASCII (0x21-0x7E): spaces, controls and non-ASCII are 400.

The path, in this order (each step idempotent, so normalizing twice changes nothing):
1. percent-encodings must be `%` + two hex digits (400); `%2F` and `%5C` (an encoded `/` or `\\`:
   one segment to us, two to a backend that decodes first) and any encoded control byte (`%00`-
   `%1F`, `%7F`) are 400; encoded unreserved characters (ALPHA DIGIT `-` `.` `_` `~`) are decoded
   (`/%61dmin` is `/admin`, `/%2e%2e/` is `/../`), other encodings keep their bytes with upper-case
   hex (RFC 3986 §6.2.2.1): decoded once, never twice (`%2561` stays `%2561`);
2. a backslash becomes `/` (Envoy's normalize_path, as Windows-minded backends read it);
3. RFC 3986 §5.2.4 remove_dot_segments: `.` and `..` segments are resolved, `..` never climbs
   above the root (`/../admin` is `/admin`);
4. then runs of `/` merge into one (MERGE_SLASHES; Envoy's order: `/a//../b` is `/a/b`).
Case is kept (paths are case-sensitive), and so are `;` parameters: a backend that reads
`/admin;x` as `/admin` needs a `prefix*` rule, as with Istio. The query is kept as sent (visible
ASCII checked), and is not used by authorization paths.

The host (Host header, `:authority`, or the absolute-form authority): lower-cased, one trailing
dot removed, the port split off (digits, 1-65535); a name with an empty label, a character
outside RFC 3986's reg-name set, userinfo, or a bracketed IPv6 literal with anything but hex,
`:` and `.` is 400. More than one Host header is 400 (RFC 9112 §3.2), as is an h2 `:authority`
that disagrees with a Host header (RFC 9113 §8.3.1). Host matching uses the name; the forwarded
Host is `name[:port]`.

The method must be an RFC 9110 token of upper-case letters (Istio rejects a method that is not
upper-case: `methods: [DELETE]` must not miss `delete`); CONNECT is 501.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from ztunnel.proxy.l7.routing import RequestHead

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
_VISIBLE = re.compile(r"[\x21-\x7e]*")
_METHOD = re.compile(r"[A-Z][A-Z0-9_-]*")  # upper-case RFC 9110 tokens (the ones Istio admits)
_REG_NAME = re.compile(r"[a-z0-9\-._~!$&'()*+,;=]+")
_IPV6 = re.compile(r"\[[0-9a-f:.]+\]")
_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True, slots=True)
class Malformed:
    """The request cannot be given one meaning: answer `status` (400, or 501) with `reason`."""

    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class Authority:
    name: str        # lower-case, no trailing dot, no port ("" when the request named none)
    port: int | None

    def __str__(self) -> str:
        return f"{self.name}:{self.port}" if self.port is not None else self.name


def normalize_request(req: RequestHead) -> RequestHead | Malformed:
    """The request with its one normal method, target and host (module docstring), or why not."""
    if not _METHOD.fullmatch(req.method):
        return Malformed(400, f"method {req.method!r} is not an upper-case token")
    if req.method == "CONNECT":
        return Malformed(501, "CONNECT is not proxied by the L7 engine")
    target = req.target
    if not _VISIBLE.fullmatch(target) or not target:
        return Malformed(400, "request target is empty or has spaces, control or non-ASCII bytes")
    if "#" in target:
        return Malformed(400, "request target carries a fragment (#)")
    hosts = [v for k, v in req.headers if k == "host"]
    if len(hosts) > 1:
        return Malformed(400, "repeated Host header")
    parsed: Authority | Malformed | None = None
    if target == "*":
        if req.method != "OPTIONS":
            return Malformed(400, "asterisk-form request target without OPTIONS")
        path, query = "*", ""
    elif target.startswith("/"):
        path, _, query = target.partition("?")
    else:
        absolute = _split_absolute(target)
        if isinstance(absolute, Malformed):
            return absolute
        raw_authority, path, query = absolute
        parsed = normalize_host(raw_authority)
    if path != "*":
        norm_path = normalize_path(path)
        if isinstance(norm_path, Malformed):
            return norm_path
        path = norm_path
    if parsed is None:
        parsed = normalize_host(req.host)
    if isinstance(parsed, Malformed):
        return parsed
    authority = parsed
    for other in {*hosts, req.host}:
        seen = normalize_host(other) if other else authority
        if isinstance(seen, Malformed):
            return seen
        if seen.name != authority.name or (seen.port is not None and authority.port is not None
                                           and seen.port != authority.port):
            return Malformed(400, f"the request names two hosts ({authority} and {seen})")
    host = str(authority)
    headers = req.headers
    if any(v != host for v in hosts):
        headers = tuple((k, host) if k == "host" else (k, v) for k, v in req.headers)
    new_target = path + (f"?{query}" if query else "") if path != "*" else "*"
    if new_target == req.target and host == req.host and headers is req.headers:
        return req
    return RequestHead(req.method, new_target, host, headers)


def _split_absolute(target: str) -> tuple[str, str, str] | Malformed:
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return Malformed(400, "request target is neither origin-form (/path) nor an http(s) absolute URI")
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    raw_authority, rest = rest[:end], rest[end:]
    if "@" in raw_authority:
        return Malformed(400, "userinfo in the request target's authority")
    path, _, query = rest.partition("?")
    return raw_authority, path or "/", query


def normalize_path(path: str) -> str | Malformed:
    """An absolute path's normal form (steps 1-4 of the module docstring), or why it has none."""
    decoded = _decode_unreserved(path)
    if isinstance(decoded, Malformed):
        return decoded
    decoded = decoded.replace("\\", "/")
    if "." in decoded:
        decoded = remove_dot_segments(decoded)
    if "//" in decoded:
        decoded = re.sub(r"/{2,}", "/", decoded)
    return decoded


def _decode_unreserved(path: str) -> str | Malformed:
    if "%" not in path:
        return path
    out: list[str] = []
    i = 0
    while i < len(path):
        c = path[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        hexa = path[i + 1:i + 3]
        if len(hexa) != 2 or not set(hexa) <= _HEX:
            return Malformed(400, f"bad percent-encoding {path[i:i + 3]!r} in the path")
        byte = int(hexa, 16)
        if byte in (0x2F, 0x5C):
            return Malformed(400, f"encoded {'slash' if byte == 0x2F else 'backslash'} (%{hexa}) in the path")
        if byte < 0x20 or byte == 0x7F:
            return Malformed(400, f"encoded control byte (%{hexa}) in the path")
        ch = chr(byte)
        out.append(ch if ch in _UNRESERVED else f"%{hexa.upper()}")
        i += 3
    return "".join(out)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 for an absolute path: `.` dropped, `..` removes the segment before it
    (never above the root); a path ending in a dot segment keeps its trailing slash."""
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


@functools.lru_cache(maxsize=1024)  # bounded: hosts come from peers; a mesh's few names are hits
def normalize_host(host: str) -> Authority | Malformed:
    """A Host value's normal form: lower-case name without its trailing dot, and the port."""
    h = host.lower()
    port: int | None = None
    if h.startswith("["):
        name, _, rest = h.partition("]")
        name += "]"
        if not _IPV6.fullmatch(name):
            return Malformed(400, f"bad IPv6 literal in host {host!r}")
        if rest:
            if not rest.startswith(":"):
                return Malformed(400, f"bad host {host!r}")
            p = _port(rest[1:])
            if p is None:
                return Malformed(400, f"bad port in host {host!r}")
            port = p
        return Authority(name, port)
    name, colon, raw_port = h.rpartition(":")
    if not colon:
        name = h
    else:
        p = _port(raw_port)
        if p is None:
            return Malformed(400, f"bad port in host {host!r}")
        port = p
    if name.endswith("."):
        name = name[:-1]
    if not name:
        if host:
            return Malformed(400, f"empty host name in {host!r}")
        return Authority("", None)
    if not _REG_NAME.fullmatch(name) or "" in name.split("."):
        return Malformed(400, f"bad host name {host!r}")
    return Authority(name, port)


def _port(raw: str) -> int | None:
    if not _PORT.fullmatch(raw):
        return None
    n = int(raw)
    return n if 0 < n < 65536 else None
