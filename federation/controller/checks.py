"""`meshfed check`: grouped pass/fail checks over the status document, each failure with its
likely cause and a hint that says what to do. Pure: the status (`queries.assemble_status`) and
`now_s` in, the checks out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ROOT_EXPIRY_WARNING_S = 30 * 86400.0
SERVING_RENEWAL_GRACE_S = 600.0   # the renewal loop checks at least every minute


def build_checks(st: Mapping[str, Any], now_s: float) -> list[dict[str, Any]]:
    """Grouped pass/fail checks, each failure with a cause and a hint (`meshfed check`)."""
    checks: list[dict[str, Any]] = []

    def add(group: str, name: str, ok: bool, cause: str = "", hint: str = "") -> None:
        checks.append({"group": group, "check": name, "ok": ok, "cause": "" if ok else cause,
                       "hint": "" if ok else hint})

    desired = st.get("desired") or {}
    add("fleet", "last revision applied", bool(desired) and desired.get("ok", False) is True,
        f"revision {str(desired.get('revision', ''))[:8]} failed: " + "; ".join(
            f"[{p.get('code')}] {p.get('message')}" for p in st.get("problems", [])[:3]),
        "run `meshfed validate` on the fleet repo and push a fix; proxies keep the last applied revision")
    git = st.get("git") or {}
    add("fleet", "repository reachable", not git.get("last_error"), str(git.get("last_error")),
        "check --repo/--branch and credentials")
    for name, c in sorted((st.get("clusters") or {}).items()):
        add("clusters", f"{name} lease", bool(c.get("up")), c.get("last_error") or "no successful watch within the lease",
            f"check that the API server of {name} (context {c.get('context')}) is reachable")
    proxies = st.get("proxies") or []
    stale = [p for p in proxies if p.get("sync") != "SYNCED"]
    add("proxies", "all proxies synced", not stale,
        f"{len(stale)} of {len(proxies)} not synced: " + ", ".join(
            f"{p['proxy']} {p['sync']}{' (' + p['last_nack'] + ')' if p.get('last_nack') else ''}" for p in stale[:5]),
        "a NACK names the rejected resource; NOT SENT means the proxy never connected (check its controller address)")
    cs = st.get("config_server") or {}
    add("controller", "no split brain", not cs.get("stale_epoch_refusals"),
        f"{cs.get('stale_epoch_refusals')} proxies follow a newer controller epoch",
        "another controller with a newer epoch is running: stop this one")
    serving = cs.get("serving_certificate") or {}
    if serving:
        left_s = float(serving["not_after_s"]) - now_s
        overdue_s = now_s - float(serving["renew_at_s"])
        add("controller", "serving certificates renewed in time", left_s > 0 and overdue_s < SERVING_RENEWAL_GRACE_S,
            f"they expire in {left_s:.0f} s and were due for renewal {overdue_s:.0f} s ago "
            f"({serving.get('last_renewal') or 'no renewal attempted'})",
            "the CA of a trust domain cannot sign (check `meshfed trust --controller` and the controller's log)")
    for r in st.get("trust") or []:
        left_s = float(r["not_after_s"]) - now_s
        add("trust", f"{r['trust_domain']} root {r['root'][:40]} valid > 30 days", left_s > ROOT_EXPIRY_WARNING_S,
            f"expires in {left_s / 86400:.1f} days", "publish a new root and rotate (see TrustDomain spec.ca.roots)")
    return checks
