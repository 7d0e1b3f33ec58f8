"""Issue 11 item 19 (the controller): deleting a cluster's file drains it before it goes, and a
commit that removes too much is refused.

The reconcile service and the config service are the real plain classes wired as Ray wires them
(deltas, rollout facts, cluster operations), with the federation core rendering the example
fleet's LabCluster endpoints; proxies are sessions attached to the distributor that ACK what is
pushed. Time is explicit.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from federation.controller.config_service import ConfigService
from federation.controller.reconcile_service import ReconcileService
from federation.core.offline import offline_observations
from federation.core.rollout import ProxyRollout, rollout_from_dict
from tests.unit.core.factory import CLUSTERS, fleet
from ztunnel.api.identity import proxy_spiffe_id

OLD = fleet(sha="a" * 40)
WITHOUT_SOUTH = fleet(clusters=CLUSTERS[:2], sha="b" * 40)
SOUTH_PROXIES = {"gateway/south", "ztunnel/south/node-1", "ztunnel/south/node-2"}


class Wired:
    def __init__(self, tmp_path: Path) -> None:
        self.now = 1000.0
        # TokenReview clients are not called here: the fake records which clusters still have one
        self.cs = ConfigService(tmp_path / "state", clock=lambda: self.now,
                                token_reviewer=lambda cluster, kubeconfig, context: (cluster, context))

        def rollout(revision: str, ids: Sequence[str]) -> list[ProxyRollout]:
            return rollout_from_dict({"proxies": self.cs.rollout(revision, ids)})

        self.svc = ReconcileService(self.cs.store, self.cs.apply_deltas, self.cs.ensure_cas, clock=lambda: self.now,
                                    rollout=rollout, cluster_ops=self.cs)
        self.svc.rec.warmup_max_s = 0.0

    def step(self, dt_s: float = 1.0) -> None:   # the reconcile service ticks once a second
        self.now += dt_s
        self.svc.step(self.now)

    def connect_all(self) -> None:
        for pid in list(self.cs.dist.sessions):
            if not self.cs.dist.sessions[pid].connected:
                self.cs.dist.attach(pid, None)

    def ack_all(self) -> None:
        """Every connected proxy takes what is pushed to it."""
        for s in list(self.cs.dist.sessions.values()):
            while s.connected and self.cs.dist.build(s):
                assert s.in_flight is not None
                s.on_reply(s.in_flight.nonce, False, "", self.now)

    def commit(self, snap: object) -> None:
        self.svc.on_snapshot(snap)  # type: ignore[arg-type]
        self.step()

    def endpoints_seen_by(self, pid: str) -> set[str]:
        cfg = self.cs.dist.sessions[pid].desired
        assert cfg is not None
        return {e.cluster for s in cfg.services for e in s.endpoints}

    def events(self) -> list[dict[str, object]]:
        return [r.as_dict() for r in self.cs.store.failover_history(None, None)]


@pytest.fixture()
def w(tmp_path: Path) -> Wired:
    w = Wired(tmp_path)
    w.svc.on_snapshot(OLD)
    for obs in offline_observations(OLD):
        w.svc.on_observation(obs)
    w.step()
    w.connect_all()
    w.ack_all()
    w.step()
    assert w.svc.status()["applied"]["revision"] == "a" * 40
    assert set(w.cs.dist.sessions) >= SOUTH_PROXIES
    return w


def test_a_removed_cluster_is_drained_before_its_agent_and_credentials_go(w: Wired) -> None:
    south_node, east_node = "ztunnel/south/node-1", "ztunnel/east/node-1"
    # hand-made bootstrap tokens not used yet (per proxy, single-use)
    south_token, east_token = w.cs.bootstrap.create(south_node), w.cs.bootstrap.create(east_node)
    assert "south" in w.endpoints_seen_by("ztunnel/east/node-1")
    w.commit(WITHOUT_SOUTH)
    st = w.svc.status()
    # phase 1: draining. Every other proxy's view loses south's endpoints (traffic moves)...
    assert "south" not in w.endpoints_seen_by("ztunnel/east/node-1")
    assert "south" not in w.endpoints_seen_by("ztunnel/west/node-1")
    # ...while south keeps its agent, its proxies their config and credentials
    assert st["fleet_clusters"]["south"]["draining"] is True and st["fleet_clusters"]["south"]["context"] == "lab-south"
    assert set(w.cs.dist.sessions) >= SOUTH_PROXIES and all(w.cs.dist.sessions[p].desired for p in SOUTH_PROXIES)
    assert w.cs.signing.authorize(south_node, proxy_spiffe_id("south.mesh.local", south_node)) == ""
    # a draining cluster's proxies can still bootstrap: their tokens stay valid, their cluster
    # still reviews their ServiceAccount tokens
    assert w.cs.bootstrap.check(south_token, south_node) == ""
    assert w.cs.authenticate_bootstrap(south_node, "", south_token).ok
    assert w.cs._reviewer("south") == ("south", "lab-south")
    (drain,) = st["draining"]
    assert drain["cluster"] == "south" and drain["withdrawn_at_s"] is None
    kinds = [e["kind"] for e in w.events()]
    assert "ClusterDraining" in kinds and st["render_problems"] == []
    # not withdrawn until the proxies ACK the revision without south: no grace runs yet
    w.step(600.0)
    assert w.svc.status()["draining"] and "ClusterRemoved" not in [e["kind"] for e in w.events()]
    w.ack_all()
    w.step()
    st = w.svc.status()
    assert st["applied"]["revision"] == "b" * 40 and st["draining"][0]["withdrawn_at_s"] == w.now
    # phase 2: after the grace the cluster is removed
    w.step(59.0)
    assert w.svc.status()["draining"]
    w.step(1.5)
    st = w.svc.status()
    assert st["draining"] == [] and "south" not in st["fleet_clusters"]          # the agent stops
    assert not SOUTH_PROXIES & {p for p, s in w.cs.dist.sessions.items() if not s.removed}
    assert w.cs.signing.authorize(south_node, proxy_spiffe_id("south.mesh.local", south_node)) != ""
    # a removed cluster's proxies can no longer bootstrap: their unused tokens are revoked (in the
    # file too) and no API reviews their ServiceAccount tokens; other clusters' tokens stay
    assert w.cs.bootstrap.check(south_token, south_node) != "" and south_node not in w.cs.bootstrap._read()
    assert not w.cs.authenticate_bootstrap(south_node, "", south_token).ok
    assert w.cs._reviewer("south") is None
    verdict = w.cs.authenticate_bootstrap(south_node, "a.b.c", "")
    assert verdict.code == "permission_denied" and "not in the applied fleet" in verdict.reason
    assert w.cs.bootstrap.check(east_token, east_node) == "" and east_node in w.cs.bootstrap.pending()
    assert not SOUTH_PROXIES & set(w.cs.store.proxy_acks())
    assert set(st["removed_clusters"][0]["proxies_forgotten"]) == SOUTH_PROXIES
    removed = [e for e in w.events() if e["kind"] == "ClusterRemoved"]
    draining = [e for e in w.events() if e["kind"] == "ClusterDraining"]
    assert len(removed) == len(draining) == 1
    for e in (removed[0], draining[0]):                  # provenance: the commit and the file it was in
        assert e["revision"] == "b" * 40 and e["policy_file"] == "clusters/south.yaml:3:1" and e["from_cluster"] == "south"
    assert set(removed[0]["detail"]["proxies_forgotten"]) == SOUTH_PROXIES
    forgotten = {f["proxy"]: f["why"] for f in w.cs.status({})["forgotten"]}
    assert set(forgotten) >= SOUTH_PROXIES and "removed by commit bbbbbbbb" in forgotten["gateway/south"]


def test_a_commit_that_removes_too_much_is_refused_and_nothing_changes(w: Wired) -> None:
    pushes_before = {p: s.pushes for p, s in w.cs.dist.sessions.items()}
    w.commit(fleet(clusters=CLUSTERS[:1], sha="c" * 40))               # west and south: 2 of 3 clusters
    st = w.svc.status()
    assert st["desired"]["revision"] == "c" * 40 and st["desired"]["ok"] is False
    assert {p["code"] for p in st["problems"]} == {"MF0516"}
    assert any("2 of 3 clusters" in p["message"] for p in st["problems"])
    assert st["applied"]["revision"] == "a" * 40 and st["draining"] == []
    assert set(st["fleet_clusters"]) == {"east", "west", "south"}
    assert {p: s.pushes for p, s in w.cs.dist.sessions.items()} == pushes_before
    assert "south" in w.endpoints_seen_by("ztunnel/east/node-1")


def test_a_removal_the_federation_says_is_intended_goes_through(w: Wired) -> None:
    from dataclasses import replace

    from gitops.model import RemovalPolicy

    new = fleet(clusters=CLUSTERS[:1], sha="d" * 40)
    new = replace(new, federation=replace(new.federation, removal=RemovalPolicy(intended_clusters=("west", "south"))))
    w.commit(new)
    st = w.svc.status()
    assert st["desired"]["ok"] is True and {d["cluster"] for d in st["draining"]} == {"west", "south"}


def test_proxies_no_longer_rendered_are_forgotten_by_the_config_service(w: Wired) -> None:
    """The known bug: the reconciler never sent a removal for a proxy it stopped rendering, so the
    config service kept its session and status forever. Here a node leaves east."""
    from dataclasses import replace as dc_replace

    east = next(o for o in offline_observations(OLD) if o.cluster == "east")
    one_node = dc_replace(east, nodes=tuple(n for n in east.nodes if n.name == "node-1"),
                          endpoints=tuple(e for e in east.endpoints if e.node == "node-1"))
    w.svc.on_observation(one_node)
    w.step()
    assert "ztunnel/east/node-2" not in w.svc.rec.configs
    s = w.cs.dist.sessions.get("ztunnel/east/node-2")
    assert s is None or s.removed                          # a connected one is closed, then dropped
    if s is not None:
        w.cs.dist.detach(s)
    assert "ztunnel/east/node-2" not in {p["proxy"] for p in w.cs.status({})["proxies"]}
    assert "ztunnel/east/node-2" in {f["proxy"] for f in w.cs.status({})["forgotten"]}


def test_a_restarted_reconciler_resumes_a_drain(w: Wired, tmp_path: Path) -> None:
    w.commit(WITHOUT_SOUTH)
    w.ack_all()
    w.step()
    again = ReconcileService(w.cs.store, w.cs.apply_deltas, w.cs.ensure_cas, clock=lambda: w.now, cluster_ops=w.cs)
    (d,) = again.status()["draining"]
    assert d["cluster"] == "south" and d["withdrawn_at_s"] is not None
    assert again.status()["fleet_clusters"]["south"]["draining"] is True


def test_a_restarted_config_service_is_told_again_which_clusters_drain(w: Wired, tmp_path: Path) -> None:
    south_node = "ztunnel/south/node-1"
    south_token = w.cs.bootstrap.create(south_node)
    w.commit(WITHOUT_SOUTH)
    fresh = ConfigService(tmp_path / "state", clock=lambda: w.now)        # the state owner restarted
    w.svc.rec.cluster_ops = fresh
    w.svc.outbox.send = fresh.apply_deltas
    w.svc.resync()
    fresh.ensure_cas(WITHOUT_SOUTH)
    assert fresh.signing.authorize(south_node, proxy_spiffe_id("south.mesh.local", south_node)) == ""
    assert fresh.bootstrap.check(south_token, south_node) == ""   # its unused token survived the restart
