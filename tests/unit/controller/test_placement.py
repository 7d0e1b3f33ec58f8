"""Placement decisions (pure): agents dealt over the nodes, roles pinned by resource."""

from __future__ import annotations

import pytest

from federation.ray.placement import Placement, agent_node


def test_agents_are_dealt_round_robin_over_the_nodes() -> None:
    clusters, nodes = ["west", "east", "south"], ["n2", "n1"]
    assert {c: agent_node(c, clusters, nodes) for c in clusters} == {"east": "n1", "south": "n2", "west": "n1"}
    assert len({agent_node(c, clusters, nodes) for c in clusters}) == 2   # both nodes get one


def test_no_nodes_known_means_no_preference() -> None:
    assert agent_node("east", ["east"], []) is None
    assert agent_node("gone", ["east"], ["n1"]) is None


def test_options_prefer_softly_unless_a_resource_pins_the_role() -> None:
    node = "ab" * 28   # Ray node ids are hex
    opts = Placement().options("agent", node)["scheduling_strategy"]
    assert opts.node_id == node and opts.soft is True
    assert Placement().options("reconciler") == {"scheduling_strategy": "SPREAD"}
    assert Placement({"agent": {"edge": 0.01}}).options("agent", "n1") == {"resources": {"edge": 0.01}}
    with pytest.raises(ValueError, match="the state owner is always pinned"):
        Placement({"config_server": {"x": 1}})
