"""The web console in a real browser against the three-cluster lab (root; Chromium + Playwright).

One lab for the module. In order:

- the console (served by the lab's controller, through the lab's host portal) draws the three
  clusters with their networks, gateways and live leases, and every proxy SYNCED;
- the explain form answers checkout from east: east takes all of it;
- `meshfed lab fault kill pod east/shop/checkout-*` — the FailedOver event appears in the
  timeline within 5 s, the graph draws east failed over to south and east's checkout edge down,
  explain now gives south the traffic, and the event's commit clicks through to its subject;
  healing brings FailedBack;
- a commit that does not validate is pushed: the console shows it REJECTED with its problems
  (file:line and message) while the applied revision stays.

Screenshots (`console-steady`, `console-failover`, `console-rejected`) are saved under the test's
tmp path and `$MESHFED_ARTIFACTS/screenshots` when set; `console-failover` is the README's picture.
The lab's state directory is $MESHFED_CONSOLE_STATE_DIR (default /tmp/meshfed-console).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chaos.demo import LabFederation, replace_in
from tests.browser import browser_page, require_browser, screenshot

REPO = Path(__file__).resolve().parents[2]
STATE_DIR = Path(os.environ.get("MESHFED_CONSOLE_STATE_DIR", "/tmp/meshfed-console"))
CHECKOUT = "checkout.shop.svc.clusterset.local"
PODS = "east/shop/checkout-[0-9]*"       # not checkout-v2
FAILOVER_SHOWN_WITHIN_S = 5.0
FAILED_OVER = f'#timeline tr.event[data-kind=FailedOver][data-service="{CHECKOUT}"]'
# (waits use locators, not page.wait_for_function: Playwright polls a string predicate with eval,
# which the console's CSP refuses, as it should)

pytestmark = pytest.mark.timeout(900)   # the lab's bring-up and convergence count toward the first test


def _print(*parts: Any) -> None:
    print("[console]", *parts, flush=True)


def meshfed(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    """`meshfed` of this checkout (a worktree has no virtualenv of its own)."""
    r = subprocess.run([sys.executable, "-m", "federation.cli.main", *args], capture_output=True, text=True,
                       timeout=timeout_s, check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, f"meshfed {' '.join(args)}: {r.stdout}{r.stderr}"
    return r


@pytest.fixture(scope="module")
def fed() -> Iterator[LabFederation]:
    require_browser()   # no lab is built for a test that would skip
    from clusters.lab.layout import LabError

    f = LabFederation(REPO / "examples" / "fleet", STATE_DIR)
    try:
        lab = f.up()
    except LabError as e:
        if "already running" in str(e):  # someone else's lab: never tear it down
            pytest.fail(f"{e} (or set MESHFED_CONSOLE_STATE_DIR to run beside it)")
        f.down()
        raise
    except BaseException:
        f.down()
        raise
    try:
        _, took_s = f.wait_converged(timeout_s=240)
        _print(f"lab up in {lab.get('up_wall_s')} s, converged {took_s:.1f} s later")
        yield f
    finally:
        f.down()


def _errors(page: Any) -> list[str]:
    return [m for m in page.meshfed_messages if m.startswith(("error", "pageerror"))]


def _explain(page: Any, service: str, cluster: str) -> list[tuple[str, str]]:
    page.fill("#explain-form input[name=service]", service)
    page.fill("#explain-form input[name=from]", cluster)
    page.evaluate("document.getElementById('explain-result').innerHTML = ''")
    page.click("#explain-form button[type=submit]")
    page.wait_for_selector("#explain-tiers li.tier-row", timeout=10_000)
    return [tuple(x) for x in page.locator("#explain-tiers > li.tier-row").evaluate_all(
        "els => els.map(e => [e.dataset.share, e.querySelector('li[data-cluster]').dataset.cluster])")]


def _failed_over_rows(page: Any) -> int:
    return int(page.locator(FAILED_OVER).count())


def test_the_console_follows_a_failover(fed: LabFederation, tmp_path: Path) -> None:
    with browser_page(tmp_path) as page:
        page.goto(fed.controller_url + "/console/")
        page.wait_for_selector("svg.graph g.cluster", timeout=15_000)
        clusters = page.locator("svg.graph g.cluster").evaluate_all(
            "els => els.map(e => [e.dataset.cluster, e.dataset.lease])")
        assert sorted(clusters) == [["east", "Live"], ["south", "Live"], ["west", "Live"]]
        assert page.locator("svg.graph g.gateway[data-gateway]").count() == 3
        page.locator("#proxies tr[data-sync=SYNCED]").nth(8).wait_for(timeout=15_000)   # 9 proxies
        assert page.locator("svg.graph .edge.failover").count() == 0
        screenshot(page, tmp_path, "console-steady")
        tiers = _explain(page, "checkout", "east")
        assert tiers[0] == ("100.0", "east"), tiers

        before = _failed_over_rows(page)
        t_start = time.monotonic()
        meshfed("lab", "fault", "kill", "pod", PODS, "--state-dir", str(STATE_DIR))
        t_applied = time.monotonic()
        try:
            page.locator(FAILED_OVER).nth(before).wait_for(timeout=FAILOVER_SHOWN_WITHIN_S * 1000)
            shown, shown_wall_s = time.monotonic(), time.time()
            row = page.locator(FAILED_OVER).first
            recorded_s = float(row.get_attribute("data-at-s") or 0)
            _print(f"FailedOver shown {shown - t_applied:.2f} s after `lab fault kill` returned "
                   f"({shown - t_start:.2f} s after it started; on screen {shown_wall_s - recorded_s:.2f} s "
                   f"after the controller recorded it)")
            cells = row.locator("td").all_inner_texts()
            assert cells[3:5] == ["east", "south"], cells            # from, to
            assert "policies/shop/checkout.yaml" in cells[6] and "DestinationRule shop/checkout" in cells[6]
            page.wait_for_selector(f'svg.graph .edge.failover[data-from=east][data-to=south][data-service="{CHECKOUT}"]',
                                   timeout=5_000)
            page.locator(f'svg.graph .service-edge[data-service="{CHECKOUT}"][data-cluster=east][data-health=down]'
                         ).wait_for(timeout=5_000)
            page.wait_for_selector("#active-failovers li", timeout=5_000)

            tiers = _explain(page, "checkout", "east")
            assert tiers[0] == ("0.0", "east") and ("100.0", "south") in tiers, tiers

            applied = (fed.status() or {}).get("applied") or {}
            row.locator("a.commit").click()
            page.wait_for_selector("#commit-subject", timeout=5_000)
            assert page.inner_text("#commit-subject") == applied.get("subject"), applied
            screenshot(page, tmp_path, "console-failover")
        finally:
            meshfed("lab", "fault", "heal", "pod", PODS, "--state-dir", str(STATE_DIR))
        page.wait_for_selector(f'#timeline tr.event[data-kind=FailedBack][data-service="{CHECKOUT}"]', timeout=30_000)
        page.locator("svg.graph .edge.failover").first.wait_for(state="detached", timeout=10_000)
        assert _errors(page) == []


def test_the_console_shows_a_rejected_commit_and_its_problems(fed: LabFederation, tmp_path: Path) -> None:
    applied = ((fed.status() or {}).get("applied") or {}).get("revision", "")

    def break_it(wt: Path) -> str:
        replace_in(wt / "policies" / "shop" / "checkout.yaml", "maxEjectionPercent", "maxEjectionPercnt")
        return "checkout: <b>typo</b> in maxEjectionPercent"

    sha = fed.push(break_it)
    with browser_page(tmp_path) as page:
        page.goto(fed.controller_url + "/console/")
        page.wait_for_selector("#validation-problems li", timeout=60_000)
        bar = page.inner_text("#revision-bar")
        assert f"last attempted {sha[:8]}" in bar and "REJECTED" in bar and f"applied {applied[:8]}" in bar
        revision = page.inner_text("#panel-revision")
        assert "checkout: <b>typo</b> in maxEjectionPercent" in revision          # shown as text
        problem = page.inner_text("#validation-problems li")
        assert "MF0101" in problem and "policies/shop/checkout.yaml:" in problem and "maxEjectionPercnt" in problem
        assert page.locator("#panel-revision b").count() == 0
        screenshot(page, tmp_path, "console-rejected")
        assert _errors(page) == []
