"""The config service (the state owner) as a plain class: epoch fencing, deltas from the
reconciler, ACK/NACK records batched into the store, credentials written at CA load, status."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import pytest

from benchmarks.simproxy import make_config
from federation.controller.bootstrap import BOOTSTRAP_TOKENS_FILE
from federation.controller.config_service import (
    CONTROLLER_ROOTS_FILE,
    RECENT_ACK_LATENCIES,
    TRUST_ANCHORS_DIR,
    ConfigService,
)
from federation.controller.distributor import AckEvent
from federation.controller.store import Store
from federation.controller.wire import REMOVE_NONCE, encode_config_deltas, pack
from tests.unit.core.factory import fleet
from ztunnel.api.codec import header_to_pb
from ztunnel.api.config import ProxyConfig, Stamp
from ztunnel.api.proto import meshfed_pb2 as pb

P1, P2, P3 = "ztunnel/a/n1", "ztunnel/a/n2", "ztunnel/a/n3"


def ack(pid: str, version: int, nack: str = "", epoch: int = 1) -> AckEvent:
    return AckEvent(pid, Stamp(epoch, f"rev{version}", version), bool(nack), nack, 0.01, 0.02)


def test_every_service_on_a_state_dir_gets_a_newer_epoch(tmp_path: Path) -> None:
    first = ConfigService(tmp_path)
    second = ConfigService(tmp_path)
    assert second.epoch > first.epoch and second.dist.epoch == second.epoch


def content(cfg: ProxyConfig | None) -> tuple[str, dict[str, object]] | None:
    return None if cfg is None else (cfg.stamp.revision, {s.hostname: s for s in cfg.services})


def desired(svc: ConfigService, pid: str) -> tuple[str, dict[str, object]] | None:
    return content(svc.dist.sessions[pid].desired)


def test_deltas_apply_and_an_unknown_base_asks_for_a_resync(tmp_path: Path) -> None:
    svc = ConfigService(tmp_path)
    # rendered configs carry the renderer's per-proxy version (a delta's base; 0 would mean a full state)
    v1 = replace(make_config(P1, "rev1", services=2), stamp=Stamp(1, "rev1", 1))
    v2 = replace(make_config(P1, "rev2", services=3), stamp=Stamp(1, "rev2", 2))
    assert svc.apply_deltas(encode_config_deltas([(None, v1)])) == "ok"
    assert desired(svc, P1) == content(v1)
    assert svc.apply_deltas(encode_config_deltas([(v1, v2)])) == "ok"
    assert desired(svc, P1) == content(v2)
    # a restarted service holds nothing: a delta on a base it lacks cannot apply
    fresh = ConfigService(tmp_path)
    assert fresh.apply_deltas(encode_config_deltas([(v1, v2)])) == "resync"
    assert P1 not in fresh.dist.sessions
    assert fresh.apply_deltas(encode_config_deltas([(None, v2)])) == "ok"


def test_a_removal_forgets_a_disconnected_proxy(tmp_path: Path) -> None:
    svc = ConfigService(tmp_path)
    svc.apply_deltas(encode_config_deltas([(None, make_config(P1, "rev1"))]))
    removal = pb.ConfigResponse(nonce=REMOVE_NONCE, base_version=0, proxy=header_to_pb(make_config(P1, "rev1")))
    assert svc.apply_deltas(pack([removal.SerializeToString()])) == "ok"
    assert P1 not in svc.dist.sessions


def test_acks_are_batched_latest_per_proxy_and_nacks_keep_their_order(tmp_path: Path) -> None:
    svc = ConfigService(tmp_path)
    for v in range(1, 1001):                 # a fast proxy: one pending record, not a thousand
        svc.on_ack(ack(P1, v))
    svc.on_ack(ack(P2, 1, nack="bad service"))
    svc.on_ack(ack(P2, 2))                   # an ACK after a NACK clears it
    svc.on_ack(ack(P3, 1))
    svc.on_ack(ack(P3, 2, nack="bad route"))  # a NACK after an ACK shows
    assert len(svc._acks) == 3 and len(svc._nacks) == 2
    assert len(svc.recent_latencies_s) == RECENT_ACK_LATENCIES
    svc.flush()
    acks = svc.store.proxy_acks()
    assert acks[P1]["version"] == 1000 and acks[P1]["last_nack"] == ""
    assert acks[P2]["version"] == 2 and acks[P2]["last_nack"] == ""
    assert acks[P3]["version"] == 1 and acks[P3]["last_nack"] == "bad route"
    assert svc._acks == {} and svc._nacks == {}


class FlakyStore(Store):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.fail_next = False

    def record_acks(self, acks: Any, at_s: float | None = None) -> None:
        if self.fail_next:
            self.fail_next = False
            raise OSError("disk full")
        super().record_acks(acks, at_s)


def test_a_failed_flush_is_counted_and_retried_with_the_next_batch(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path / "controller.sqlite")
    svc = ConfigService(tmp_path, store=store)
    svc.on_ack(ack(P1, 1))
    store.fail_next = True
    svc.flush()
    assert svc.flush_failures == 1 and "disk full" in svc.last_flush_error
    assert store.proxy_acks() == {}
    svc.on_ack(ack(P2, 1))
    svc.flush()
    assert set(store.proxy_acks()) == {P1, P2}
    st = svc.status({})
    assert st["ack_flush_failures"] == 1 and "disk full" in st["last_ack_flush_error"]


def test_loading_cas_writes_the_controller_roots_and_no_shared_bootstrap_secret(tmp_path: Path) -> None:
    svc = ConfigService(tmp_path, insecure=False)
    roots = svc.ensure_cas(fleet())
    assert set(roots) == {"east.mesh.local", "west.mesh.local", "south.mesh.local"}
    assert (tmp_path / CONTROLLER_ROOTS_FILE).read_bytes() == svc.signing.roots_pem()
    # each trust domain's roots apart: what its proxies verify the controller with, and only that
    for td, ca in svc.signing.cas.items():
        assert (tmp_path / TRUST_ANCHORS_DIR / f"{td}.pem").read_bytes() == ca.roots_pem()
    # no token per cluster any more: proxies bootstrap with their own ServiceAccount token
    tokens = tmp_path / BOOTSTRAP_TOKENS_FILE
    assert not tokens.exists() or json.loads(tokens.read_text())["tokens"] == {}
    made = svc.bootstrap.create("ztunnel/east/node-1")  # a hand-provisioned proxy's, on demand
    assert stat.S_IMODE(os.lstat(tokens).st_mode) == 0o600
    assert svc.authenticate_bootstrap("ztunnel/east/node-1", "", made).ok
    assert not svc.authenticate_bootstrap("ztunnel/east/node-2", "", made).ok


def jwt(payload: str) -> str:
    return f"h.{payload}.s"


class FakeReviewer:
    """A cluster's TokenReview: a token `<cluster>:<sa>@<node>` is accepted by that cluster only."""

    made: ClassVar[list[tuple[str, str | None, str]]] = []
    reviewed: ClassVar[int] = 0

    def __init__(self, cluster: str, kubeconfig: str | None, context: str) -> None:
        self.cluster = cluster
        FakeReviewer.made.append((cluster, kubeconfig, context))

    def review(self, token: str, audiences: list[str]) -> Any:
        from clusters.kube.auth import TokenReviewResult
        from clusters.kube.discovery import DiscoveryError

        assert audiences == ["meshfed-controller"]
        FakeReviewer.reviewed += 1
        token = token.split(".")[1]   # what the fake "JWT" carries: "<cluster>:<sa>@<node>"
        if token == "api-down":
            raise DiscoveryError(f"cluster {self.cluster}: connection refused")
        who, _, node = token.partition("@")   # "<cluster>:<sa>@<node>": a token only its own cluster accepts
        cluster, _, sa = who.partition(":")
        if cluster != self.cluster:
            return TokenReviewResult(False, error="invalid signature")
        extra = {"authentication.kubernetes.io/pod-name": (f"{sa}-x",),
                 **({"authentication.kubernetes.io/node-name": (node,)} if node else {})}
        return TokenReviewResult(True, f"system:serviceaccount:meshfed-system:{sa}", extra=extra,
                                 audiences=("meshfed-controller",))


