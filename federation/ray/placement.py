"""Where the controller's actors run.

The **state owner** — the config server actor, which holds the sqlite store and the CA keys in
the state directory — is pinned to the driver's node with a hard node affinity: its files are
on that node's disk, so a restart must come back there (if that node is gone, so is the state,
and the actor stays pending rather than starting empty elsewhere). Nothing else opens the state
directory: the reconciler, the Git source and the driver reach the store through the owner
(`federation.ray.remote.RemoteStore`).

Every other actor may run anywhere. By default they are spread over the cluster's nodes
(`SPREAD`: discovery and rendering load off the driver's node); `Placement.resources` pins a role
to nodes offering a custom resource instead (`{"reconciler": {"big-node": 0.01}}`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ROLES = ("reconciler", "git", "agent")


def current_node_id() -> str:
    return str(ray.get_runtime_context().get_node_id())


def here() -> dict[str, Any]:
    """This process as the placement sees it (for status and tests)."""
    return {"pid": os.getpid(), "node_id": current_node_id()}


def state_owner_options(node_id: str) -> dict[str, Any]:
    """Actor options for the state owner: on `node_id` (the driver's), and only there."""
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)}


@dataclass(frozen=True)
class Placement:
    """Custom resources per role (`ROLES`); a role without any is spread over the nodes."""

    resources: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.resources) - set(ROLES)
        if unknown:
            raise ValueError(f"placement for unknown role(s) {sorted(unknown)}: the roles are {', '.join(ROLES)} "
                             f"(the state owner is always pinned to the driver's node)")

    def options(self, role: str) -> dict[str, Any]:
        assert role in ROLES, role
        wanted = self.resources.get(role)
        if wanted:
            return {"resources": dict(wanted)}
        return {"scheduling_strategy": "SPREAD"}
