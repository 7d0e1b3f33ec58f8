"""L4 authorization as a decision table: DENY first, then ALLOW, then allow by default."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.api import authz
from ztunnel.api.config import Authorization, AuthzMatch

CALLER = "spiffe://east.mesh/ns/shop/sa/frontend"
OTHER = "spiffe://east.mesh/ns/ops/sa/debug"
WEST_SHOP = "spiffe://west.mesh/ns/shop/sa/frontend"   # another trust domain's namespace of the same name
LOCAL_TD = "east.mesh"                                  # the destination's trust domain


def pol(action: str, *rules: AuthzMatch, name: str = "p", namespace: str = "shop",
        selector: dict[str, str] | None = None) -> Authorization:
    return Authorization(name=name, namespace=namespace, action=action, rules=rules, selector=selector or {})


def decide(policies: list[Authorization], principal: str = CALLER, port: int = 8080,
           dest_ns: str = "shop", labels: dict[str, str] | None = None) -> authz.Decision:
    return authz.evaluate(policies, peer=authz.peer_from_identity(principal), dest_namespace=dest_ns,
                          dest_labels=labels or {"app": "cart"}, port=port, local_trust_domain=LOCAL_TD)


@pytest.mark.parametrize(("rule", "principal", "port", "matches"), [
    # principals: Istio form and spiffe:// form, exact and wildcards
    (AuthzMatch(principals=("east.mesh/ns/shop/sa/frontend",)), CALLER, 8080, True),
    (AuthzMatch(principals=(CALLER,)), CALLER, 8080, True),
    (AuthzMatch(principals=("east.mesh/ns/shop/sa/*",)), CALLER, 8080, True),
    (AuthzMatch(principals=("*/ns/shop/sa/*",)), CALLER, 8080, True),
    (AuthzMatch(principals=("*",)), CALLER, 8080, True),
    (AuthzMatch(principals=("*",)), "", 8080, False),  # a peer without identity matches no principal
    (AuthzMatch(principals=("west.mesh/ns/shop/sa/frontend",)), CALLER, 8080, False),
    (AuthzMatch(not_principals=("east.mesh/ns/shop/sa/frontend",)), CALLER, 8080, False),
    (AuthzMatch(not_principals=("east.mesh/ns/ops/*",)), CALLER, 8080, True),
    # namespaces (taken from the verified identity)
    (AuthzMatch(namespaces=("shop",)), CALLER, 8080, True),
    (AuthzMatch(namespaces=("ops",)), CALLER, 8080, False),
    (AuthzMatch(namespaces=("sh*",)), CALLER, 8080, True),
    (AuthzMatch(not_namespaces=("shop",)), CALLER, 8080, False),
    (AuthzMatch(not_namespaces=("ops",)), CALLER, 8080, True),
    # ... in the destination's trust domain: west's `shop` is not east's `shop` unless the rule says so
    (AuthzMatch(namespaces=("shop",)), WEST_SHOP, 8080, False),
    (AuthzMatch(namespaces=("sh*",)), WEST_SHOP, 8080, False),
    (AuthzMatch(namespaces=("*",)), WEST_SHOP, 8080, False),
    (AuthzMatch(namespaces=("west.mesh/ns/shop",)), WEST_SHOP, 8080, True),
    (AuthzMatch(namespaces=("west.mesh/ns/*",)), WEST_SHOP, 8080, True),
    (AuthzMatch(namespaces=("*/ns/shop",)), WEST_SHOP, 8080, True),
    (AuthzMatch(namespaces=("*/ns/shop",)), CALLER, 8080, True),
    (AuthzMatch(namespaces=("east.mesh/ns/shop",)), CALLER, 8080, True),
    (AuthzMatch(namespaces=("east.mesh/ns/shop",)), WEST_SHOP, 8080, False),
    (AuthzMatch(namespaces=("west.mesh/ns/shop",)), CALLER, 8080, False),
    (AuthzMatch(not_namespaces=("shop",)), WEST_SHOP, 8080, True),
    (AuthzMatch(not_namespaces=("*/ns/shop",)), WEST_SHOP, 8080, False),
    (AuthzMatch(namespaces=("*/ns/*",)), "", 8080, False),  # a peer without identity has no namespace
    # ports
    (AuthzMatch(ports=(8080,)), CALLER, 8080, True),
    (AuthzMatch(ports=(9090,)), CALLER, 8080, False),
    (AuthzMatch(not_ports=(8080,)), CALLER, 8080, False),
    (AuthzMatch(not_ports=(9090,)), CALLER, 8080, True),
    # every set field must match (AND)
    (AuthzMatch(namespaces=("shop",), ports=(9090,)), CALLER, 8080, False),
    (AuthzMatch(namespaces=("shop",), ports=(8080,), not_principals=(OTHER,)), CALLER, 8080, True),
    # an empty rule matches everything
    (AuthzMatch(), CALLER, 8080, True),
])
def test_rule_matching(rule: AuthzMatch, principal: str, port: int, matches: bool) -> None:
    assert authz.rule_matches(rule, authz.peer_from_identity(principal), port, LOCAL_TD) is matches


ALLOW_CALLER = pol("ALLOW", AuthzMatch(principals=(CALLER,)), name="allow-frontend")
ALLOW_OTHER = pol("ALLOW", AuthzMatch(principals=(OTHER,)), name="allow-debug")
DENY_CALLER = pol("DENY", AuthzMatch(namespaces=("shop",)), name="deny-shop")
DENY_OTHER_PORT = pol("DENY", AuthzMatch(ports=(22,)), name="deny-ssh")
ALLOW_NOTHING = pol("ALLOW", name="allow-nothing")  # ALLOW with no rules: denies all
DENY_NOTHING = pol("DENY", name="deny-nothing")     # DENY with no rules: matches nothing


@pytest.mark.parametrize(("policies", "allowed", "deciding"), [
    ([], True, ""),                                            # no policy: allowed
    ([ALLOW_CALLER], True, "shop/allow-frontend"),
    ([ALLOW_OTHER], False, "shop/allow-debug"),                # ALLOW present, none matches: denied
    ([ALLOW_OTHER, ALLOW_CALLER], True, "shop/allow-frontend"),  # any matching ALLOW suffices
    ([DENY_CALLER], False, "shop/deny-shop"),
    ([DENY_OTHER_PORT], True, ""),                             # DENY that does not match: allowed
    ([ALLOW_CALLER, DENY_CALLER], False, "shop/deny-shop"),    # DENY first, whatever the order
    ([DENY_CALLER, ALLOW_CALLER], False, "shop/deny-shop"),
    ([ALLOW_CALLER, DENY_OTHER_PORT], True, "shop/allow-frontend"),
    ([ALLOW_NOTHING], False, "shop/allow-nothing"),
    ([DENY_NOTHING], True, ""),
])
def test_decision_matrix(policies: list[Authorization], allowed: bool, deciding: str) -> None:
    d = decide(policies)
    assert d.allowed is allowed
    assert d.policy == deciding
    if not allowed:
        assert deciding in d.reason  # the refusal names the policy


@pytest.mark.parametrize(("policy", "applies"), [
    (pol("DENY", AuthzMatch(), namespace="shop"), True),
    (pol("DENY", AuthzMatch(), namespace="istio-system"), True),         # root namespace: mesh-wide
    (pol("DENY", AuthzMatch(), namespace="ops"), False),                 # another namespace's policy
    (pol("DENY", AuthzMatch(), selector={"app": "cart"}), True),
    (pol("DENY", AuthzMatch(), selector={"app": "web"}), False),
    (pol("DENY", AuthzMatch(), selector={"app": "cart", "tier": "x"}), False),  # selector ⊆ labels
])
def test_scope_namespace_root_and_selector(policy: Authorization, applies: bool) -> None:
    assert decide([policy]).allowed is not applies


def test_deny_reason_for_unmatched_allow_names_the_peer_and_port() -> None:
    d = decide([ALLOW_OTHER], port=8443)
    assert CALLER in d.reason and "8443" in d.reason


def test_a_deny_on_a_namespace_does_not_reach_another_trust_domains_namespace_of_that_name() -> None:
    deny_shop = pol("DENY", AuthzMatch(namespaces=("shop",)), name="deny-shop")
    assert decide([deny_shop], WEST_SHOP).allowed
    deny_any_shop = pol("DENY", AuthzMatch(namespaces=("*/ns/shop",)), name="deny-any-shop")
    assert not decide([deny_any_shop], WEST_SHOP).allowed


def test_peer_namespace_comes_from_the_identity() -> None:
    assert authz.peer_from_identity(CALLER) == authz.Peer(CALLER, "shop", "east.mesh")
    assert authz.peer_from_identity("spiffe://td/not/a/workload").namespace == ""


@given(st.permutations([ALLOW_CALLER, ALLOW_OTHER, DENY_OTHER_PORT, DENY_NOTHING, ALLOW_NOTHING]),
       st.sampled_from([22, 8080, 9090]), st.sampled_from([CALLER, OTHER]))
def test_decision_does_not_depend_on_policy_order(policies: list[Authorization], port: int, who: str) -> None:
    assert decide(policies, who, port) == decide(sorted(policies, key=lambda p: p.key), who, port)


@pytest.mark.parametrize(("pattern", "value", "matches"), [
    ("*/ns/shop/sa/fr?ntend", "east.mesh/ns/shop/sa/frontend", False),   # `?` is literal, as in Istio
    ("*/ns/shop/sa/[f]rontend", "east.mesh/ns/shop/sa/frontend", False),  # so is `[`
    ("*/ns/shop/sa/fr?ntend", "east.mesh/ns/shop/sa/fr?ntend", True),
    ("east.*/ns/shop/sa/*", "east.mesh/ns/shop/sa/frontend", True),
    ("*", "", False),
])
def test_only_star_is_a_wildcard(pattern: str, value: str, matches: bool) -> None:
    assert authz.match_value(pattern, value) is matches
