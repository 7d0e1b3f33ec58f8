"""Placement decisions (pure): agents dealt over the nodes, roles pinned by resource."""

from __future__ import annotations

import pytest

from federation.ray.placement import Placement, agent_node, agents_on_departed_nodes


def test_agents_are_dealt_round_robin_over_the_nodes() -> None:
    clusters, nodes = ["west", "east", "south"], ["n2", "n1"]
    assert {c: agent_node(c, clusters, nodes) for c in clusters} == {"east": "n1", "south": "n2", "west": "n1"}
    assert len({agent_node(c, clusters, nodes) for c in clusters}) == 2   # both nodes get one


def test_no_nodes_known_means_no_preference() -> None:
    assert agent_node("east", ["east"], []) is None
    assert agent_node("gone", ["east"], ["n1"]) is None


def test_options_pin_the_agent_to_its_node_unless_a_resource_pins_the_role() -> None:
    node = "ab" * 28   # Ray node ids are hex
    opts = Placement().options("agent", node)["scheduling_strategy"]
    assert opts.node_id == node and opts.soft is False   # a soft affinity is not kept for zero-CPU actors
    assert Placement().options("reconciler") == {"scheduling_strategy": "SPREAD"}
    assert Placement({"agent": {"edge": 0.01}}).options("agent", "n1") == {"resources": {"edge": 0.01}}
    with pytest.raises(ValueError, match="the state owner is always pinned"):
        Placement({"config_server": {"x": 1}})


def test_agents_pinned_to_a_departed_node_are_the_ones_replaced() -> None:
    pinned = {"east": "n1", "south": "n2", "west": "n1", "edge": None}
    assert agents_on_departed_nodes(pinned, ["n1", "n2"]) == []
    assert agents_on_departed_nodes(pinned, ["n2", "n3"]) == ["east", "west"]   # `None`: placed by resource
    assert agents_on_departed_nodes(pinned, []) == ["east", "south", "west"]
