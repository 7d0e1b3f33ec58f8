"""The config service (the state owner) as a plain class: epoch fencing, deltas from the
reconciler, ACK/NACK records batched into the store, credentials written at CA load, status."""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from benchmarks.simproxy import make_config
from federation.controller.bootstrap import BOOTSTRAP_TOKENS_FILE
from federation.controller.config_service import CONTROLLER_ROOTS_FILE, RECENT_ACK_LATENCIES, ConfigService
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


def test_loading_cas_writes_the_controller_roots_and_private_bootstrap_tokens(tmp_path: Path) -> None:
    svc = ConfigService(tmp_path, insecure=False)
    roots = svc.ensure_cas(fleet())
    assert set(roots) == {"east.mesh.local", "west.mesh.local", "south.mesh.local"}
    assert (tmp_path / CONTROLLER_ROOTS_FILE).read_bytes() == svc.signing.roots_pem()
    tokens = tmp_path / BOOTSTRAP_TOKENS_FILE
    assert stat.S_IMODE(os.lstat(tokens).st_mode) == 0o600
    assert svc.bootstrap.cluster_for("nope") is None
    assert {svc.bootstrap.cluster_for(t) for t in svc.bootstrap._by_cluster.values()} == {"east", "west", "south"}


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
