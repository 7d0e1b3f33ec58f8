"""`meshfed plan` and the proxy decide L4 authorization with one evaluator, so they cannot disagree.

Before, planning had its own copy that ignored root-namespace (mesh-wide) policies and treated `[`
in a principal as a glob character class, so `plan` could predict "allow" where the proxy denied.
These tests render real proxy configs and compare planning's answer with the destination proxy's
own inbound decision (`ztunnel.proxy.plan.plan_inbound` over the rendered config), for the two
known disagreements and for generated policies.
"""

from __future__ import annotations

from types import MappingProxyType

from hypothesis import given, settings
from hypothesis import strategies as st

from federation.core.failover import build_engine
from federation.core.offline import offline_observations
from federation.core.planning import authz_allows
from federation.core.render import render_configs
from gitops.model import AuthorizationPolicy, AuthzAction, AuthzRule, AuthzSource, ConfigSnapshot
from tests.unit.core import factory as f
from ztunnel.proxy.plan import plan_inbound
from ztunnel.xds.state import build_indexes

FRONTEND = "spiffe://east.mesh.local/ns/shop/sa/frontend"
CALLERS = (FRONTEND, "spiffe://west.mesh.local/ns/shop/sa/frontend", "spiffe://east.mesh.local/ns/ops/sa/debug",
           "spiffe://south.mesh.local/ns/shop/sa/cart")


def proxy_decides(snap: ConfigSnapshot, identity: str) -> list[tuple[str, bool]]:
    """For every checkout pod in east: does east's node proxy let `identity` in on the pod port?"""
    configs = render_configs(build_engine(snap, offline_observations(snap)))
    out = []
    for pid, cfg in sorted(configs.items()):
        if not pid.startswith("ztunnel/east/"):
            continue
        ix = build_indexes(cfg)
        for w in cfg.workloads:
            if w.node == cfg.proxy_id.rsplit("/", 1)[1] and w.labels.get("app") == "checkout" and w.cluster == "east":
                plan = plan_inbound(cfg, ix, f"{w.address}:8080", identity, [])
                out.append((w.namespace, plan.status == 200))
    assert out, "the fleet has no checkout pod on an east node"
    return out


def planning_decides(snap: ConfigSnapshot, identity: str) -> bool:
    return authz_allows(snap.authorization_policies, "shop", {"app": "checkout"}, identity, 8080, "east.mesh.local")


def policy(ns: str, action: AuthzAction, principals: tuple[str, ...] = (), namespaces: tuple[str, ...] = (),
           name: str = "p") -> AuthorizationPolicy:
    return AuthorizationPolicy(ns, name, action, (AuthzRule((AuthzSource(principals=principals, namespaces=namespaces),)),),
                               selector=MappingProxyType({}))


def test_a_mesh_wide_deny_in_the_root_namespace_is_predicted() -> None:
    snap = f.fleet(authz=[policy("istio-system", AuthzAction.DENY, namespaces=("ops",), name="deny-ops")])
    debug = "spiffe://east.mesh.local/ns/ops/sa/debug"
    assert all(not ok for _, ok in proxy_decides(snap, debug))
    assert planning_decides(snap, debug) is False


def test_a_namespace_of_another_trust_domain_is_not_the_local_namespace_in_plan_or_proxy() -> None:
    """`namespaces: [shop]` on east's checkout means east's shop: west's shop/frontend is another
    team's namespace of the same name. Plan and proxy agree, and say so the same way."""
    west = "spiffe://west.mesh.local/ns/shop/sa/frontend"
    snap = f.fleet(authz=[policy("shop", AuthzAction.ALLOW, namespaces=("shop",), name="shop-only")])
    assert all(ok for _, ok in proxy_decides(snap, FRONTEND)) and planning_decides(snap, FRONTEND) is True
    assert all(not ok for _, ok in proxy_decides(snap, west)) and planning_decides(snap, west) is False
    qualified = f.fleet(authz=[policy("shop", AuthzAction.ALLOW, namespaces=("shop", "west.mesh.local/ns/shop"),
                                      name="shop-and-west-shop")])
    assert all(ok for _, ok in proxy_decides(qualified, west)) and planning_decides(qualified, west) is True


def test_brackets_in_a_principal_are_literal_not_a_character_class() -> None:
    # `[ef]` would match "frontend"'s "f" as a glob class; Istio compares it literally
    snap = f.fleet(authz=[policy("shop", AuthzAction.ALLOW, principals=("east.mesh.local/ns/shop/sa/[ef]rontend",))])
    assert all(not ok for _, ok in proxy_decides(snap, FRONTEND))
    assert planning_decides(snap, FRONTEND) is False


PATTERNS = st.sampled_from(["*", "east.mesh.local/*", "*/ns/shop/sa/frontend", "*/sa/[c]art", "west.mesh.local/ns/shop/sa/frontend",
                            "spiffe://east.mesh.local/ns/ops/sa/debug", "*frontend", "south*"])
NAMESPACES = st.sampled_from(["shop", "ops", "*", "sh*", "[s]hop", "west.mesh.local/ns/shop", "*/ns/shop",
                              "east.mesh.local/ns/*"])
POLICIES = st.lists(st.builds(
    lambda ns, action, principals, namespaces, i: policy(ns, action, tuple(principals), tuple(namespaces), f"p{i}"),
    st.sampled_from(["shop", "istio-system", "ops"]), st.sampled_from(list(AuthzAction)),
    st.lists(PATTERNS, max_size=2), st.lists(NAMESPACES, max_size=2), st.integers(0, 99)),
    max_size=3, unique_by=lambda p: (p.namespace, p.name))


@settings(max_examples=60, deadline=None)
@given(POLICIES, st.sampled_from(CALLERS))
def test_plan_and_proxy_agree_on_generated_policies(policies: list[AuthorizationPolicy], identity: str) -> None:
    snap = f.fleet(authz=policies)
    predicted = planning_decides(snap, identity)
    for _ns, enforced in proxy_decides(snap, identity):
        assert enforced is predicted