@pytest.mark.parametrize(("proxy_id", "token", "code"), [
    ("ztunnel/east/node-1", "east:ztunnel@node-1", ""),
    ("gateway/east", "east:eastwest-gateway", ""),
    # reviewed by the proxy's own cluster only: west's API server does not know east's token
    ("ztunnel/west/node-1", "east:ztunnel@node-1", "unauthenticated"),
    # the node claim must be the proxy id's node: node-1's pod cannot bootstrap as node-2's proxy
    ("ztunnel/east/node-2", "east:ztunnel@node-1", "permission_denied"),
    # the proxy's own service account: a gateway's token is not a node proxy's, a workload's neither
    ("ztunnel/east/node-1", "east:eastwest-gateway@node-1", "permission_denied"),
    ("gateway/east", "east:checkout@node-1", "permission_denied"),
    ("ztunnel/north/node-1", "north:ztunnel@node-1", "permission_denied"),   # not in the fleet
    ("ztunnel/east/node-1", "api-down", "unavailable"),                      # ask again later
])
def test_service_account_tokens_are_reviewed_by_the_proxys_own_cluster(tmp_path: Path, proxy_id: str, token: str,
                                                                       code: str) -> None:
    svc = ConfigService(tmp_path, kubeconfig="/kc", token_reviewer=FakeReviewer)
    svc.ensure_cas(fleet())
    verdict = svc.authenticate_bootstrap(proxy_id, jwt(token), "")
    assert verdict.code == code, verdict.reason
    assert verdict.credential == "service account token"


