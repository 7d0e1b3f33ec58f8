"""Operators' queries shaped from live objects (services, endpoints, explain, the status document)
and the checks `meshfed check` runs over that document, with `now_s` passed in."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.simproxy import make_config
from federation.controller import queries
from federation.controller.checks import ROOT_EXPIRY_WARNING_S, build_checks
from tests.unit.core.factory import endpoint, fleet, observation

CONFIGS = {"ztunnel/a/n1": make_config("ztunnel/a/n1", "rev1", services=2, cluster="a"),
           "ztunnel/b/n1": make_config("ztunnel/b/n1", "rev1", services=1, cluster="b"),
           "gateway/a": make_config("gateway/a", "rev1", cluster="a")}


def test_services_count_endpoints_per_cluster() -> None:
    obs = {"east": observation("east", [endpoint("shop", "checkout", "c1", "10.1.0.1", "n1"),
                                        endpoint("shop", "checkout", "c2", "10.1.0.2", "n1", ready=False)]),
           "west": observation("west", [endpoint("shop", "cart", "k1", "10.2.0.1", "n1")])}
    out = {s["service"]: s for s in queries.services(fleet(), obs)}
    assert out["shop/checkout"]["clusters"] == {"east": {"endpoints": 2, "ready": 1}}
    assert out["shop/cart"]["clusters"] == {"west": {"endpoints": 1, "ready": 1}}
    assert out["shop/checkout"]["policy_source"].startswith("policies/shop/checkout.yaml")
    assert queries.services(None, obs) == []


@pytest.mark.parametrize("name", ["svc1.ns1.svc.clusterset.local", "ns1/svc1", "svc1.ns1", "svc1"])
def test_endpoints_as_the_first_node_proxy_of_a_cluster_sees_them(name: str) -> None:
    out = queries.endpoints(CONFIGS, name, "a")
    assert out["service"] == "svc1.ns1.svc.clusterset.local" and out["viewer"] == "ztunnel/a/n1"
    assert [e["workload"] for e in out["endpoints"]] == ["a/ns1/pod-0", "a/ns1/pod-1"]


def test_endpoints_errors_name_what_is_missing() -> None:
    assert "no node proxy rendered for cluster 'c'" in queries.endpoints(CONFIGS, "svc0", "c")["error"]
    assert "not in the config of ztunnel/b/n1" in queries.endpoints(CONFIGS, "ns1/svc1", "b")["error"]


def test_explain_shows_the_quorum_ejection_from_the_engine_itself() -> None:
    """No patching after the fact: the vote's verdict is an input of the engine, and explain reads it."""
    from federation.core.failover import build_engine
    from federation.core.offline import offline_observations
    from tests.unit.core import factory as f

    snap = f.fleet()
    engine = build_engine(snap, offline_observations(snap))
    host = "checkout.shop.svc.clusterset.local"
    victim = next(ep.uid for ep in engine.graph.endpoints_in(f.CHECKOUT, "east").values())
    engine.apply_health_verdict({(host, victim)}, 10.0, {(host, victim): "health reports: 3 of 3 proxies eject it"})
    data = queries.explain(engine, host, "east", None)
    eps = {e["uid"]: e for tier in data["tiers"] for g in tier["groups"] for e in g["endpoints"]}
    assert data["live"] is True and "globally_ejected" not in data
    assert eps[victim]["ejected"] is True and eps[victim]["reason"] == "HealthReportQuorum"
    assert eps[victim]["healthy"] is False
    assert all(e["healthy"] for uid, e in eps.items() if uid != victim and e.get("ready", True))


def test_explain_before_the_first_render_and_on_a_bad_question(monkeypatch: pytest.MonkeyPatch) -> None:
    import federation.core.explain as core_explain

    assert queries.explain(None, "x", "a", None)["usage"] is False

    def refuse(*_a: Any) -> Any:
        raise core_explain.ExplainError("no service x")

    monkeypatch.setattr(core_explain, "explain_service", refuse)
    assert queries.explain(object(), "x", "a", None) == {"error": "no service x", "usage": True}


def test_the_status_document_joins_the_parts() -> None:
    rec = {"fleet_clusters": {"east": {}, "west": {}}, "applied": {"revision": "abc"},
           "clusters": {"east": {"endpoints": 4}}, "desired": {"revision": "abc", "ok": True}}
    cs = {"epoch": 3, "port": 15010, "bootstrap_port": 0, "proxies": [{"proxy": "p", "sync": "SYNCED"}]}
    agents = {"east": {"up": True, "lease_remaining_s": 9.0, "context": "lab-east", "ignored": 1}}
    st = queries.assemble_status(rec, cs, agents, {"repo": "r"}, state_dir="/s", failover_events=2, trust=[],
                                 now_s=100.0, state_node="node-a")
    assert st["controller"] == {"epoch": 3, "config_port": 15010, "bootstrap_port": 0, "state_dir": "/s",
                                "state_node": "node-a", "lock": None, "state": {}}
    assert st["clusters"]["east"] == {"endpoints": 4, "up": True, "lease_remaining_s": 9.0, "last_error": None,
                                      "api": None, "context": "lab-east", "applied_revision": "abc",
                                      "draining": False}
    assert st["clusters"]["west"]["up"] is None and "proxies" not in st["config_server"]
    assert st["proxies"] == cs["proxies"] and st["failover_events"] == 2 and st["at_s"] == 100.0


