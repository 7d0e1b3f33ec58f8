"""Where the controller's actors run.

The **state owner** — the config server actor, which holds the sqlite store and the CA keys in
the state directory — is pinned to the driver's node with a hard node affinity: its files are
on that node's disk, so a restart must come back there (if that node is gone, so is the state,
and the actor stays pending rather than starting empty elsewhere). Nothing else opens the state
directory: the reconciler, the Git source and the driver reach the store through the owner
(`federation.ray.remote.RemoteStore`).

Every other actor may run anywhere. By default the reconciler and the Git source are spread
(`SPREAD`, best effort) and the cluster agents are dealt round-robin over the alive nodes
(`agent_node`) with a *hard* node affinity: the agents are exactly the load worth spreading (one
watch set per cluster), and neither SPREAD nor a soft affinity spreads them — Ray 2.60 places a
zero-CPU actor with a soft affinity on either node about as often as not (measured: 11 of 24 on
the preferred node), which stacked all three agents on one node in CI. A hard affinity cannot
move by itself when its node goes away, so the driver replaces an agent whose node has left
(`agents_on_departed_nodes`, checked every 10 s), dealing it over the nodes still alive. An agent
dealt to a node that is alive but draining waits there until the node leaves.
`Placement.resources` pins a role to nodes offering a custom resource instead
(`{"reconciler": {"big-node": 0.01}}`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ROLES = ("reconciler", "git", "agent", "shard")


def current_node_id() -> str:
    return str(ray.get_runtime_context().get_node_id())


def here() -> dict[str, Any]:
    """This process as the placement sees it (for status and tests)."""
    return {"pid": os.getpid(), "node_id": current_node_id()}


def on_node(node_id: str, soft: bool) -> dict[str, Any]:
    """Actor options for a node affinity (`soft`: Ray may place it elsewhere when it must)."""
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=soft)}


def state_owner_options(node_id: str) -> dict[str, Any]:
    """Actor options for the state owner: on `node_id` (the driver's), and only there."""
    return on_node(node_id, soft=False)


@dataclass(frozen=True)
class Placement:
    """Custom resources per role (`ROLES`); a role without any is spread over the nodes."""

    resources: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.resources) - set(ROLES)
        if unknown:
            raise ValueError(f"placement for unknown role(s) {sorted(unknown)}: the roles are {', '.join(ROLES)} "
                             f"(the state owner is always pinned to the driver's node)")

    def by_resource(self, role: str) -> bool:
        """`role` is pinned by a custom resource (its nodes are Ray's choice, not ours)."""
        return bool(self.resources.get(role))

    def options(self, role: str, node_id: str | None = None) -> dict[str, Any]:
        """Actor options for `role`; `node_id` (agents: `agent_node`) pins it to that node."""
        assert role in ROLES, role
        if self.by_resource(role):
            return {"resources": dict(self.resources[role])}
        if node_id is not None:
            return on_node(node_id, soft=False)
        return {"scheduling_strategy": "SPREAD"}


def agent_node(cluster: str, clusters: list[str], node_ids: list[str]) -> str | None:
    """The node an agent should prefer: clusters in name order dealt over the alive nodes in id
    order (pure; stable while the fleet and the nodes stay the same)."""
    if not node_ids or cluster not in clusters:
        return None
    nodes = sorted(node_ids)
    return nodes[sorted(clusters).index(cluster) % len(nodes)]


def shard_node(index: int, node_ids: list[str]) -> str | None:
    """The node a config shard is pinned to: shards dealt over the alive nodes in id order (pure),
    like the agents (Ray's SPREAD and soft affinities may stack zero-CPU actors on one node)."""
    if not node_ids:
        return None
    return sorted(node_ids)[index % len(node_ids)]


def agents_on_departed_nodes(pinned: Mapping[str, str | None], alive: list[str]) -> list[str]:
    """The agents pinned to a node that is no longer alive (pure): Ray cannot restart them there,
    so the driver replaces them on a node that is. An agent placed by resource (`None`) is Ray's."""
    up = set(alive)
    return sorted(name for name, node in pinned.items() if node is not None and node not in up)


def alive_node_ids() -> list[str]:
    return [str(n["NodeID"]) for n in ray.nodes() if n.get("Alive")]
