"""The web console's rendering, pure: data in, HTML out (no server, no browser; those are in
tests/integration/test_console_browser.py and tests/lab/test_console.py)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from federation.core.explain import explain_service
from federation.core.failover import build_engine
from federation.core.graph_view import graph_data
from federation.core.offline import offline_observations
from federation.server import console as c
from federation.server.console_graph import graph_svg, short_service
from federation.server.html import Html, h, join
from tests.unit.core import factory as f

CHECKOUT_HOST = "checkout.shop.svc.clusterset.local"
EVIL = '<img src=x onerror="alert(1)"><script>alert(2)</script>&'
EVIL_ESCAPED = "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&lt;script&gt;alert(2)&lt;/script&gt;&amp;"
NOW = 1_800_000_000.0


def engine():  # type: ignore[no-untyped-def]
    snap = f.fleet()
    return build_engine(snap, offline_observations(snap))


def status(**over: Any) -> dict[str, Any]:
    st: dict[str, Any] = {
        "controller": {"epoch": 4},
        "desired": {"revision": "b" * 40, "subject": "break cart", "ok": False, "at_s": NOW},
        "applied": {"revision": "a" * 40, "subject": "canary 50%", "at_s": NOW - 60},
        "problems": [{"code": "MF0101", "file": "services/shop/cart.yaml", "line": 4, "col": 7,
                      "message": "unknown field 'spec.bogus'", "hint": "supported here: exportFrom, ports"}],
        "clusters": {"east": {"up": True, "lease_remaining_s": 27.5, "endpoints": 6, "ready_endpoints": 5,
                              "applied_revision": "a" * 40},
                     "west": {"up": False, "lease_remaining_s": 0, "endpoints": 0, "ready_endpoints": 0,
                              "last_error": "connection refused"}},
        "proxies": [{"proxy": "ztunnel/east/node-1", "sync": "SYNCED", "acked_revision": "a" * 40,
                     "acked_version": "1.3", "last_nack": ""},
                    {"proxy": "gateway/east", "sync": "STALE", "acked_revision": "9" * 40, "acked_version": "1.2",
                     "last_nack": "unsupported appProtocol"}],
        "reconciler": {"active_failovers": []},
    }
    st.update(over)
    return st


def event(kind: str, at_s: float, **over: Any) -> dict[str, Any]:
    ev = {"at_s": at_s, "service": CHECKOUT_HOST, "kind": kind, "from_cluster": "east", "to_cluster": "south",
          "trigger": "discovery: new observation from east", "policy_file": "policies/shop/checkout.yaml:3:1",
          "revision": "a" * 40, "detail": {"provenance": {"policy": "DestinationRule shop/checkout"}}}
    ev.update(over)
    return ev


class Source:
    def __init__(self, **fail: str) -> None:
        self.fail = fail
        self.calls: list[tuple[Any, ...]] = []
        self.eng = engine()

    def _maybe_fail(self, what: str) -> None:
        if what in self.fail:
            raise RuntimeError(self.fail[what])

    def status(self) -> dict[str, Any]:
        self._maybe_fail("status")
        return status()

    def graph(self) -> dict[str, Any]:
        self._maybe_fail("graph")
        return graph_data(self.eng)

    def failover_history(self, service: str | None, since_s: float | None) -> list[dict[str, Any]]:
        self._maybe_fail("history")
        return [event("FailedOver", NOW - 5), event("FailedBack", NOW - 1, to_cluster="")]

    def explain(self, service: str, from_cluster: str, zone: str | None) -> dict[str, Any]:
        self.calls.append(("explain", service, from_cluster, zone))
        return explain_service(self.eng, service, from_cluster, zone)

    def revisions(self, sha: str | None, limit: int) -> list[dict[str, Any]]:
        self.calls.append(("revisions", sha, limit))
        return [{"revision": "a" * 40, "subject": "canary 50%", "attempted_at_s": NOW, "ok": True, "problems": []}]


# --- the builder -------------------------------------------------------------------------------------


def test_builder_escapes_text_and_attribute_values_but_not_its_own_markup() -> None:
    out = h("p", EVIL, h("b", "x"), title=EVIL, data_x='"', hidden=True, skip=None)
    assert out == (f'<p title="{EVIL_ESCAPED}" data-x="&quot;" hidden>{EVIL_ESCAPED}<b>x</b></p>')
    assert isinstance(out, Html) and join(["<", h("i", "y")]) == "&lt;<i>y</i>"
    assert h("input", name="q") == '<input name="q">'              # void element
    with pytest.raises(TypeError, match="cannot put a dict"):
        h("p", {"a": 1})


# --- every panel escapes what others wrote ----------------------------------------------------------


@pytest.mark.parametrize("render", [
    lambda: c.revision_panel(status(desired={"revision": "b" * 40, "subject": EVIL, "ok": False},
                                    problems=[{"code": EVIL, "file": EVIL, "line": 1, "message": EVIL, "hint": EVIL}],
                                    render_problems=[EVIL], git={"last_error": EVIL})),
    lambda: c.revision_bar(status(controller={"epoch": EVIL})),
    lambda: c.clusters_panel(status(clusters={EVIL: {"up": False, "last_error": EVIL}}), {"error": EVIL}),
    lambda: c.proxies_panel(status(proxies=[{"proxy": EVIL, "sync": EVIL, "acked_version": EVIL,
                                             "last_nack": EVIL}])),
    lambda: c.timeline_panel([event(EVIL, NOW, service=EVIL, trigger=EVIL, policy_file=EVIL, from_cluster=EVIL,
                                    detail={"provenance": {"policy": EVIL}})]),
    lambda: c.commit_detail("abcd", [{"revision": EVIL, "subject": EVIL, "ok": False,
                                      "problems": [{"code": EVIL, "message": EVIL}]}]),
    lambda: c.explain_result({"error": EVIL}),
    lambda: c.graph_panel({"error": EVIL}),
    lambda: c.commit_link(EVIL),
])
def test_panels_escape_attacker_controlled_text(render: Any) -> None:
    out = render()
    assert EVIL_ESCAPED in out or "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in out
    assert "<script" not in out and "<img" not in out and 'onerror="' not in out


def test_the_graph_escapes_names_too() -> None:
    data = graph_data(engine())
    data["clusters"][0]["trust_domain"] = EVIL
    data["services"][0]["policy"] = EVIL
    out = graph_svg(data)
    assert "<script" not in out and "<img" not in out and "&lt;script&gt;" in out


# --- panels ------------------------------------------------------------------------------------------


def test_a_rejected_commit_shows_its_problems_and_what_stays_applied() -> None:
    out = c.revision_panel(status())
    assert "REJECTED" in out and 'class="rejected"' in out
    assert "commit bbbbbbbb was rejected; every proxy stays on aaaaaaaa (last applied)" in out
    assert '<code class="code">MF0101</code>' in out and "services/shop/cart.yaml:4:7" in out
    assert "unknown field &#x27;spec.bogus&#x27;" in out and "hint: supported here: exportFrom, ports" in out
    ok = c.revision_panel(status(desired={"revision": "a" * 40, "subject": "canary 50%", "ok": True}, problems=[]))
    assert "REJECTED" not in ok and "validation-problems" not in ok and "active failovers: none" in ok


def test_a_git_error_is_shown_unless_it_is_the_rejected_commit_again() -> None:
    again = "Error [MF0101] services/shop/cart.yaml:4:7 unknown field 'spec.bogus'"
    assert "git-error" not in c.revision_panel(status(git={"last_error": again}))
    unreachable = c.revision_panel(status(git={"last_error": "GitCommandError: could not read from remote"}))
    assert 'id="git-error">Git: GitCommandError: could not read from remote<' in unreachable


def test_active_failovers_are_listed() -> None:
    st = status(reconciler={"active_failovers": [{"service": CHECKOUT_HOST, "from_cluster": "east",
                                                 "to_cluster": "south", "at_s": NOW}]})
    out = c.revision_panel(st)
    assert "active failovers: 1" in out and "checkout.shop from east → south since" in out


def test_clusters_show_lease_endpoint_health_and_ejections() -> None:
    e = engine()
    e.apply_health_verdict({(CHECKOUT_HOST, "east/shop/checkout-0")}, 1.0)
    out = c.clusters_panel(status(), graph_data(e))
    east = re.search(r'<tr data-cluster="east">(.*?)</tr>', out)
    assert east is not None
    assert re.findall(r"<td[^>]*>(.*?)</td>", east.group(1)) == [
        "east", '<span class="ok">Live</span>', "27.5s", "5/6", "1", "aaaaaaaa", ""]
    assert '<tr data-cluster="west" class="down">' in out and "connection refused" in out


def test_proxies_show_sync_revision_version_and_last_nack() -> None:
    out = c.proxies_panel(status())
    assert '<tr data-proxy="gateway/east" data-sync="STALE">' in out
    assert "<td>99999999</td><td>1.2</td>" in out and "unsupported appProtocol" in out


def test_the_timeline_is_newest_first_bounded_and_links_commits() -> None:
    events = [event("FailedOver", NOW + i) for i in range(c.TIMELINE_ROWS + 10)]
    out = c.timeline_panel(events)
    times = re.findall(r'<td class="time">(.*?)</td>', out)
    assert len(times) == c.TIMELINE_ROWS and times == sorted(times, reverse=True)
    assert 'href="/console/commit?sha=' + "a" * 40 + '"' in out and 'hx-target="#commit"' in out
    assert "DestinationRule shop/checkout" in out and "policies/shop/checkout.yaml:3:1" in out
    assert c.commit_link("WORKTREE") == '<span class="commit">WORKTREE</span>'
    assert "no failover events recorded yet" in c.timeline_panel([])


def test_live_answers_every_panel_out_of_band_and_a_failing_read_spoils_only_its_panel() -> None:
    out = c.Console(Source(), clock=lambda: NOW).live()
    for pid in ("revision-bar", "panel-graph", "panel-revision", "panel-clusters", "panel-proxies",
                "panel-timeline", "service-names", "cluster-names", "updated"):
        assert re.search(rf'id="{pid}"[^>]*hx-swap-oob="true"', out), pid
    assert out.count('class="cluster ') == 3 and f'<option value="{CHECKOUT_HOST}">' in out
    broken = c.Console(Source(graph="engine gone"), clock=lambda: NOW).live()
    graph_panel = re.search(r'id="panel-graph".*?</section>', broken, re.S)
    assert graph_panel is not None and "RuntimeError: engine gone" in graph_panel.group(0)
    assert 'data-proxy="gateway/east"' in broken and "FailedOver" in broken     # the rest still renders
    assert "controller unreachable: RuntimeError: down" in c.Console(Source(status="down")).live()


def test_explain_form_answer_and_its_inputs() -> None:
    src = Source()
    con = c.Console(src)
    out = con.explain("checkout", "east", None)
    assert [t for t in re.findall(r'data-tier="(\d)" data-share="([\d.]+)"', out)] == [("0", "100.0"),
                                                                                      ("1", "0.0")]
    assert "DestinationRule shop/checkout" in out
    page = con.handle("/console/explain", {"service": [" checkout "], "from": ["east"], "zone": [""]})
    assert page.status == 200 and src.calls[-1] == ("explain", "checkout", "east", None)  # empty zone: none
    assert "name a service" in con.explain("", "east", None)
    bad = con.explain("payments", "east", None)
    assert 'class="error"' in bad and "no global service" in bad


def test_explain_says_what_the_cli_says_about_waypoints_pools_hosts_and_per_request_splits() -> None:
    import gitops

    snap = gitops.load_worktree(Path(__file__).resolve().parents[3] / "examples" / "l7")
    l7 = build_engine(snap, offline_observations(snap))
    out = c.explain_result(explain_service(l7, "checkout", "east", None))
    assert 'id="explain-name">name: checkout matched as ' in out
    assert "policy host: checkout.shop.svc.clusterset.local (clusterset name" in out
    assert "connection pool: max_connections 64, http1_max_pending_requests 256" in out
    assert re.search(r'id="explain-waypoint" data-gateway="shop/waypoint">waypoint: shop/waypoint '
                     r'\(policies/shop/waypoint.yaml:4:1\)', out)
    splits = re.findall(r'class="route-split" data-rule="([^"]*)" data-per="([^"]*)">([^<]*)<', out)
    assert splits == [("pinned", "request", "route split (rule pinned), per request: "
                                             "checkout-v2.shop.svc.clusterset.local 1"),
                      ("split", "request", "route split (rule split), per request: "
                                           "checkout.shop.svc.clusterset.local 80, checkout-v2.shop.svc.clusterset.local 20")]
    # an L4 route (no waypoint) splits connections, under no rule name; what a service lacks is not shown
    l4 = c.explain_result(explain_service(engine(), CHECKOUT_HOST, "east", None))
    assert 'data-rule="" data-per="connection">route split, per connection: ' in l4
    assert not any(x in l4 for x in ("explain-name", "explain-pool", "explain-waypoint"))
    assert EVIL_ESCAPED in c.explain_result({"service": "s", "name": {"asked": EVIL, "matched": EVIL},
                                             "waypoint": {"gateway": EVIL, "file": "f", "note": "n"}})


def test_commit_click_through_validates_the_sha_before_asking() -> None:
    src = Source()
    con = c.Console(src)
    out = con.commit("A" * 40)
    assert src.calls == [("revisions", "a" * 40, 20)] and 'id="commit-subject">canary 50%<' in out
    assert "is not a commit SHA" in con.commit("zz' OR 1=1 --") and len(src.calls) == 1
    assert "never attempted" in c.commit_detail("abcd", [])


# --- the graph ---------------------------------------------------------------------------------------


def test_graph_svg_draws_clusters_networks_gateways_trust_health_and_failover() -> None:
    e = engine()
    e.apply_health_verdict({(CHECKOUT_HOST, ep.uid) for ep in e.graph.endpoints_in(f.CHECKOUT, "east").values()}, 1.0)
    out = graph_svg(graph_data(e))
    assert 'data-clusters="3"' in out
    assert set(re.findall(r'<g class="cluster [^"]*" data-cluster="(\w+)" data-lease="Live"', out)) == {
        "east", "south", "west"}
    assert len(re.findall(r'<g class="network" data-network=', out)) == 3
    assert len(re.findall(r'class="gateway" data-gateway="[^"]+"', out)) == 3      # every example cluster has one
    assert len(re.findall(r'class="edge trust mutual"', out)) == 3
    assert re.search(rf'class="edge service-edge down" data-service="{CHECKOUT_HOST}" data-cluster="east"', out)
    assert re.search(rf'class="edge service-edge healthy" data-service="{CHECKOUT_HOST}" data-cluster="south"', out)
    assert re.search(rf'class="edge failover" data-service="{CHECKOUT_HOST}" data-from="east" data-to="south"', out)
    assert "checkout.shop failed over" in out
    assert "style=" not in out                      # colours are classes: the CSP allows no inline style


def test_short_service() -> None:
    assert short_service(CHECKOUT_HOST) == "checkout.shop" and short_service("a.b") == "a.b"


# --- page, files, headers ----------------------------------------------------------------------------


def test_the_page_has_no_inline_script_or_style_and_every_page_carries_the_csp() -> None:
    page = c.Console(Source()).handle("/console/", {})
    body = page.body.decode()
    assert page.status == 200 and page.headers["Content-Security-Policy"] == c.CSP
    assert "'unsafe-inline'" not in c.CSP and "'unsafe-eval'" not in c.CSP and "script-src 'self'" in c.CSP
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", body, re.S)
    assert len(scripts) == 2 and all(s == "" for s in scripts)          # only src= scripts, none inline
    assert " style=" not in body and "<style" not in body and " on" not in re.sub(r'"[^"]*"', '""', body)
    config = json.loads(re.search(r'name="htmx-config" content="([^"]*)"', body).group(1)  # type: ignore[union-attr]
                        .replace("&quot;", '"'))
    assert config["allowEval"] is False and config["allowScriptTags"] is False
    assert config["includeIndicatorStyles"] is False
    assert 'hx-trigger="load, every 1s"' in body and c.POLL_INTERVAL_S <= 2
    for path in ("/console/live", "/console/explain", "/console/commit", "/console/static/console.js", "/console/x"):
        assert c.Console(Source()).handle(path, {}).headers["Content-Security-Policy"] == c.CSP, path
    assert c.Console(Source()).handle("/console/live", {}).headers["Cache-Control"] == "no-store"


def test_static_files_come_from_a_fixed_list() -> None:
    con = c.Console(Source())
    assert con.handle("/console/static/console.css", {}).content_type.startswith("text/css")
    for bad in ("../status_api.py", "..%2fstatus_api.py", "NOTICE.md", "", "/etc/passwd"):
        assert con.handle("/console/static/" + bad, {}).status == 404, bad
    assert con.handle("/", {}).status == 302 and con.handle("/", {}).headers["Location"] == "/console/"
    assert c.is_public("/console/") and c.is_public("/console/static/htmx.min.js")
    assert not c.is_public("/console/live") and not c.is_public("/console/commit")


def test_vendored_htmx_is_the_pinned_release() -> None:
    static = Path(c.__file__).with_name("static")
    digest = hashlib.sha256((static / "htmx.min.js").read_bytes()).hexdigest()
    notice = (static / "NOTICE.md").read_text()
    assert f"sha256 of `htmx.min.js`: `{digest}`" in notice
    assert 'version:"2.0.11"' in (static / "htmx.min.js").read_text() and "htmx 2.0.11" in notice
    assert "Zero-Clause BSD" in notice