def test_the_status_shows_each_agent_channel_next_to_the_reconciler_view() -> None:
    """East's agent sees 2 ready endpoints and has a send stuck for 40 s; the reconciler applied 0."""
    rec = {"fleet_clusters": {"east": {}}, "clusters": {"east": {"endpoints": 2, "ready_endpoints": 0}}}
    agents = {"east": {"up": True, "observed_ready_endpoints": 2, "observations_sent": 7, "last_sent_s": 50.0,
                       "send_in_flight_s": 40.0, "observation_pending": True}}
    st = queries.assemble_status(rec, {}, agents, {}, state_dir="/s", failover_events=0, trust=[], now_s=100.0)
    east = st["clusters"]["east"]
    assert east["ready_endpoints"] == 0 and east["agent"] == {
        "observed_ready_endpoints": 2, "observations_sent": 7, "last_sent_s": 50.0, "send_in_flight_s": 40.0,
        "observation_pending": True}


@pytest.mark.parametrize(("left_s", "ok"), [(ROOT_EXPIRY_WARNING_S + 60, True), (ROOT_EXPIRY_WARNING_S - 60, False)])
def test_a_root_close_to_expiry_fails_its_check(left_s: float, ok: bool) -> None:
    now = 1_000_000.0
    st = {"trust": [{"trust_domain": "east.mesh.local", "root": "CN=root-1", "not_after_s": now + left_s}]}
    (check,) = [c for c in build_checks(st, now) if c["group"] == "trust"]
    assert check["ok"] is ok
    assert (check["hint"] == "") is ok and ("expires in" in check["cause"]) is not ok


def test_checks_name_the_unsynced_proxies_and_split_brain() -> None:
    st = {"proxies": [{"proxy": "ztunnel/a/n1", "sync": "STALE", "last_nack": "bad route"},
                      {"proxy": "ztunnel/a/n2", "sync": "SYNCED"}],
          "config_server": {"stale_epoch_refusals": 2}}
    checks = {c["check"]: c for c in build_checks(st, 0.0)}
    assert "1 of 2 not synced: ztunnel/a/n1 STALE (bad route)" in checks["all proxies synced"]["cause"]
    assert not checks["no split brain"]["ok"] and "stop this one" in checks["no split brain"]["hint"]


@pytest.mark.parametrize(("now_s", "ok"), [(1000.0, True), (1599.0, True), (1700.0, False), (2100.0, False)])
def test_meshfed_check_reports_a_serving_certificate_that_is_not_being_renewed(now_s: float, ok: bool) -> None:
    st = {"config_server": {"serving_certificate": {"not_after_s": 2000.0, "renew_at_s": 1000.0,
                                                    "last_renewal": "failed: CaError: expired"}}}
    (check,) = [c for c in build_checks(st, now_s) if c["check"] == "serving certificates renewed in time"]
    assert check["ok"] is ok
    assert ok or "failed: CaError" in check["cause"]


@pytest.mark.parametrize(("listen", "loopback"), [
    ("127.0.0.1:15010", True), ("127.9.9.9:1", True), ("[::1]:15010", True), ("localhost:15010", True),
    ("localhost.evil.com:15010", False), ("127.example.com:1", False), ("0.0.0.0:15010", False), ("10.0.0.1:1", False),
])
def test_insecure_mode_only_on_literal_loopback(listen: str, loopback: bool) -> None:
    from federation.cli.ops import is_loopback_listen

    assert is_loopback_listen(listen) is loopback


# main's controller checks (issue 11 part B) in their passing state: the lock held, a live loop
LOCKED = {"controller": {"state_dir": "/var/lib/meshfed", "lock": {"pid": 7, "host": "ctl-0"}},
          "reconciler": {"loop": {"alive": True, "last_step_at_s": 0.0, "failures_total": 0}}}


