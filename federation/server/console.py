"""The web console: server-rendered HTML on the status API's listener, live by polling.

Design (why it looks like this):

- **No build toolchain.** One page without data (`shell()`), one stylesheet, our own ~80 lines
  of JS (`static/console.js`: the token and the connection state) and htmx 2 vendored as a file
  (`static/NOTICE.md`: version, sha256, licence). Every panel is HTML rendered here from the
  same objects the JSON API serves; htmx swaps it in.
- **Live by polling, once a second.** A hidden poller GETs `/console/live`, whose answer holds
  every live panel as an out-of-band swap (one consistent snapshot per tick, one request).
  Polling rather than server-sent events: `EventSource` cannot send an `Authorization` header,
  and the stdlib server would hold a thread per open console.
- **Same listener, same rules as the API.** The shell and static files hold no data and are
  public; every fragment is a read of the controller's state and passes the status API's read
  check (`StatusServer(token=…)`: needed off loopback or with `reads_need_token`). A token is handed to the page in the URL fragment
  (`/console/#token=…`, never sent to the server or written in its logs) or pasted when a
  fragment answers 401; console.js keeps it in sessionStorage and sends it as a Bearer header.
- **Everything rendered is escaped** (`federation.server.html`): commit subjects, validation
  problems, NACKs and triggers are attacker-controlled text. The CSP allows scripts and styles
  from this origin only (no inline script, no inline style, no eval: htmx runs with
  `allowEval` and `allowScriptTags` off), so a slip in escaping still could not run script.
- **A failing read spoils one panel, not the page**: each panel is rendered on its own and shows
  its error where its content would be.

Routes (GET): `/console/` the page, `/console/static/<file>`, and the fragments `/console/live`,
`/console/explain?service=S&from=C[&zone=Z]`, `/console/commit?sha=SHA`. `/` redirects to the page.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from federation.server.console_graph import graph_svg, legend, short_service
from federation.server.html import Html, h, join

STATIC_DIR = Path(__file__).with_name("static")
STATIC_TYPES = {"htmx.min.js": "text/javascript; charset=utf-8", "console.js": "text/javascript; charset=utf-8",
                "console.css": "text/css; charset=utf-8", "favicon.svg": "image/svg+xml"}
POLL_INTERVAL_S = 1             # the bound is 2 s
TIMELINE_ROWS = 50
HTML_TYPE = "text/html; charset=utf-8"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
# htmx without the parts that need 'unsafe-eval' / 'unsafe-inline' (and no history snapshots)
HTMX_CONFIG = ('{"allowEval":false,"allowScriptTags":false,"includeIndicatorStyles":false,'
               '"selfRequestsOnly":true,"historyEnabled":false,"historyCacheSize":0}')


class ConsoleSource(Protocol):
    """What the console reads (the status API's `StatusSource` has all of it)."""

    def status(self) -> dict[str, Any]: ...

    def graph(self) -> dict[str, Any]: ...

    def failover_history(self, service: str | None, since_s: float | None) -> list[dict[str, Any]]: ...

    def explain(self, service: str, from_cluster: str, zone: str | None) -> dict[str, Any]: ...

    def revisions(self, sha: str | None, limit: int) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class Page:
    status: int
    body: bytes
    content_type: str = HTML_TYPE
    headers: Mapping[str, str] = field(default_factory=dict)


def is_console_path(path: str) -> bool:
    return path == "/" or path == "/console" or path.startswith("/console/")


def is_public(path: str) -> bool:
    """The page and its static files hold no data: served without credentials (a browser cannot
    send a Bearer header when it navigates). Fragments are reads of the controller's state."""
    return path in ("/", "/console", "/console/") or path.startswith("/console/static/")


class Console:
    def __init__(self, source: ConsoleSource, clock: Callable[[], float] = time.time) -> None:
        self.source = source
        self.clock = clock

    def handle(self, path: str, query: Mapping[str, Sequence[str]]) -> Page:
        """The answer for a console path (`is_console_path`); the caller checked access."""
        def one(key: str) -> str:
            v = query.get(key)
            return v[0].strip() if v else ""

        if path in ("/", "/console"):
            return Page(302, b"", headers={"Location": "/console/"})
        if path == "/console/":
            return _page(200, shell())
        if path.startswith("/console/static/"):
            return _static(path.removeprefix("/console/static/"))
        if path == "/console/live":
            return _page(200, self.live(), no_store=True)
        if path == "/console/explain":
            return _page(200, self.explain(one("service"), one("from"), one("zone") or None), no_store=True)
        if path == "/console/commit":
            return _page(200, self.commit(one("sha")), no_store=True)
        return _page(404, h("p", f"no console page {path}; the console is at /console/", class_="error"))

    # --- fragments -------------------------------------------------------------------------------

    def live(self) -> Html:
        """Every live panel, each as an out-of-band swap (see the module docstring)."""
        now_s = self.clock()
        st = _try(self.source.status)
        graph = _try(self.source.graph)
        history = _try(lambda: self.source.failover_history(None, None))
        return join([
            h("div", revision_bar(st), id="revision-bar", hx_swap_oob="true"),
            h("section", _panel("Federation graph", lambda: graph_panel(graph)), id="panel-graph",
              class_="panel wide", hx_swap_oob="true"),
            h("section", _panel("Revision", lambda: revision_panel(st)), id="panel-revision", class_="panel",
              hx_swap_oob="true"),
            h("section", _panel("Clusters", lambda: clusters_panel(st, graph)), id="panel-clusters",
              class_="panel", hx_swap_oob="true"),
            h("section", _panel("Proxies", lambda: proxies_panel(st)), id="panel-proxies", class_="panel",
              hx_swap_oob="true"),
            h("section", _panel("Failover timeline", lambda: timeline_panel(history)), id="panel-timeline",
              class_="panel wide", hx_swap_oob="true"),
            h("datalist", [h("option", value=s["hostname"]) for s in _ok_list(graph, "services")],
              id="service-names", hx_swap_oob="true"),
            h("datalist", [h("option", value=c["name"]) for c in _ok_list(graph, "clusters")],
              id="cluster-names", hx_swap_oob="true"),
            h("span", f"live · updated {_hms(now_s)} UTC", id="updated", hx_swap_oob="true"),
        ])

    def explain(self, service: str, from_cluster: str, zone: str | None) -> Html:
        if not service or not from_cluster:
            return h("p", "name a service and the client's cluster", class_="error")
        data = _try(lambda: self.source.explain(service, from_cluster, zone))
        return explain_result(data)

    def commit(self, sha: str) -> Html:
        sha = sha.lower()
        if not (4 <= len(sha) <= 40 and all(ch in "0123456789abcdef" for ch in sha)):
            return h("p", f"{sha!r} is not a commit SHA", class_="error")
        rows = _try(lambda: self.source.revisions(sha, 20))
        return commit_detail(sha, rows)


# --- panels (pure: data in, markup out) ------------------------------------------------------------


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as e:  # a panel shows the error; the page goes on
        return {"error": f"{type(e).__name__}: {e}"}


def _ok_list(data: Any, key: str) -> list[dict[str, Any]]:
    return list(data.get(key) or []) if isinstance(data, dict) and "error" not in data else []


def _panel(title: str, body: Callable[[], Html]) -> Html:
    try:
        content = body()
    except Exception as e:  # a bug in one panel's rendering must not blank the page
        content = h("p", f"cannot show this panel: {type(e).__name__}: {e}", class_="error")
    return join([h("h2", title), content])


def _error(data: Any) -> Html | None:
    if isinstance(data, dict) and "error" in data:
        return h("p", str(data["error"]), class_="error")
    return None


def _short(sha: object) -> str:
    return str(sha or "")[:8]


def _hms(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S")


def _stamp(ts: float | None) -> str:
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _problem(p: Mapping[str, Any]) -> Html:
    where = ":".join(str(p[k]) for k in ("file", "line", "col") if p.get(k) not in (None, "", 0))
    return h("li",
             h("code", str(p.get("code") or "?"), class_="code"), " ",
             h("span", where, class_="where") if where else None, " " if where else None,
             h("span", str(p.get("message") or ""), class_="message"),
             h("div", f"hint: {p['hint']}", class_="hint") if p.get("hint") else None,
             class_="problem")


def commit_link(sha: str) -> Html:
    if not sha or sha == "WORKTREE":
        return h("span", sha or "-", class_="commit")
    url = "/console/commit?sha=" + quote(sha, safe="")
    return h("a", _short(sha), href=url, hx_get=url, hx_target="#commit", class_="commit", data_sha=sha,
             title=f"commit {sha}: show its subject")


def revision_bar(st: Any) -> Html:
    if _error(st):
        return h("span", f"controller unreachable: {st['error']}", class_="bad")
    d, a = st.get("desired") or {}, st.get("applied") or {}
    rejected = bool(d) and d.get("ok") is False
    return join([
        h("span", "applied ", h("code", _short(a.get("revision")) or "none"), class_="applied"),
        h("span", " · last attempted ", h("code", _short(d.get("revision")) or "none"),
          h("strong", " REJECTED", class_="bad") if rejected else None, class_="attempted"),
        h("span", f" · epoch {(st.get('controller') or {}).get('epoch', '?')}", class_="epoch"),
    ])


def revision_panel(st: Any) -> Html:
    err = _error(st)
    if err:
        return err
    d, a = st.get("desired") or {}, st.get("applied") or {}
    rejected = bool(d) and d.get("ok") is False
    rows = [
        h("tr", h("th", "applied"), h("td", commit_link(str(a.get("revision") or ""))),
          h("td", str(a.get("subject") or "")), h("td", _stamp(a.get("at_s")))),
        h("tr", h("th", "last attempted"), h("td", commit_link(str(d.get("revision") or ""))),
          h("td", str(d.get("subject") or "")),
          h("td", h("strong", "REJECTED", class_="bad") if rejected else "applied" if d else "-"),
          class_="rejected" if rejected else None),
    ]
    parts: list[Any] = [h("table", rows, class_="kv", id="revisions")]
    if rejected:
        parts.append(h("p", f"commit {_short(d.get('revision'))} was rejected; every proxy stays on "
                            f"{_short(a.get('revision')) or 'nothing yet'} (last applied)", class_="bad"))
        parts.append(h("ul", [_problem(p) for p in st.get("problems") or []], class_="problems",
                       id="validation-problems"))
    if st.get("render_problems"):
        parts.append(h("ul", [h("li", str(p)) for p in st["render_problems"]], class_="problems"))
    git_error = str((st.get("git") or {}).get("last_error") or "")
    # the Git source also reports a commit that does not validate: shown above as its problems
    if git_error and not any(str(p.get("message") or "\0") in git_error for p in st.get("problems") or []):
        parts.append(h("p", f"Git: {git_error}", class_="bad", id="git-error"))
    active = (st.get("reconciler") or {}).get("active_failovers") or []
    if active:
        parts.append(h("p", f"active failovers: {len(active)}", class_="bad"))
        parts.append(h("ul", [h("li", short_service(str(f.get("service") or "")), " from ", str(f.get("from_cluster")),
                                " → ", str(f.get("to_cluster") or "?"), f" since {_stamp(f.get('at_s'))} UTC",
                                data_service=str(f.get("service") or ""))
                              for f in active], id="active-failovers"))
    else:
        parts.append(h("p", "active failovers: none", class_="ok", id="active-failovers"))
    return join(parts)


def graph_panel(graph: Any) -> Html:
    return _error(graph) or join([graph_svg(graph), legend()])


def clusters_panel(st: Any, graph: Any) -> Html:
    err = _error(st)
    if err:
        return err
    lease = {c["name"]: c.get("lease") for c in _ok_list(graph, "clusters")}
    ejected: dict[str, int] = {}
    for s in _ok_list(graph, "services"):
        for pc in s.get("clusters", []):
            ejected[pc["cluster"]] = ejected.get(pc["cluster"], 0) + sum(1 for e in pc["endpoints"] if e["ejected"])
    rows = []
    for name, c in sorted((st.get("clusters") or {}).items()):
        up = bool(c.get("up"))
        state = lease.get(name) or ("Live" if up else "?")
        left = c.get("lease_remaining_s")
        rows.append(h("tr",
                      h("td", name),
                      h("td", h("span", state, class_="ok" if up and state == "Live" else "bad")),
                      h("td", f"{float(left):.1f}s" if isinstance(left, int | float) else "-"),
                      h("td", f"{c.get('ready_endpoints', 0)}/{c.get('endpoints', 0)}"),
                      h("td", str(ejected.get(name, 0)), class_="bad" if ejected.get(name) else None),
                      h("td", _short(c.get("applied_revision"))),
                      h("td", str(c.get("last_error") or ""), class_="detail"),
                      data_cluster=name, class_=None if up else "down"))
    return h("table", h("thead", h("tr", [h("th", t) for t in ("cluster", "lease", "lease left", "ready/endpoints",
                                                                "ejected", "applied", "last error")])),
             h("tbody", rows), class_="grid", id="clusters")


def proxies_panel(st: Any) -> Html:
    err = _error(st)
    if err:
        return err
    rows = [h("tr",
              h("td", p.get("proxy", "")),
              h("td", h("span", p.get("sync", ""), class_="ok" if p.get("sync") == "SYNCED" else "bad")),
              h("td", _short(p.get("acked_revision"))),
              h("td", str(p.get("acked_version") or "")),
              h("td", str(p.get("last_nack") or ""), class_="detail bad" if p.get("last_nack") else "detail"),
              data_proxy=p.get("proxy", ""), data_sync=p.get("sync", ""))
            for p in st.get("proxies") or []]
    return h("table", h("thead", h("tr", [h("th", t) for t in ("proxy", "sync", "revision", "version",
                                                                "last NACK")])),
             h("tbody", rows), class_="grid", id="proxies")


def timeline_panel(history: Any) -> Html:
    err = _error(history)
    if err:
        return err
    events = list(history or [])[-TIMELINE_ROWS:][::-1]     # newest first
    if not events:
        return h("p", "no failover events recorded yet", class_="muted", id="timeline")
    rows = []
    for e in events:
        detail = e.get("detail") or {}
        prov = detail.get("provenance") or {}
        rows.append(h("tr",
                      h("td", _stamp(e.get("at_s")), class_="time"),
                      h("td", short_service(str(e.get("service") or "")), title=str(e.get("service") or "")),
                      h("td", h("span", str(e.get("kind") or ""), class_=f"kind {e.get('kind', '')}")),
                      h("td", str(e.get("from_cluster") or "")),
                      h("td", str(e.get("to_cluster") or "")),
                      h("td", str(e.get("trigger") or ""), class_="detail"),
                      h("td", str(prov.get("policy") or ""), h("br"),
                        h("span", str(e.get("policy_file") or ""), class_="where")),
                      h("td", commit_link(str(e.get("revision") or ""))),
                      class_="event", data_kind=str(e.get("kind") or ""), data_service=str(e.get("service") or ""),
                      data_at_s=f"{float(e.get('at_s') or 0):.3f}"))
    return h("table", h("thead", h("tr", [h("th", t) for t in ("time (UTC)", "service", "event", "from", "to",
                                                                "trigger", "policy", "commit")])),
             h("tbody", rows), class_="grid", id="timeline")


def commit_detail(sha: str, rows: Any) -> Html:
    err = _error(rows)
    if err:
        return err
    if not rows:
        return h("p", f"commit {sha} was never attempted by this controller (or is older than its records)",
                 class_="muted")
    first = rows[0]
    attempts = [h("li", f"{_stamp(r.get('attempted_at_s'))} UTC: ",
                  h("strong", "applied", class_="ok") if r.get("ok") else h("strong", "rejected", class_="bad"),
                  h("ul", [_problem(p) for p in r.get("problems") or []], class_="problems")
                  if r.get("problems") else None)
                for r in rows]
    return join([h("p", h("code", str(first.get("revision") or ""), class_="sha")),
                 h("p", str(first.get("subject") or ""), class_="subject", id="commit-subject"),
                 h("ul", attempts, class_="attempts")])


def explain_result(data: Any) -> Html:
    err = _error(data)
    if err:
        return err
    src, pol = data.get("from") or {}, data.get("policy") or {}
    head = h("p", h("strong", str(data.get("service") or "")), " from ", h("strong", str(src.get("cluster") or "")),
             f" ({src.get('network')}, {src.get('region')}/{src.get('zone')}) @ ", commit_link(str(data.get("revision") or "")),
             class_="explain-head")
    policy = h("p", f"policy {pol.get('object')}", f" ({pol['file']})" if pol.get("file") else "",
               f"; mode {pol.get('mode')}",
               f" [{', '.join(pol.get('failover_priority') or [])}]" if pol.get("failover_priority") else "",
               class_="muted")
    # what `meshfed explain` says besides the tiers (federation.core.explain.explain_text), in the same words
    name, host, pool, waypoint = (data.get("name") or {}, pol.get("host") or {}, pol.get("connection_pool") or {},
                                  data.get("waypoint") or {})
    about = [
        h("p", f"name: {name['asked']} matched as {name.get('matched')}", class_="muted", id="explain-name")
        if name.get("asked") and name["asked"] != data.get("service") else None,
        h("p", f"policy host: {host.get('written')} ({host.get('matched')})", class_="muted", id="explain-host")
        if host else None,
        h("p", "connection pool: " + ", ".join(f"{k} {v}" for k, v in pool.items() if v is not None), class_="muted",
          id="explain-pool") if pool else None,
        h("p", f"waypoint: {waypoint.get('gateway')} ({waypoint.get('file')}): {waypoint.get('note')}",
          id="explain-waypoint", data_gateway=str(waypoint.get("gateway") or "")) if waypoint else None,
    ]
    tiers = []
    for t in data.get("tiers") or []:
        groups = []
        for g in t.get("groups") or []:
            eps = [h("li", str(e.get("uid")), f" weight {e.get('weight')} ",
                     h("span", "healthy" if e.get("healthy") else
                       f"EJECTED ({e.get('reason')})" if e.get("ejected") else "unhealthy",
                       class_="ok" if e.get("healthy") else "bad"))
                   for e in g.get("endpoints") or []]
            groups.append(h("li", h("strong", str(g.get("cluster"))), f" [{g.get('network')} {g.get('locality')}] ",
                            str(g.get("path") or ""), h("div", f"why: {g.get('why')}", class_="muted"),
                            h("ul", eps), data_cluster=str(g.get("cluster"))))
        share = float(t.get("share") or 0.0) * 100
        tiers.append(h("li", h("span", f"tier {t.get('tier')}", class_="tier"), " ",
                       h("span", f"{share:.1f}%", class_="share"), f" of traffic (health {t.get('health_pct')}%)",
                       h("strong", " PANIC", class_="bad") if t.get("panic") else None,
                       h("ul", groups), class_="tier-row", data_tier=str(t.get("tier")), data_share=f"{share:.1f}"))
    extra = [h("p", f"left out: {x.get('cluster')}: {x.get('why')}", class_="muted") for x in data.get("excluded") or []]
    rules: dict[str, list[Mapping[str, Any]]] = {}
    for r in data.get("routes") or []:
        rules.setdefault(str(r.get("rule") or ""), []).append(r)
    for rule, backends in rules.items():   # an L4 route splits connections; a waypoint's rules split requests
        per = str(backends[0].get("per") or "connection")
        extra.append(h("p", f"route split{' (rule ' + rule + ')' if rule else ''}, per {per}: "
                            + ", ".join(f"{r.get('to')} {r.get('weight')}" for r in backends),
                       class_="route-split", data_rule=rule, data_per=per))
    extra.extend(h("p", f"[{p.get('code')}] {p.get('message')}", class_="bad") for p in data.get("problems") or [])
    return join([head, policy, *about, h("ol", tiers, class_="tiers", id="explain-tiers"), extra])


# --- the page and its files -----------------------------------------------------------------------


def shell() -> Html:
    """The page: empty panels the first poll fills; the explain form; nothing inline but markup."""
    def panel(pid: str, title: str, wide: bool = False) -> Html:
        return h("section", h("h2", title), h("p", "loading…", class_="muted"), id=pid,
                 class_="panel wide" if wide else "panel")

    explain = h("section",
                h("h2", "Explain"),
                h("form",
                  h("label", "service ", h("input", name="service", list="service-names", required=True,
                                           placeholder="checkout", autocomplete="off")),
                  h("label", "client cluster ", h("input", name="from", list="cluster-names", required=True,
                                                  placeholder="east", autocomplete="off")),
                  h("label", "zone ", h("input", name="zone", placeholder="(its first node's)", autocomplete="off")),
                  h("button", "explain", type="submit"),
                  id="explain-form", action="/console/explain", method="get", hx_get="/console/explain",
                  hx_target="#explain-result"),
                h("datalist", id="service-names"), h("datalist", id="cluster-names"),
                h("div", id="explain-result", class_="explain"),
                id="panel-explain", class_="panel wide")
    commit = h("section", h("h2", "Commit"),
               h("div", h("p", "click a commit to see its subject and attempts", class_="muted"), id="commit"),
               id="panel-commit", class_="panel")
    body = h("body",
             h("header",
               h("h1", "meshfed"),
               h("div", h("span", "connecting…", class_="muted"), id="revision-bar"),
               h("span", "", id="updated", class_="muted"),
               h("span", "connecting…", id="conn", class_="conn")),
             h("form",
               h("label", "This controller wants its status API token: ",
                 h("input", type="password", name="token", autocomplete="off", id="auth-token")),
               h("button", "use token", type="submit"),
               id="auth", hidden=True),
             h("div", id="poller", hx_get="/console/live", hx_trigger=f"load, every {POLL_INTERVAL_S}s",
               hx_swap="none", hx_sync="this:drop"),
             h("main",
               panel("panel-graph", "Federation graph", wide=True),
               panel("panel-revision", "Revision"),
               panel("panel-clusters", "Clusters"),
               panel("panel-proxies", "Proxies"),
               panel("panel-timeline", "Failover timeline", wide=True),
               commit,
               explain))
    head = h("head",
             h("meta", charset="utf-8"),
             h("meta", name="viewport", content="width=device-width, initial-scale=1"),
             h("meta", name="htmx-config", content=HTMX_CONFIG),
             h("title", "meshfed console"),
             h("link", rel="stylesheet", href="/console/static/console.css"),
             h("link", rel="icon", href="/console/static/favicon.svg", type="image/svg+xml"),
             h("script", src="/console/static/htmx.min.js", defer=True),
             h("script", src="/console/static/console.js", defer=True))
    return Html("<!doctype html>\n" + h("html", head, body, lang="en"))


def _page(status: int, markup: Html, no_store: bool = False) -> Page:
    headers = dict(SECURITY_HEADERS)
    headers["Cache-Control"] = "no-store" if no_store else "no-cache"
    return Page(status, markup.encode(), HTML_TYPE, headers)


def _static(name: str) -> Page:
    ctype = STATIC_TYPES.get(name)   # a fixed list: no path from the request reaches the filesystem
    if ctype is None:
        return _page(404, h("p", f"no static file {name}", class_="error"))
    return Page(200, (STATIC_DIR / name).read_bytes(), ctype, {**SECURITY_HEADERS, "Cache-Control": "no-cache"})
