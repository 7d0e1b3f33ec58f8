"""`meshfed check`: grouped pass/fail checks over the status document, each failure with its
likely cause and a hint that says what to do. Pure: the status (`queries.assemble_status`) and
two nows in, the checks out: `now_s` the calendar (certificate and root expiry,
`ztunnel.api.clock`), `elapsed_now_s` the scale the reconcile loop stamps its steps and drains on
(the elapsed clock on the wall scale; the same as `now_s` unless the calendar is simulated).

Certificate expiry is checked for the controller (its serving certificates, renewed at half-life)
and for every proxy: the certificate issued to it that expires first, among the identities it
needs now (`signing.ProxyCertificates`). Proxies renew at half-life (± jitter), so one that is
past `PROXY_RENEWAL_OVERDUE_FRACTION` of its certificate's life has missed its renewal: it is
flagged near expiry before it fails closed, and expired after.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

ROOT_EXPIRY_WARNING_S = 30 * 86400.0
SERVING_RENEWAL_GRACE_S = 600.0   # the renewal loop checks at least every minute
ORPHAN_GRACE_S = 60.0   # a fresh state directory no proxy has acknowledged for this long looks like a lost one
LOOP_STALL_S = 30.0     # the reconcile loop completes a step at least every 0.5 s when healthy
PROXY_RENEWAL_OVERDUE_FRACTION = 0.75   # renewal is due at 0.5 ± 0.1 of the life (ztunnel's certmanager)
PROXY_CERT_EXAMPLES = 5


def build_checks(st: Mapping[str, Any], now_s: float, elapsed_now_s: float | None = None) -> list[dict[str, Any]]:
    """Grouped pass/fail checks, each failure with a cause and a hint (`meshfed check`)."""
    checks: list[dict[str, Any]] = []
    elapsed_now = now_s if elapsed_now_s is None else elapsed_now_s

    def add(group: str, name: str, ok: bool, cause: str = "", hint: str = "") -> None:
        checks.append({"group": group, "check": name, "ok": ok, "cause": "" if ok else cause,
                       "hint": "" if ok else hint})

    ctl = st.get("controller") or {}
    lock = ctl.get("lock")
    if lock:
        add("controller", f"state directory {ctl.get('state_dir', '')} locked by this controller (pid {lock.get('pid')} "
            f"on host {lock.get('host')})", True)
    else:
        add("controller", "state directory locked by this controller", False,
            f"the state owner holds no lock on {ctl.get('state_dir', '')}",
            "another controller could start on the same state directory; restart this one")
    state = ctl.get("state") or {}
    rec = st.get("reconciler") or {}
    age_s = elapsed_now - float(state.get("created_at_s") or elapsed_now)   # a history stamp (wall clock)
    add("state", "proxies have connected to this controller's state",
        not (state.get("fresh") and not state.get("ever_acked") and rec.get("proxies_rendered")
             and age_s >= ORPHAN_GRACE_S),
        f"no proxy has acknowledged a config in the {age_s / 60:.0f} minutes since this controller found its state "
        f"directory empty and created new CA roots: a fleet that ran before cannot verify this controller",
        str(state.get("message", "")))
    add("state", "proxies follow this controller's state", not state.get("foreign_epoch_proxies"),
        f"{state.get('foreign_epoch_proxies')} proxies (e.g. {', '.join(state.get('foreign_epoch_examples') or [])}) "
        f"ran a config of an epoch older than this state's first ({state.get('first_epoch')}): they followed a "
        f"controller whose state directory this one does not have",
        "if that state directory was lost, restore its latest backup (`meshfed controller restore`) so that "
        "certificates and credentials stay valid; the proxies re-sync with this controller either way")
    # One failure, one check: a rejected commit fails "last revision applied" (the repository was
    # read, so it is reachable); a repository that cannot be read fails "repository reachable" (and
    # the failed attempt it records, problem MF-GIT, is not reported a second time).
    desired = st.get("desired") or {}
    git = st.get("git") or {}
    fetch_error = str(git.get("fetch_error") or "")
    problems = list(st.get("problems") or [])
    only_unreachable = bool(fetch_error) and bool(problems) and all(p.get("code") == "MF-GIT" for p in problems)
    add("fleet", "last revision applied",
        bool(desired) and (desired.get("ok", False) is True or only_unreachable),
        f"revision {str(desired.get('revision', ''))[:8]} failed: " + "; ".join(
            f"[{p.get('code')}] {p.get('message')}" for p in problems[:3]),
        "run `meshfed validate` on the fleet repo and push a fix; proxies keep the last applied revision")
    applying = st.get("applying") or {}
    add("fleet", "rendered revision acknowledged by the proxies", not applying.get("overdue"),
        f"revision {str(applying.get('revision', ''))[:8]} is still applying after {applying.get('timeout_s')} s: "
        f"pending {', '.join(applying.get('pending') or []) or '-'}; NACKed by "
        f"{', '.join(applying.get('nacked') or []) or '-'}",
        "a proxy that does not answer is retried with backoff; a NACK names what the proxy refused (`meshfed "
        "status -o wide`). Until the quorum ACKs, the applied revision (and the CA rotation gate) stays where it is")
    waiting = st.get("waiting") or {}
    if waiting:
        add("fleet", "no commit waiting", False,
            f"revision {str(waiting.get('revision', ''))[:8]} waits for {str(waiting.get('behind', ''))[:8]} to be "
            "applied: its CA root rotation is safe only after that stage reached the proxies",
            "nothing to do unless the revision ahead stays unacknowledged (see the check above)")
    loop = rec.get("loop")
    if loop is not None:
        last_s = loop.get("last_step_at_s") or loop.get("started_at_s")
        idle_s = elapsed_now - float(last_s) if last_s is not None else 0.0
        add("controller", "reconcile loop running", bool(loop.get("alive")) and idle_s < LOOP_STALL_S,
            (f"the reconcile loop has not completed a step for {idle_s:.0f} s" if loop.get("alive")
             else "the reconcile loop's thread is not running")
            + f" ({loop.get('failures_total', 0)} failed steps; last: {loop.get('last_error') or '-'})",
            "proxies keep their configs but no change reaches them; the reconciler's log has the failing "
            "step's traceback; restart the controller if it does not recover")
    delivery = rec.get("delivery") or {}
    add("controller", "configs delivered to the config service", not (rec.get("undelivered") and delivery.get("failures")),
        f"{rec.get('undelivered')} proxies' configs not delivered after {delivery.get('failures')} attempts: "
        f"{delivery.get('last_error')}",
        "the config service (state owner) is restarting or failing; the reconciler retries with backoff")
    add("fleet", "repository reachable", not fetch_error, fetch_error,
        "check --repo/--branch, the network path to the Git server and credentials; proxies keep the last "
        "applied revision")
    for name, c in sorted((st.get("clusters") or {}).items()):
        add("clusters", f"{name} lease", bool(c.get("up")), c.get("last_error") or "no successful watch within the lease",
            f"check that the API server of {name} (context {c.get('context')}) is reachable")
    for d in st.get("draining") or []:
        left = (f"removed {max(0.0, float(d['withdrawn_at_s']) + float(d['grace_s']) - elapsed_now):.0f} s from now"
                if d.get("withdrawn_at_s") is not None else "removed once the proxies ACK the revision without it")
        add("clusters", f"{d['cluster']} draining (removed by {str(d.get('revision', ''))[:8]}; {left})", True)
    proxies = st.get("proxies") or []
    stale = [p for p in proxies if p.get("sync") != "SYNCED"]
    add("proxies", "all proxies synced", not stale,
        f"{len(stale)} of {len(proxies)} not synced: " + ", ".join(
            f"{p['proxy']} {p['sync']}{' (' + p['last_nack'] + ')' if p.get('last_nack') else ''}" for p in stale[:5]),
        "a NACK names the rejected resource; NOT SENT means the proxy never connected (check its controller address)")
    checks.append(proxy_certificates_check(proxies, now_s))
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


def _iso(ts_s: float) -> str:
    return datetime.fromtimestamp(ts_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def proxy_certificate_verdict(cert: Mapping[str, Any], now_s: float) -> str:
    """"" when a proxy's first-expiring certificate is fine at `now_s`, else what is wrong."""
    issued, not_after = float(cert["issued_at_s"]), float(cert["not_after_s"])
    if now_s >= not_after:
        return f"expired {now_s - not_after:.0f} s ago (not after {_iso(not_after)})"
    if now_s >= issued + (not_after - issued) * PROXY_RENEWAL_OVERDUE_FRACTION:
        return (f"expires in {not_after - now_s:.0f} s (not after {_iso(not_after)}) and was due for renewal at "
                f"half-life")
    return ""