def test_a_rejected_commit_fails_one_check_not_reachability() -> None:
    """Issue 15: a rejected commit was reported twice, once as "repository reachable: FAIL" with the
    validation error as its cause although the repository had been read."""
    st = {**LOCKED, "desired": {"revision": "0123456789abcdef", "ok": False},
          "problems": [{"code": "MF0101", "message": "unknown field spec.bogus"}],
          "git": {"last_error": "1 error(s) in revision 01234567", "fetch_error": ""}}
    checks = {c["check"]: c for c in build_checks(st, 0.0)}
    assert checks["repository reachable"]["ok"] is True and checks["repository reachable"]["cause"] == ""
    applied = checks["last revision applied"]
    assert applied["ok"] is False and "[MF0101] unknown field spec.bogus" in applied["cause"]
    assert [c["check"] for c in build_checks(st, 0.0) if not c["ok"]] == ["last revision applied"]


def test_an_unreachable_repository_fails_reachability_once() -> None:
    st = {**LOCKED, "desired": {"revision": "0123456789abcdef", "ok": False},
          "problems": [{"code": "MF-GIT", "message": "fatal: could not read from remote repository"}],
          "git": {"last_error": "fatal: could not read from remote repository",
                  "fetch_error": "fatal: could not read from remote repository"}}
    failed = [c for c in build_checks(st, 0.0) if not c["ok"]]
    assert [c["check"] for c in failed] == ["repository reachable"]
    assert "could not read" in failed[0]["cause"] and "proxies keep the last applied revision" in failed[0]["hint"]


def test_revisions_carry_the_problems_of_a_rejected_commit() -> None:
    from federation.controller.store import RevisionRecord

    rows = queries.revisions([RevisionRecord("b" * 40, "break cart", 2.0, "failed", ({"code": "MF0101"},)),
                              RevisionRecord("a" * 40, "canary", 1.0, "applied", ())])
    assert rows == [{"revision": "b" * 40, "subject": "break cart", "attempted_at_s": 2.0, "ok": False,
                     "problems": [{"code": "MF0101"}]},
                    {"revision": "a" * 40, "subject": "canary", "attempted_at_s": 1.0, "ok": True, "problems": []}]


def _proxy(pid: str, issued_s: float, not_after_s: float) -> dict[str, Any]:
    return {"proxy": pid, "sync": "SYNCED", "certificate": {
        "identity": f"spiffe://east.mesh.local/ns/meshfed-system/sa/{pid.split('/')[-1]}", "issued_at_s": issued_s,
        "not_after_s": not_after_s, "identities": 1, "missing": 0}}


def test_meshfed_check_reports_proxy_certificates_expired_or_near_expiry() -> None:
    """Per proxy, the certificate issued to it that expires first: renewed at half-life, so one
    past three quarters of its life missed its renewal (near expiry), and one past its not-after
    fails closed; the passing line names the first to expire."""
    day = 86400.0
    st: dict[str, Any] = {"proxies": [_proxy("ztunnel/east/node-1", 0.0, day), _proxy("gateway/east", 0.0, 2 * day)]}
    (ok,) = [c for c in build_checks(st, 0.4 * day) if c["check"].startswith("proxy certificates")]
    assert ok["ok"] and "first to expire: ztunnel/east/node-1, not after 1970-01-02T00:00:00Z" in ok["check"]
    (near,) = [c for c in build_checks(st, 0.8 * day) if c["check"].startswith("proxy certificates")]
    assert not near["ok"] and near["cause"].startswith("of 2 proxies, 0 hold an expired certificate and 1 one near expiry")
    assert "ztunnel/east/node-1 (spiffe://east.mesh.local/ns/meshfed-system/sa/node-1) expires in 17280 s" in near["cause"]
    assert "bootstrap credential" in near["hint"] and "renewal_failed" in near["hint"]
    (gone,) = [c for c in build_checks(st, 1.6 * day) if c["check"].startswith("proxy certificates")]
    assert gone["cause"].startswith("of 2 proxies, 1 hold an expired certificate and 1 one near expiry")
    assert "ztunnel/east/node-1 (spiffe://east.mesh.local/ns/meshfed-system/sa/node-1) expired 51840 s ago" in gone["cause"]


def test_meshfed_check_judges_the_loop_on_the_elapsed_clock_and_certificates_on_the_calendar() -> None:
    """Under a simulated calendar (the soak) the calendar runs days ahead of the clock the
    reconcile loop stamps its steps with: a loop that stepped a second ago is running."""
    st = {"reconciler": {"loop": {"alive": True, "last_step_at_s": 1000.0}},
          "config_server": {"serving_certificate": {"not_after_s": 1000.0 + 20 * 86400, "renew_at_s": 1000.0 + 10 * 86400}}}
    checks = {c["check"]: c for c in build_checks(st, 1000.0 + 9 * 86400, elapsed_now_s=1001.0)}
    assert checks["reconcile loop running"]["ok"] and checks["serving certificates renewed in time"]["ok"]
