"""The signing policy as a plain class: CSR entitlement (bootstrap token vs mTLS), who may act as
which proxy, trust-domain-bound client verification, and the leaves recorded for staged rotation."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from federation.controller.signing import Requester, SigningPolicy, cluster_named_by
from federation.controller.store import Store
from tests.unit.core.factory import fleet
from ztunnel.api.identity import SpiffeId, generate_key_and_csr, proxy_spiffe_id

EAST_TD = "east.mesh.local"
NODE1 = "ztunnel/east/node-1"
OWN = proxy_spiffe_id(EAST_TD, NODE1)
NODE2 = proxy_spiffe_id(EAST_TD, "ztunnel/east/node-2")
CHECKOUT = "spiffe://east.mesh.local/ns/shop/sa/checkout"      # rendered on node-1
CART = "spiffe://east.mesh.local/ns/shop/sa/cart"              # not rendered on node-1
WEST_CHECKOUT = "spiffe://west.mesh.local/ns/shop/sa/checkout"


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    return Store.in_state_dir(tmp_path / "state")


@pytest.fixture()
def policy(tmp_path: Path, store: Store) -> SigningPolicy:
    rendered = {NODE1: (CHECKOUT,)}
    p = SigningPolicy(tmp_path / "state", store, lambda pid: rendered.get(pid, ()))
    p.load_cas(fleet())
    return p


def san(chain_pem: bytes) -> str:
    leaf = x509.load_pem_x509_certificate(chain_pem)
    return str(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
               .get_values_for_type(x509.UniformResourceIdentifier)[0])


@pytest.mark.parametrize(("bootstrap", "identity", "allowed"), [
    (True, OWN, True),              # a token buys the proxy's own identity ...
    (True, CHECKOUT, False),        # ... only: not the workloads it will serve
    (True, NODE2, False),
    (False, OWN, True),             # over mTLS: its own identity ...
    (False, CHECKOUT, True),        # ... and its rendered workloads' identities
    (False, CART, False),           # not a workload it does not serve
    (False, NODE2, False),          # not another proxy
    (False, WEST_CHECKOUT, False),  # not another trust domain's
])
def test_csr_entitlement(policy: SigningPolicy, bootstrap: bool, identity: str, allowed: bool) -> None:
    who = Requester(NODE1, "" if bootstrap else OWN, bootstrap, "east")
    csr = generate_key_and_csr(identity).csr_pem
    if allowed:
        chain, roots, not_after_s = policy.sign(who, csr, 3600.0)
        assert san(chain[0]) == identity and roots == [policy.cas[EAST_TD].roots_pem()]
        assert not_after_s > time.time() + 3000
    else:
        with pytest.raises(PermissionError, match=r"not entitled|trust domain"):
            policy.sign(who, csr, 3600.0)


def test_a_cluster_without_a_ca_here_is_refused_with_the_reason(policy: SigningPolicy) -> None:
    with pytest.raises(PermissionError, match="cluster 'north' has no CA here"):
        policy.sign(Requester("ztunnel/north/node-1", "", True, "north"), generate_key_and_csr(OWN).csr_pem, 0)


def test_every_leaf_is_recorded_against_its_signing_root(policy: SigningPolicy, store: Store) -> None:
    assert store.leaf_not_after(EAST_TD) == {}
    _chain, _roots, first = policy.sign(Requester(NODE1, "", True, "east"), generate_key_and_csr(OWN).csr_pem, 600.0)
    root = policy.cas[EAST_TD].signing_root
    assert store.leaf_not_after(EAST_TD) == {root: first}
    _chain, _roots, later = policy.sign(Requester(NODE1, OWN, False, "east"), generate_key_and_csr(OWN).csr_pem, 7200.0)
    assert later > first and store.leaf_not_after(EAST_TD) == {root: later}   # the latest not-after wins
    assert {r["trust_domain"] for r in store.ca_roots()} == {EAST_TD, "west.mesh.local", "south.mesh.local"}


def test_the_serving_certificates_are_recorded_leaves_one_per_trust_domain(policy: SigningPolicy,
                                                                           store: Store) -> None:
    """One per trust domain, each signed by that domain's CA and named for SNI, so a proxy of any
    trust domain verifies the controller against its own trust domain's bundle."""
    from ztunnel.api.identity import controller_spiffe_id, controller_tls_name

    tls = policy.serving()
    assert tls.client_roots_pem == policy.roots_pem() and tls.generation == 1
    assert len(tls.pairs) == len(policy.cas) == 3
    for td, (key, chain) in zip(sorted(policy.cas), tls.pairs, strict=True):
        assert b"PRIVATE KEY" in key
        leaf = x509.load_pem_x509_certificate(chain)
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == [controller_tls_name(td)]
        assert names.get_values_for_type(x509.UniformResourceIdentifier) == [controller_spiffe_id(td)]
        leaf.verify_directly_issued_by(policy.cas[td].roots[0].cert)
        assert store.leaf_not_after(td)  # a live leaf of its root: the rotation gate waits for it