def proxy_certificates_check(proxies: Sequence[Mapping[str, Any]], now_s: float) -> dict[str, Any]:
    """One check over every proxy's certificate expiry: the passing line names the earliest
    not-after (and whose), a failing one the proxies expired or near expiry."""
    held = [(p["proxy"], p["certificate"]) for p in proxies if p.get("certificate")]
    bad = [(pid, c, why) for pid, c in held if (why := proxy_certificate_verdict(c, now_s))]
    if not bad:
        first = min(held, key=lambda h: float(h[1]["not_after_s"]), default=None)
        name = "proxy certificates valid and renewed in time" + (
            f" (first to expire: {first[0]}, not after {_iso(float(first[1]['not_after_s']))})" if first else "")
        return {"group": "proxies", "check": name, "ok": True, "cause": "", "hint": ""}
    expired = sum(1 for _pid, c, _why in bad if now_s >= float(c["not_after_s"]))
    shown = "; ".join(f"{pid} ({c['identity']}) {why}" for pid, c, why in bad[:PROXY_CERT_EXAMPLES])
    more = f"; and {len(bad) - PROXY_CERT_EXAMPLES} more" if len(bad) > PROXY_CERT_EXAMPLES else ""
    return {"group": "proxies", "check": "proxy certificates valid and renewed in time", "ok": False,
            "cause": f"of {len(held)} proxies, {expired} hold an expired certificate and {len(bad) - expired} one "
                     f"near expiry: {shown}{more}",
            "hint": "a proxy renews at half-life over its connection to the controller: check that it is connected "
                    "(`meshfed status -o wide`) and its log (renewal_failed); a proxy whose certificate expired "
                    "refuses its workloads' connections (fail closed) until it obtains a new one with its bootstrap "
                    "credential (its pod's ServiceAccount token, or `meshfed controller bootstrap-token`)"}