def test_one_token_reviewer_per_cluster_from_its_api_spec(tmp_path: Path) -> None:
    FakeReviewer.made.clear()
    svc = ConfigService(tmp_path, kubeconfig="/kc", token_reviewer=FakeReviewer)
    svc.ensure_cas(fleet())
    for _ in range(3):
        svc.authenticate_bootstrap("ztunnel/east/node-1", jwt("east:ztunnel@node-1"), "")
    svc.authenticate_bootstrap("ztunnel/west/node-1", jwt("west:ztunnel@node-1"), "")
    assert FakeReviewer.made == [("east", "/kc", "lab-east"), ("west", "/kc", "lab-west")]


def test_what_is_not_shaped_like_a_service_account_token_never_reaches_the_api_server(tmp_path: Path) -> None:
    svc = ConfigService(tmp_path, kubeconfig="/kc", token_reviewer=FakeReviewer)
    svc.ensure_cas(fleet())
    before = FakeReviewer.reviewed
    for junk in ("east:ztunnel@node-1", "a.b", "x." * 9000 + "y"):
        assert svc.authenticate_bootstrap("ztunnel/east/node-1", junk, "").code == "unauthenticated"
    assert FakeReviewer.reviewed == before


def test_no_credential_at_all_is_unauthenticated_with_the_fix(tmp_path: Path) -> None:
    svc = ConfigService(tmp_path, token_reviewer=FakeReviewer)
    svc.ensure_cas(fleet())
    v = svc.authenticate_bootstrap("ztunnel/east/node-1", "", "")
    assert v.code == "unauthenticated" and "ServiceAccount token" in v.reason


class Clock:
    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def test_the_serving_certificates_renew_at_half_life_by_the_injected_clock(tmp_path: Path) -> None:
    """Before: one certificate minted at start with the workload TTL and never renewed."""
    import time

    clock = Clock(time.time())
    svc = ConfigService(tmp_path, clock=clock)
    svc.ensure_cas(fleet())
    first = svc.signing.serving()
    ttl_s = first.not_after_s - first.issued_at_s
    assert ttl_s == pytest.approx(24 * 3600, abs=5)
    assert len(first.pairs) == 3 and first.identities == tuple(
        f"spiffe://{td}/ns/meshfed-system/sa/meshfed-controller" for td in sorted(svc.signing.cas))
    clock.now_s += 0.49 * ttl_s
    assert svc.renew_serving_certificates() == "" and svc.signing.serving() is first
    clock.now_s += 0.02 * ttl_s                      # past half of its life
    assert "half of its life" in svc.renew_serving_certificates()
    second = svc.signing.serving()
    assert second.generation == first.generation + 1 and second.pairs != first.pairs
    assert second.not_after_s == pytest.approx(clock.now_s + ttl_s, abs=5)
    st = svc.status({})["serving_certificate"]
    assert st["renewals"] == 1 and st["not_after_s"] == second.not_after_s and st["renew_at_s"] == second.renew_at_s
    # long-running: a month of renewals at the injected clock, none missed, each at half-life
    for _ in range(60):
        clock.now_s = svc.signing.serving().renew_at_s
        assert svc.renew_serving_certificates()
    assert svc.signing.serving_renewals == 61
    assert clock.now_s - first.issued_at_s > 30 * 86400