def test_server_tls_without_a_ca_says_what_is_missing(tmp_path: Path, store: Store) -> None:
    with pytest.raises(RuntimeError, match="load the fleet's CAs first"):
        SigningPolicy(tmp_path / "state", store).serving()


@pytest.mark.parametrize(("proxy_id", "username", "extra", "code"), [
    (NODE1, "system:serviceaccount:meshfed-system:ztunnel", {"pod-name": ["ztunnel-a"], "node-name": ["node-1"]}, ""),
    ("gateway/east", "system:serviceaccount:meshfed-system:eastwest-gateway", {"pod-name": ["gw-a"]}, ""),
    # another node's pod
    (NODE1, "system:serviceaccount:meshfed-system:ztunnel", {"pod-name": ["ztunnel-b"], "node-name": ["node-2"]},
     "permission_denied"),
    # a token that names no node cannot bind a node proxy
    (NODE1, "system:serviceaccount:meshfed-system:ztunnel", {"pod-name": ["ztunnel-a"]}, "permission_denied"),
    # not bound to a pod (a legacy Secret token)
    (NODE1, "system:serviceaccount:meshfed-system:ztunnel", {"node-name": ["node-1"]}, "permission_denied"),
    # another service account, or the same name in another namespace
    (NODE1, "system:serviceaccount:shop:ztunnel", {"pod-name": ["x"], "node-name": ["node-1"]}, "permission_denied"),
    (NODE1, "system:serviceaccount:meshfed-system:eastwest-gateway", {"pod-name": ["x"], "node-name": ["node-1"]},
     "permission_denied"),
    ("gateway/east", "system:serviceaccount:meshfed-system:ztunnel", {"pod-name": ["x"]}, "permission_denied"),
])
def test_service_account_token_binding(proxy_id: str, username: str, extra: dict[str, list[str]], code: str) -> None:
    from clusters.kube.auth import TokenReviewResult
    from federation.controller.signing import check_service_account

    review = TokenReviewResult(True, username, extra={f"authentication.kubernetes.io/{k}": tuple(v)
                                                      for k, v in extra.items()}, audiences=("meshfed-controller",))
    assert check_service_account(proxy_id, review).code == code


def test_a_token_not_authenticated_or_for_another_audience_is_refused() -> None:
    from clusters.kube.auth import TokenReviewResult
    from federation.controller.signing import check_service_account

    v = check_service_account(NODE1, TokenReviewResult(False, error="token has expired"))
    assert v.code == "unauthenticated" and "token has expired" in v.reason
    good_but_for_the_api_server = TokenReviewResult(
        True, "system:serviceaccount:meshfed-system:ztunnel", audiences=("https://kubernetes.default.svc",),
        extra={"authentication.kubernetes.io/pod-name": ("z",), "authentication.kubernetes.io/node-name": ("node-1",)})
    assert check_service_account(NODE1, good_but_for_the_api_server).code == "unauthenticated"


def test_an_empty_audience_list_in_the_review_is_a_refusal() -> None:
    """Review finding 9: we name our audience in every TokenReview, and Kubernetes documents an empty
    `status.audiences` (with authenticated=true) as "valid for the API server's own audience": an
    API-server token, which must not buy a proxy certificate. The same review naming our audience passes."""
    from clusters.kube.auth import TokenReviewResult
    from federation.controller.signing import check_service_account

    bound = {"authentication.kubernetes.io/pod-name": ("z",), "authentication.kubernetes.io/node-name": ("node-1",)}
    no_audience = TokenReviewResult(True, "system:serviceaccount:meshfed-system:ztunnel", audiences=(), extra=bound)
    v = check_service_account(NODE1, no_audience)
    assert v.code == "unauthenticated" and "meshfed-controller" in v.reason and "API server" in v.reason
    ours = TokenReviewResult(True, "system:serviceaccount:meshfed-system:ztunnel", audiences=("meshfed-controller",),
                             extra=bound)
    assert check_service_account(NODE1, ours).ok


