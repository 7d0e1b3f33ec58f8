"""Validation's pool (MF0505) is the pool the rendered node proxies really balance over."""

from __future__ import annotations

from pathlib import Path

import gitops
from federation.core.failover import build_engine
from federation.core.offline import offline_observations
from federation.core.render import render_configs
from gitops.validate import proxy_pools

FLEET = Path(__file__).resolve().parents[3] / "examples" / "fleet"


def test_validation_pool_equals_each_node_proxys_view() -> None:
    snap = gitops.load_worktree(FLEET)
    configs = render_configs(build_engine(snap, offline_observations(snap)))
    for key, svc in snap.services.items():
        pools = proxy_pools(svc, snap.clusters, snap.lab_clusters)
        assert pools is not None
        for pid, cfg in configs.items():
            if not pid.startswith("ztunnel/"):
                continue
            view = next((s for s in cfg.services if s.hostname == svc.hostname), None)
            rendered = len(view.endpoints) if view is not None else 0
            assert rendered == pools[cfg.cluster], (key, pid)
