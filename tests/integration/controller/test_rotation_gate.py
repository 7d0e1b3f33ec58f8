"""Staged CA root rotation through the controller's real parts, without Ray.

`ConfigService` (CA in the state directory, its signing policy's `sign()` from CSRs, the sqlite
store) and the `Reconciler` with the real `CoreRender` whose `bundle_roots` loads the CAs, wired
as `federation.controller.reconcile_service.ReconcileService` wires them (on Ray through actor
calls, here directly). The
example fleet is committed stage by stage; unsafe commits are rejected with MF0407, never load
their CAs (no key for a skipped root, no signer switch), and show up in `meshfed check`'s view.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

import gitops
from federation.controller.checks import build_checks
from federation.controller.config_service import ConfigService
from federation.controller.reconciler import CoreRender, Reconciler
from federation.controller.signing import Requester
from federation.core.rotation import DEFAULT_RETIRE_MARGIN_S
from gitops.model import CaRoot, CaSpec, ConfigSnapshot, Revision
from ztunnel.api.identity import generate_key_and_csr, proxy_spiffe_id

from .conftest import EXAMPLE_FLEET

TD = "east.mesh.local"
PROXY = "ztunnel/east/node-1"


def ca(*roots: str, signing: str) -> CaSpec:
    return CaSpec(roots=tuple(CaRoot(r, r == signing) for r in roots))


@pytest.fixture(scope="module")
def base() -> ConfigSnapshot:
    return gitops.load_worktree(EXAMPLE_FLEET)


def commit(base: ConfigSnapshot, letter: str, spec: CaSpec) -> ConfigSnapshot:
    tds = dict(base.trust_domains)
    tds[TD] = replace(tds[TD], ca=spec)
    return replace(base, revision=Revision(letter * 40, f"commit {letter}"), trust_domains=tds)


class Wired:
    def __init__(self, state_dir: Path) -> None:
        self.cs = ConfigService(state_dir, insecure=True)
        self.loaded: list[str] = []          # revisions whose CAs were loaded
        self.pushes: list[int] = []
        self.rec = Reconciler(CoreRender(bundle_roots=self._bundle_roots), lambda c: self.pushes.append(len(c)),
                              self.cs.store, warmup_max_s=0.0)

    def _bundle_roots(self, snap: ConfigSnapshot) -> Any:
        self.loaded.append(snap.revision.sha)
        return self.cs.ensure_cas(snap)

    def commit(self, snap: ConfigSnapshot, now_s: float) -> dict[str, Any]:
        self.rec.on_snapshot(snap, now_s=now_s)
        self.rec.reconcile(now_s=now_s, force=True)
        return self.rec.status()

    def sign(self) -> x509.Certificate:
        key_csr = generate_key_and_csr(proxy_spiffe_id(TD, PROXY))
        chain, _roots, _exp = self.cs.signing.sign(Requester(PROXY, "", True, "east"), key_csr.csr_pem, 3600.0)
        return x509.load_pem_x509_certificate(chain[0])

    def issuer_root(self, leaf: x509.Certificate) -> str:
        (root,) = [str(r.name) for r in self.cs.signing.cas[TD].roots if r.cert.subject == leaf.issuer]
        return root


def test_rotation_stages_through_config_server_and_reconciler(base: ConfigSnapshot, tmp_path: Path) -> None:
    w = Wired(tmp_path / "state")
    keys = tmp_path / "state" / "ca" / TD
    st = w.commit(commit(base, "a", ca("root-1", signing="root-1")), 1000.0)
    assert st["applied"]["revision"] == "a" * 40 and w.loaded == ["a" * 40]
    leaf1 = w.sign()
    assert w.issuer_root(leaf1) == "root-1"
    leaf1_na = leaf1.not_valid_after_utc.timestamp()
    assert w.cs.store.leaf_not_after(TD) == {"root-1": leaf1_na}

    # skip publish: root-2 new and already signing -> rejected; its CAs are never loaded
    st = w.commit(commit(base, "b", ca("root-1", "root-2", signing="root-2")), 1001.0)
    assert st["applied"]["revision"] == "a" * 40 and st["desired"]["revision"] == "b" * 40
    assert [p["code"] for p in st["problems"]] == ["MF0407"]
    assert "b" * 40 not in w.loaded and not (keys / "root-2.keypair.pem").exists()
    assert w.cs.signing.cas[TD].signing_root == "root-1" and w.issuer_root(w.sign()) == "root-1"
    assert w.cs.store.last_attempted().outcome == "failed"  # type: ignore[union-attr]
    failed = [c for c in build_checks({"desired": st["desired"], "problems": st["problems"]}, 1001.0)
              if c["check"] == "last revision applied"]
    assert not failed[0]["ok"] and "[MF0407]" in failed[0]["cause"] and "skips the publish stage" in failed[0]["cause"]

    # publish: root-2 trusted, not signing
    st = w.commit(commit(base, "c", ca("root-1", "root-2", signing="root-1")), 1002.0)
    assert st["applied"]["revision"] == "c" * 40 and st["problems"] == []
    assert (keys / "root-2.keypair.pem").exists() and w.cs.signing.cas[TD].signing_root == "root-1"
    assert sorted(r.name for r in w.cs.signing.cas[TD].roots) == ["root-1", "root-2"]

    # switch and retire in one commit (skips the switch stage) -> rejected, signer unchanged
    st = w.commit(commit(base, "d", ca("root-2", signing="root-2")), 1003.0)
    assert st["applied"]["revision"] == "c" * 40 and "skips the switch stage" in st["problems"][0]["message"]
    assert w.cs.signing.cas[TD].signing_root == "root-1"

    # switch: new leaves come from root-2; root-1's leaves stay recorded
    st = w.commit(commit(base, "e", ca("root-1", "root-2", signing="root-2")), 1004.0)
    assert st["applied"]["revision"] == "e" * 40 and w.cs.signing.cas[TD].signing_root == "root-2"
    assert w.issuer_root(w.sign()) == "root-2"
    assert set(w.cs.store.leaf_not_after(TD)) == {"root-1", "root-2"}

    # retire root-1 while a leaf it signed is live -> rejected with the time it becomes safe
    st = w.commit(commit(base, "f", ca("root-2", signing="root-2")), leaf1_na - 60)
    assert st["applied"]["revision"] == "e" * 40
    assert "would invalidate live certificates" in st["problems"][0]["message"]
    assert len(w.cs.signing.cas[TD].roots) == 2

    # the same commit, after root-1's last leaf expired (+ the clock-skew margin) -> accepted
    st = w.commit(commit(base, "f", ca("root-2", signing="root-2")), leaf1_na + DEFAULT_RETIRE_MARGIN_S + 1)
    assert st["applied"]["revision"] == "f" * 40 and st["problems"] == []
    assert [r.name for r in w.cs.signing.cas[TD].roots] == ["root-2"]

    # a restarted controller (new host and reconciler on the same state dir) still knows the stage
    w2 = Wired(tmp_path / "state")
    st = w2.commit(commit(base, "g", ca("root-3", signing="root-3")), leaf1_na + 7200)
    assert st["applied"]["revision"] == "f" * 40 and st["problems"][0]["code"] == "MF0407"
    assert w2.loaded == [] and not (keys / "root-3.keypair.pem").exists()


def test_a_restart_on_an_unsafe_head_serves_the_last_applied_revision(fleet_repo: Path, tmp_path: Path) -> None:
    """`last_applied_if_gated`: what the Git source and the driver use after a restart, so that a
    rejected head neither leaves the reconciler without a snapshot nor loads its CAs at start."""
    from federation.controller.git_feed import last_applied_if_gated, snapshot_for_cas
    from federation.controller.sources import GitSource
    from federation.controller.store import Store
    from federation.core.rotation_gate import ca_spec_to_dict, ca_specs_of

    from .conftest import git

    state = tmp_path / "state"
    good = gitops.load_revision(fleet_repo, "HEAD")
    store = Store.in_state_dir(state)
    store.record_attempt(good.revision.sha, good.revision.subject, ok=True, at_s=1.0)
    store.record_applied_ca_specs({td: ca_spec_to_dict(s) for td, s in ca_specs_of(good).items()})

    source = GitSource(str(fleet_repo), "main")
    head = source.poll(2.0)
    assert isinstance(head, ConfigSnapshot) and head.revision.sha == good.revision.sha
    assert last_applied_if_gated(source, store, head, 2.0) is None      # the applied revision itself
    first = snapshot_for_cas(str(fleet_repo), "main", store, 2.0)   # what a starting driver loads
    assert first is not None and first.revision.sha == good.revision.sha

    trust = fleet_repo / "trust" / f"{TD}.yaml"
    trust.write_text(trust.read_text().replace("- name: root-1\n        signing: true",
                                               "- name: root-2\n        signing: true"))
    git(fleet_repo, "commit", "-q", "-am", "rotate east in one step")
    source = GitSource(str(fleet_repo), "main")             # a restarted Git source
    head = source.poll(3.0)
    assert isinstance(head, ConfigSnapshot) and head.revision.sha != good.revision.sha
    assert head.trust_domains[TD].ca == ca("root-2", signing="root-2")
    fallback = last_applied_if_gated(source, store, head, 3.0)
    assert fallback is not None and fallback.revision.sha == good.revision.sha
    assert fallback.trust_domains[TD].ca == ca("root-1", signing="root-1")
    # a driver starting on that head loads the CAs of the last applied revision, not the head's
    start = snapshot_for_cas(str(fleet_repo), "main", store, 3.0)
    assert start is not None and start.revision.sha == good.revision.sha


def test_a_restart_on_a_head_that_removes_a_cluster_sends_the_last_applied_revision_first(
        fleet_repo: Path, tmp_path: Path) -> None:
    """Issue 11 item 19: a restarted reconciler must judge (removal guard) and drain a removal
    against the revision in force, not adopt the head as if it were the first one it saw."""
    from federation.controller.git_feed import last_applied_if_gated
    from federation.controller.sources import GitSource
    from federation.controller.store import Store
    from federation.core.rotation_gate import ca_spec_to_dict, ca_specs_of

    from .conftest import git

    state = tmp_path / "state"
    good = gitops.load_revision(fleet_repo, "HEAD")
    store = Store.in_state_dir(state)
    store.record_attempt(good.revision.sha, good.revision.subject, ok=True, at_s=1.0)
    store.record_applied_ca_specs({td: ca_spec_to_dict(s) for td, s in ca_specs_of(good).items()})
    store.record_applied_clusters(sorted(good.clusters))
    (fleet_repo / "clusters/south.yaml").unlink()
    (fleet_repo / "lab/south.yaml").unlink()
    svc = fleet_repo / "services/shop/checkout.yaml"
    svc.write_text(svc.read_text().replace("    - south\n", ""))
    git(fleet_repo, "commit", "-q", "-am", "south leaves")
    source = GitSource(str(fleet_repo), "main", str(state))
    head = source.poll(2.0)
    assert isinstance(head, ConfigSnapshot) and "south" not in head.clusters
    fallback = last_applied_if_gated(source, store, head, 2.0)
    assert fallback is not None and fallback.revision.sha == good.revision.sha and "south" in fallback.clusters