def test_client_verification_is_bound_to_the_trust_domain(policy: SigningPolicy) -> None:
    own = policy.cas[EAST_TD].issue_svid(OWN)
    assert policy.verify_client(own.chain_pem) == OWN
    # west's CA mints east's identity: the pooled roots would accept it, the bound check must not
    key = ec.generate_private_key(ec.SECP256R1())
    forged = policy.cas["west.mesh.local"]._sign_leaf(SpiffeId.parse(OWN), key.public_key(), time.time(), None)
    with pytest.raises(PermissionError):
        policy.verify_client(forged)


def test_authorize_uses_the_loaded_fleets_clusters(policy: SigningPolicy) -> None:
    assert policy.authorize(NODE1, OWN) == ""
    assert "may not act as proxy" in policy.authorize(NODE1, NODE2)
    assert "not in the fleet repo" in policy.authorize("ztunnel/north/node-1", OWN)


@pytest.mark.parametrize(("proxy_id", "cluster"), [("ztunnel/east/node-1", "east"), ("gateway/west", "west"),
                                                    ("ztunnel", ""), ("", ""),
                                                    # read one way here and another elsewhere: no cluster
                                                    ("ztunnel/east/node-1/x", ""), ("ztunnel/East/node-1", "")])
def test_cluster_named_by(proxy_id: str, cluster: str) -> None:
    assert cluster_named_by(proxy_id) == cluster


def test_a_csr_asking_for_2_to_the_32_seconds_gets_the_workload_cert_ttl(policy: SigningPolicy) -> None:
    """The proto's ttl_s is a uint32: the most a proxy can ask for is ~136 years; it gets the trust
    domain's workloadCertTTL (24 h in the example fleet), not a leaf as old as the root."""
    who = Requester(NODE1, OWN, False, "east")
    before = time.time()
    _chain, _roots, not_after_s = policy.sign(who, generate_key_and_csr(OWN).csr_pem, float(2 ** 32 - 1))
    ttl_s = policy.trust_domains[EAST_TD].ca.workload_cert_ttl_s
    assert before + ttl_s - 5 <= not_after_s <= time.time() + ttl_s + 5


def test_the_certificates_issued_to_each_proxy_are_kept_across_restarts(tmp_path: Path, policy: SigningPolicy,
                                                                       store: Store) -> None:
    """`meshfed check` judges each proxy's certificate expiry by what was issued to it: of the
    identities it needs now (its own, its rendered workloads'), the one that expires first."""
    assert policy.proxy_certificates(NODE1) is None
    policy.sign(Requester(NODE1, "", True, "east"), generate_key_and_csr(OWN).csr_pem, 7200.0)
    _c, _r, checkout_na = policy.sign(Requester(NODE1, OWN, False, "east"),
                                      generate_key_and_csr(CHECKOUT).csr_pem, 600.0)
    got = policy.proxy_certificates(NODE1)
    assert got is not None and (got.identity, got.not_after_s) == (CHECKOUT, checkout_na)
    assert (got.identities, got.missing) == (2, 0)
    # the controller restarts: the same from the store
    again = SigningPolicy(tmp_path / "state", store, lambda pid: (CHECKOUT,) if pid == NODE1 else ())
    again.load_cas(fleet())
    assert again.proxy_certificates(NODE1) == got
    # checkout leaves the node: its certificate is not renewed and no longer counts
    later = SigningPolicy(tmp_path / "state", store, lambda pid: ())
    later.load_cas(fleet())
    moved = later.proxy_certificates(NODE1)
    assert moved is not None and moved.identity == OWN and moved.identities == 1
    later.forget_proxies([NODE1])
    store.forget_proxies([NODE1])
    assert later.proxy_certificates(NODE1) is None and store.proxy_certificates() == {}
