"""The example fleet as a snapshot; YAML 1.2 strictness; reuse of unchanged files."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

import gitops
from gitops import model as m
from gitops.loader import build_snapshot, read_worktree
from gitops.yamldoc import parse_yaml
from tests.unit.gitops.conftest import EXAMPLE

MakeFleet = Callable[..., Path]


def test_example_snapshot_contents() -> None:
    s = gitops.load_worktree(EXAMPLE)
    assert s.revision.sha == "WORKTREE"
    assert set(s.clusters) == {"east", "west", "south"}
    east = s.clusters["east"]
    assert (east.network, east.region, east.zone, east.trust_domain) == ("net-east", "us-east", "us-east-1a",
                                                                         "east.mesh.local")
    assert east.api == m.ClusterApi(m.ClusterApiKind.LAB, "lab-east")
    assert east.east_west_gateway == m.EastWestGateway("172.30.0.11", 15008)
    assert east.pod_cidrs == ("10.10.0.0/16",)
    assert s.trust_domains["east.mesh.local"].federates_with == ("west.mesh.local", "south.mesh.local")
    checkout = s.services[m.ServiceKey("shop", "checkout")]
    assert checkout.hostname == "checkout.shop.svc.clusterset.local"
    assert checkout.ports == (m.ServicePort("http", 80, 8080, "http"),)
    tp, where = s.traffic_policy_for(checkout.key)
    assert tp is not None and tp.outlier_detection is not None and tp.locality_lb is not None
    assert where is not None and where.file == "policies/shop/checkout.yaml"
    od = tp.outlier_detection
    assert (od.consecutive_gateway_errors, od.consecutive_5xx_errors, od.interval_s, od.base_ejection_time_s,
            od.max_ejection_percent) == (3, 5, 5.0, 15.0, 100)
    assert tp.locality_lb.failover_priority == ("topology.kubernetes.io/region", "topology.istio.io/network")
    # positions of fields survive into the model
    assert str(s.destination_rules[checkout.key].field_pos["spec.trafficPolicy.outlierDetection.interval"]) == \
        "policies/shop/checkout.yaml:12:7"
    (route,) = s.routes
    assert [(b.name, b.weight) for b in route.backends] == [("checkout", 90), ("checkout-v2", 10)]
    authz, authz_v2 = sorted(s.authorization_policies, key=lambda a: a.name)  # checkout, checkout-v2 (canary)
    assert (authz.name, authz_v2.name) == ("checkout-allow-frontend", "checkout-v2-allow-frontend")
    assert authz.rules[0].ports == (8080,)
    assert len(authz.rules[0].from_[0].principals) == 3
    lab = s.lab_clusters["east"]
    assert [w.name for w in lab.workloads] == ["checkout", "cart", "checkout-v2", "frontend"]
    assert lab.workloads[-1].role == "client" and lab.workloads[-1].service is None
    # the federation default covers services without their own policy
    _tp_v2, where_v2 = s.traffic_policy_for(m.ServiceKey("shop", "checkout-v2"))
    assert where_v2 is not None and where_v2.file == "federation.yaml"


def _tiers_from(s: m.ConfigSnapshot, source: str) -> dict[str, int]:
    """Istio failoverPriority tiers: tier = number of leading labels that do NOT all match the source."""
    src = s.clusters[source]
    tp, _ = s.traffic_policy_for(m.ServiceKey("shop", "checkout"))
    assert tp is not None and tp.locality_lb is not None

    def label(c: m.Cluster, key: str) -> str:
        return {"topology.istio.io/network": c.network, "topology.kubernetes.io/region": c.region}[key]

    def matched(c: m.Cluster) -> int:
        n = 0
        for key in tp.locality_lb.failover_priority:
            if label(c, key) != label(src, key):
                break
            n += 1
        return n
    labels = len(tp.locality_lb.failover_priority)
    return {name: labels - matched(c) for name, c in s.clusters.items()}


def test_example_failover_tiers_from_east_are_east_south_west() -> None:
    # three distinct tiers: a sort that merely happens to be alphabetical would not pass
    assert _tiers_from(gitops.load_worktree(EXAMPLE), "east") == {"east": 0, "south": 1, "west": 2}


def test_yaml_12_keeps_norway_and_sexagesimal_as_strings() -> None:
    doc, probs = parse_yaml("x.yaml", b"a: no\nb: on\nc: 12:30\nd: 0o17\ne: true\nf: ~\n")
    assert probs == [] and doc is not None
    assert doc.data == {"a": "no", "b": "on", "c": "12:30", "d": 15, "e": True, "f": None}
    assert str(doc.key_pos[("c",)]) == "x.yaml:3:1"
    assert str(doc.value_pos[("c",)]) == "x.yaml:3:4"


# YAML forbids raw control characters and lone surrogates; everything else printable is fair game.
_chars = st.characters(blacklist_categories=("Cs", "Cc"))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(_chars, max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(_chars, max_size=6), children,
                                                                        max_size=4),
    max_leaves=20)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(_chars, min_size=1, max_size=6), json_values, min_size=1, max_size=5))
def test_json_documents_parse_to_the_same_data(value: dict[str, object]) -> None:
    """JSON is YAML 1.2: any JSON document must read back unchanged, with a position per key."""
    doc, probs = parse_yaml("j.yaml", json.dumps(value, ensure_ascii=False).encode())
    assert probs == [] and doc is not None
    assert doc.data == value
    assert all((k,) in doc.key_pos for k in value)


def test_reuse_reparses_only_changed_files(fleet_copy: MakeFleet) -> None:
    root = fleet_copy()
    first = build_snapshot(read_worktree(root))
    assert first.snapshot is not None and len(first.reparsed) == 17
    p = root / "services/shop/cart.yaml"
    p.write_text(p.read_text().replace("maxEjectionPercent: 50", "maxEjectionPercent: 75"))
    second = build_snapshot(read_worktree(root, first.snapshot.file_digests), first.snapshot)
    assert second.snapshot is not None
    assert second.reparsed == ("services/shop/cart.yaml",)
    # unchanged objects are the very same objects; the changed one is new
    assert second.snapshot.clusters["east"] is first.snapshot.clusters["east"]
    cart = second.snapshot.services[m.ServiceKey("shop", "cart")]
    assert cart.traffic_policy is not None and cart.traffic_policy.outlier_detection is not None
    assert cart.traffic_policy.outlier_detection.max_ejection_percent == 75


def test_reuse_still_validates_across_objects(fleet_copy: MakeFleet) -> None:
    """A reused (unchanged) file can become wrong because another file changed."""
    root = fleet_copy()
    first = gitops.load_worktree(root)
    (root / "clusters/south.yaml").unlink()
    result = gitops.load(root, previous=first)
    assert result.snapshot is None
    assert {p.code for p in result.problems} >= {"MF0202"}


def test_clusterset_domain_change_updates_reused_hostnames(fleet_copy: MakeFleet) -> None:
    root = fleet_copy()
    first = gitops.load_worktree(root)
    fed = root / "federation.yaml"
    fed.write_text(fed.read_text().replace("clustersetDomain: clusterset.local", "clustersetDomain: mesh.example"))
    (root / "policies/shop/checkout.yaml").write_text(
        (root / "policies/shop/checkout.yaml").read_text().replace("svc.clusterset.local", "svc.mesh.example"))
    s = gitops.load_worktree(root, previous=first)
    assert s.services[m.ServiceKey("shop", "cart")].hostname == "cart.shop.svc.mesh.example"


def test_snapshot_is_immutable() -> None:
    s = gitops.load_worktree(EXAMPLE)
    try:
        s.clusters["x"] = replace(s.clusters["east"])  # type: ignore[index]
    except TypeError:
        pass
    else:  # pragma: no cover
        raise AssertionError("snapshot mappings must be read-only")


def test_binary_literal_stays_text_and_huge_integer_is_a_problem_not_a_crash() -> None:
    # YAML 1.2 core has no 0b literals (ruamel still tags them int); a 5000-digit integer exceeds
    # Python's int-from-str limit and used to escape parse_yaml as a bare ValueError.
    doc, probs = parse_yaml("x.yaml", b"a: 0b101\n")
    assert probs == [] and doc is not None and doc.data == {"a": "0b101"}
    doc, probs = parse_yaml("x.yaml", b"a: 1\nb: " + b"9" * 5000 + b"\n")
    assert doc is None and [p.code for p in probs] == ["MF0004"]
    assert str(probs[0].pos) == "x.yaml:2:4"


def test_gateway_address_may_come_from_the_cluster_and_enrollment_is_per_cluster(fleet_copy: MakeFleet) -> None:
    """eastWestGateway without address (kind: the LB gives it) loads; namespaceSelector defaults to
    Istio's ambient label, takes a Kubernetes LabelSelector, and `{}` enrolls every namespace."""
    from gitops.model import AMBIENT_LABEL

    root = fleet_copy(
        ("replace", "clusters/east.yaml", "    address: 172.30.0.11\n", ""),
        ("replace", "clusters/west.yaml", "  podCIDRs:", "  namespaceSelector:\n    matchLabels:\n      mesh: \"on\"\n"
         "    matchExpressions:\n      - key: tier\n        operator: NotIn\n        values: [db]\n"
         "      - key: legacy\n        operator: DoesNotExist\n  podCIDRs:"),
        ("replace", "clusters/south.yaml", "  podCIDRs:", "  namespaceSelector: {}\n  podCIDRs:"))
    snap = gitops.load_worktree(root)
    east, west, south = (snap.clusters[n] for n in ("east", "west", "south"))
    assert east.east_west_gateway is not None and east.east_west_gateway.address is None
    assert east.east_west_gateway.port == 15008
    assert east.namespace_selector.query() == f"{AMBIENT_LABEL}=ambient"
    assert west.namespace_selector.query() == "mesh=on,tier notin (db),!legacy"
    assert south.namespace_selector.query() == ""
