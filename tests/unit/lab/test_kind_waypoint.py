"""The kind manifests of the fleet's Gateways: one Deployment, ServiceAccount and Service per Gateway
and cluster, running the proxy the lab runs (its argv parsed by ztunnel's own parser)."""

from __future__ import annotations

from pathlib import Path

import pytest

import gitops
from clusters.kind.waypoint import READY_FILE, waypoint_objects
from gitops.model import GATEWAY_NAME_LABEL

L7 = Path(__file__).resolve().parents[3] / "examples" / "l7"


def test_objects_per_gateway_and_cluster() -> None:
    from ztunnel.__main__ import build_parser

    snap = gitops.load_worktree(L7)
    east = waypoint_objects(snap, "east")
    west = waypoint_objects(snap, "west")
    kinds = sorted((o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]) for o in east)
    assert ("Deployment", "ai-serving", "ai-gateway") in kinds and ("Service", "ai-serving", "ai-gateway-istio") in kinds
    assert ("Deployment", "shop", "waypoint") in kinds and ("ServiceAccount", "shop", "waypoint") in kinds
    assert not any(o["metadata"]["namespace"] == "ai-serving" for o in west)  # ai-gateway runs in east only
    dep = next(o for o in west if o["kind"] == "Deployment" and o["metadata"]["namespace"] == "shop")
    pod = dep["spec"]["template"]
    assert pod["metadata"]["labels"][GATEWAY_NAME_LABEL] == "waypoint"
    assert pod["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
    assert pod["spec"]["serviceAccountName"] == "waypoint"
    args = build_parser().parse_args(pod["spec"]["containers"][0]["args"][3:])
    assert args.proxy_id == "waypoint/west/shop/waypoint" and args.trust_domain == "west.mesh.local"
    assert str(args.ready_file) == READY_FILE
    svc = next(o for o in east if o["kind"] == "Service" and o["metadata"]["name"] == "ai-gateway-istio")
    assert svc["spec"]["type"] == "LoadBalancer" and [p["port"] for p in svc["spec"]["ports"]] == [80]
    with pytest.raises(KeyError, match="no cluster 'north'"):
        waypoint_objects(snap, "north")