def test_the_serving_certificates_are_reissued_when_a_root_rotates(tmp_path: Path) -> None:
    """A rotated signing root: new handshakes must get a chain from the new root at once."""
    from cryptography import x509

    from gitops.model import CaRoot

    svc = ConfigService(tmp_path)
    snap = fleet()
    svc.ensure_cas(snap)
    first = svc.signing.serving()
    td = snap.trust_domains["east.mesh.local"]
    published = replace(snap, trust_domains={**snap.trust_domains, "east.mesh.local": replace(
        td, ca=replace(td.ca, roots=(*td.ca.roots, CaRoot("root-2", False))))})
    svc.ensure_cas(published)                       # publish: the bundle changes
    assert svc.signing.serving().generation == first.generation + 1
    switched = replace(published, trust_domains={**published.trust_domains, "east.mesh.local": replace(
        td, ca=replace(td.ca, roots=(CaRoot("root-1", False), CaRoot("root-2", True))))})
    svc.ensure_cas(switched)                        # switch: east's certificate now chains to root-2
    cur = svc.signing.serving()
    east = cur.identities.index("spiffe://east.mesh.local/ns/meshfed-system/sa/meshfed-controller")
    leaf = x509.load_pem_x509_certificate(cur.pairs[east][1])
    root2 = next(r.cert for r in svc.signing.cas["east.mesh.local"].roots if r.name == "root-2")
    leaf.verify_directly_issued_by(root2)
    assert svc.renew_serving_certificates() == ""   # nothing changed since: no churn


def test_status_joins_the_distributor_and_the_transport(tmp_path: Path) -> None:
    svc = ConfigService(tmp_path)
    svc.apply_deltas(encode_config_deltas([(None, make_config(P1, "rev1"))]))
    st = svc.status({"port": 15010, "bootstrap_port": 15012, "health_reports": 3, "slow_disconnects": 1})
    assert (st["epoch"], st["port"], st["bootstrap_port"], st["health_reports"], st["slow_disconnects"]) == \
        (svc.epoch, 15010, 15012, 3, 1)
    assert st["counts"]["NOT SENT"] == 1 and [p["proxy"] for p in st["proxies"]] == [P1]


@pytest.mark.parametrize("clear", [False, True])
def test_trigger_to_ack_samples(tmp_path: Path, clear: bool) -> None:
    svc = ConfigService(tmp_path)
    svc.on_ack(ack(P1, 1))
    assert svc.trigger_to_ack(clear) == [0.02]
    assert svc.trigger_to_ack() == ([] if clear else [0.02])


def test_rollout_facts_say_which_proxies_run_a_revision(tmp_path: Path) -> None:
    """Issue 11 item 8: the facts the applied-quorum is decided from."""
    import itertools

    svc = ConfigService(tmp_path)
    ids = ["ztunnel/a/acked", "ztunnel/a/nacked", "ztunnel/a/inflight", "ztunnel/a/away", "ztunnel/b/older"]
    svc.dist.set_desired({p: make_config(p, "r2", services=2) for p in ids[:4]})
    svc.dist.set_desired({"ztunnel/b/older": make_config("ztunnel/b/older", "r1")})
    nonces = itertools.count()
    for p in ("ztunnel/a/acked", "ztunnel/a/nacked", "ztunnel/a/inflight", "ztunnel/b/older"):
        s = svc.dist.attach(p, None)
        push = s.next_push(0.0, nonces)
        assert push is not None
        if p != "ztunnel/a/inflight":
            s.on_reply(push.nonce, p == "ztunnel/a/nacked", "bad" if p == "ztunnel/a/nacked" else "", 0.0)
    facts = {f["proxy"]: (f["cluster"], f["connected"], f["state"]) for f in svc.rollout("r2", [*ids, "ztunnel/a/new"])}
    assert facts == {
        "ztunnel/a/acked": ("a", True, "acked"), "ztunnel/a/nacked": ("a", True, "nacked"),
        "ztunnel/a/inflight": ("a", True, "pending"), "ztunnel/a/away": ("a", False, "pending"),
        "ztunnel/b/older": ("b", True, "other"), "ztunnel/a/new": ("a", False, "other")}

