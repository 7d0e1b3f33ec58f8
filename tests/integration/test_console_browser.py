"""The web console in a real browser (Debian's Chromium through Playwright), against the status
server on loopback fed by a scripted source: the graph of examples/fleet, a rejected commit whose
subject and problems carry markup, live updates, the explain form, the commit click-through, and
a status API that wants a token for reads. (tests/lab/test_console.py runs it against a lab.)

Skips with the reason when Playwright or Chromium is missing (`make venv`, `make system`).
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gitops
from federation.core.explain import ExplainError, explain_service
from federation.core.failover import FailoverEngine, build_engine
from federation.core.graph_view import graph_data
from federation.core.offline import offline_observations
from federation.server.status_api import StatusServer
from tests.browser import browser_page, require_browser, screenshot

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "fleet"
CHECKOUT = "checkout.shop.svc.clusterset.local"
# attacker-controlled text: a commit subject and a validation message someone pushed
EVIL_SUBJECT = 'break cart <img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
EVIL_MESSAGE = "unknown field 'spec.<b>bogus</b>' <svg onload=\"window.__pwned=3\">"
TOKEN = "s3cret-console-token"


class Source:
    """A controller as the status API sees it, scriptable from the test."""

    def __init__(self) -> None:
        snap = gitops.load_worktree(EXAMPLES)
        self.engine: FailoverEngine = build_engine(snap, offline_observations(snap))
        self.lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        self.now = time.time()

    def status(self) -> dict[str, Any]:
        return {
            "controller": {"epoch": 2},
            "desired": {"revision": "b" * 40, "subject": EVIL_SUBJECT, "ok": False, "at_s": self.now},
            "applied": {"revision": "a" * 40, "subject": "checkout: canary 50%", "at_s": self.now - 60},
            "problems": [{"code": "MF0101", "file": "services/shop/cart.yaml", "line": 4, "col": 7,
                          "message": EVIL_MESSAGE, "hint": "supported here: exportFrom, ports"}],
            "clusters": {c: {"up": True, "lease_remaining_s": 27.5, "endpoints": 6, "ready_endpoints": 6,
                             "applied_revision": "a" * 40} for c in ("east", "south", "west")},
            "proxies": [{"proxy": f"ztunnel/{c}/node-1", "sync": "SYNCED", "acked_revision": "a" * 40,
                         "acked_version": "1.3", "last_nack": ""} for c in ("east", "south", "west")],
            "reconciler": {"active_failovers": []},
        }

    def graph(self) -> dict[str, Any]:
        with self.lock:
            return graph_data(self.engine)

    def failover_history(self, service: str | None, since_s: float | None) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.events)

    def explain(self, service: str, from_cluster: str, zone: str | None) -> dict[str, Any]:
        with self.lock:
            try:
                return explain_service(self.engine, service, from_cluster, zone)
            except ExplainError as e:
                return {"error": str(e), "usage": True}

    def revisions(self, sha: str | None, limit: int) -> list[dict[str, Any]]:
        rows = [{"revision": "a" * 40, "subject": "checkout: canary 50%", "attempted_at_s": self.now - 60,
                 "ok": True, "problems": []}]
        return [r for r in rows if sha is None or str(r["revision"]).startswith(sha)]

    def services(self) -> list[dict[str, Any]]:
        return []

    def endpoints(self, service: str, from_cluster: str | None) -> dict[str, Any]:
        return {}

    def checks(self) -> list[dict[str, Any]]:
        return []

    def trust(self) -> list[dict[str, Any]]:
        return []

    def trust_view(self) -> dict[str, Any]:
        return {}

    def fail_east_over(self) -> None:
        """East's checkout pods ejected by the proxies' vote, and the FailedOver the controller records."""
        with self.lock:
            key = self.engine.graph.hostnames[CHECKOUT]
            self.engine.apply_health_verdict({(CHECKOUT, ep.uid) for ep in
                                              self.engine.graph.endpoints_in(key, "east").values()}, time.time())
            self.events.append({"at_s": time.time(), "service": CHECKOUT, "kind": "FailedOver", "from_cluster": "east",
                                "to_cluster": "south", "trigger": "health reports: 2 of 2 proxies eject east/shop/checkout-0",
                                "policy_file": "policies/shop/checkout.yaml:3:1", "revision": "a" * 40,
                                "detail": {"provenance": {"policy": "DestinationRule shop/checkout"}}})


@pytest.fixture
def source() -> Source:
    require_browser()   # skip before any set-up when there is no browser
    return Source()


@pytest.fixture
def server(source: Source) -> Iterator[StatusServer]:
    srv = StatusServer(source, "127.0.0.1:0").start()
    try:
        yield srv
    finally:
        srv.stop()


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def _problems(page: Any) -> list[str]:
    """Console errors worth failing for: CSP violations, script errors, failed loads."""
    return [m for m in page.meshfed_messages if m.startswith(("error", "pageerror"))]


def test_console_shows_the_federation_live_and_escapes_what_others_wrote(
        server: StatusServer, source: Source, tmp_path: Path) -> None:
    with browser_page(tmp_path) as page:
        page.goto(server.url + "/console/")
        page.wait_for_selector("svg.graph g.cluster", timeout=10_000)
        assert page.locator("svg.graph g.cluster").count() == 3
        assert sorted(page.locator("svg.graph g.cluster").evaluate_all(
            "els => els.map(e => e.dataset.cluster)")) == ["east", "south", "west"]
        assert page.locator("svg.graph g.network").count() == 3
        assert page.locator("svg.graph g.gateway").count() == 3
        assert page.locator("svg.graph .edge.failover").count() == 0
        assert page.inner_text("#conn") == "live"

        # the rejected commit: its subject and problem shown as text, never run
        assert "REJECTED" in page.inner_text("#revision-bar")
        revision = page.inner_text("#panel-revision")
        assert EVIL_SUBJECT in revision and EVIL_MESSAGE in revision
        assert "services/shop/cart.yaml:4:7" in revision and "hint: supported here" in revision
        assert page.evaluate("window.__pwned") is None
        assert page.locator("#panel-revision img, #panel-revision script, #panel-revision svg").count() == 0

        # live: a failover the controller records shows up without reloading (polling ≤ 2 s)
        source.fail_east_over()
        t0 = time.monotonic()
        page.wait_for_selector("#timeline tr.event[data-kind=FailedOver]", timeout=5_000)
        page.wait_for_selector(f'svg.graph .edge.failover[data-from=east][data-to=south][data-service="{CHECKOUT}"]',
                               timeout=5_000)
        shown_after_s = time.monotonic() - t0
        assert shown_after_s < 3.0, shown_after_s
        edge = page.locator(f'svg.graph .service-edge[data-service="{CHECKOUT}"][data-cluster=east]')
        # (expect retries: a poll may replace the element between finding and reading it)
        expect(edge).to_have_attribute("data-health", "down")
        # computed style: the stylesheet (not an inline style) colours the dead edge red
        expect(edge.locator("line")).to_have_css("stroke", "rgb(198, 40, 40)")
        screenshot(page, tmp_path, "console-failover")

        # the explain form: tiers and shares from the same engine
        page.fill("#explain-form input[name=service]", "checkout")
        page.fill("#explain-form input[name=from]", "east")
        page.click("#explain-form button[type=submit]")
        page.wait_for_selector("#explain-tiers li.tier-row", timeout=5_000)
        shares = page.locator("#explain-tiers > li.tier-row").evaluate_all(
            "els => els.map(e => [e.dataset.tier, e.dataset.share])")
        assert shares[0] == ["0", "0.0"] and ["1", "100.0"] in shares
        assert "EJECTED (HealthReportQuorum)" in page.inner_text("#explain-result")
        page.fill("#explain-form input[name=service]", "payments")
        page.click("#explain-form button[type=submit]")
        page.wait_for_selector("#explain-result .error", timeout=5_000)
        assert "no global service 'payments'" in page.inner_text("#explain-result")

        # click through to the commit subject from the timeline
        page.click("#timeline a.commit")
        page.wait_for_selector("#commit-subject", timeout=5_000)
        assert page.inner_text("#commit-subject") == "checkout: canary 50%"
        screenshot(page, tmp_path, "console-explain-commit")
        assert _problems(page) == []


def test_console_with_a_status_api_that_wants_a_token(source: Source, tmp_path: Path) -> None:
    seen: list[dict[str, object]] = []   # the status API's request log: who was authenticated
    srv = StatusServer(source, "127.0.0.1:0", token=TOKEN, log=seen.append, reads_need_token=True).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(srv.url + "/api/v1/status", timeout=5)
        assert refused.value.code == 401 and refused.value.headers["WWW-Authenticate"].startswith("Bearer")

        with browser_page(tmp_path) as page:
            # without the token: the page loads (it holds no data), its reads are refused, it asks
            page.goto(srv.url + "/console/")
            page.wait_for_selector("#auth:not([hidden])", timeout=10_000)
            assert page.inner_text("#conn") == "needs the status API token"
            assert page.locator("svg.graph").count() == 0
            page.fill("#auth-token", TOKEN)
            page.click("#auth button[type=submit]")
            page.wait_for_selector("svg.graph g.cluster", timeout=5_000)
            assert page.is_hidden("#auth") and page.inner_text("#conn") == "live"

        with browser_page(tmp_path / "second") as page:
            # handed over in the URL fragment: never sent to the server, gone from the address bar
            page.goto(srv.url + f"/console/#token={TOKEN}")
            page.wait_for_selector("svg.graph g.cluster", timeout=10_000)
            assert TOKEN not in page.url
            screenshot(page, tmp_path, "console-with-token")
            assert [m for m in _problems(page) if "401" not in m] == []
    finally:
        srv.stop()
    assert any(e["authenticated"] for e in seen)
    assert all(e["authenticated"] for e in seen if e["status"] == 200 and str(e["path"]).startswith("/console/live"))
    assert not any(e["authenticated"] for e in seen if e["status"] == 401)


def test_console_says_when_the_controller_is_gone_and_picks_up_again(source: Source, tmp_path: Path) -> None:
    srv = StatusServer(source, "127.0.0.1:0").start()
    port = srv.port
    with browser_page(tmp_path) as page:
        page.goto(srv.url + "/console/")
        page.wait_for_selector("#conn.live", timeout=10_000)
        srv.stop()
        page.wait_for_selector("#conn.down", timeout=5_000)
        assert page.inner_text("#conn") == "cannot reach the controller (retrying)"
        assert page.locator("svg.graph g.cluster").count() == 3        # the last picture stays
        srv = StatusServer(source, f"127.0.0.1:{port}").start()          # back on the same address
        try:
            page.wait_for_selector("#conn.live", timeout=5_000)
        finally:
            srv.stop()
