"""Proxy ids: one strict parser (`ztunnel.api.identity.ProxyId`) for every place that builds or
reads `ztunnel/<cluster>/<node>` / `gateway/<cluster>`, so one id never names two proxies and two
ids never name one (CSR entitlement, bootstrap token scope, ServiceAccount node binding, status)."""

from __future__ import annotations

import itertools

import pytest

from clusters.kube.auth import NODE_NAME_EXTRA, POD_NAME_EXTRA, TokenReviewResult
from clusters.lab.layout import LabError, proxy_pod_name
from federation.controller.bootstrap import BootstrapTokens, proxy_cluster
from federation.controller.signing import check_service_account, cluster_named_by
from ztunnel.api.identity import IdentityError, ProxyId, SpiffeId, proxy_service_account, proxy_spiffe_id
from ztunnel.xds.controlplane import header_for
from ztunnel.xds.state import node_name

VALID = ["ztunnel/east/node-1", "gateway/west", "ztunnel/east/ip-10-0-0-1.ec2.internal", "ztunnel/a/b.c",
         "ztunnel/a/b", "gateway/a", "ztunnel/a-b/c", "ztunnel/0/0",
         "waypoint/east/shop/waypoint", "ingress/east/shop/gw", "waypoint/east/shop/a.b"]

MALFORMED = [
    "", "ztunnel", "gateway", "ztunnel/east", "ztunnel/east/",      # too few parts
    "ztunnel/east/node-1/x", "gateway/east/node-1", "gateway/east/",  # too many: a node would be read as two
    "ztunnel//node-1", "/east/node-1", "gateway//",                   # empty parts
    "sidecar/east/node-1", "Ztunnel/east/node-1",                     # unknown kind
    "ztunnel/East/node-1", "ztunnel/east/Node-1",                     # case: never folded
    "ztunnel/a.b/c",                                                  # a cluster is a label (no dot)
    "ztunnel/east/node-1\n", " ztunnel/east/node-1", "gateway/east ",  # whitespace, trailing newline
    "ztunnel/east/node_1", "ztunnel/east/-node", "ztunnel/east/node.", "ztunnel/east/a..b",
    "ztunnel/east/..", "ztunnel/east/%2e", "gateway/" + "a" * 64,
    "waypoint/east/shop", "waypoint/east/shop/w/x", "waypoint/east/Shop/w", "waypoint/east/s.x/w",  # L7 proxies
    "ingress/east//gw", "waypoint/east/shop/W",
]


@pytest.mark.parametrize("s", VALID)
def test_a_valid_proxy_id_round_trips_exactly(s: str) -> None:
    pid = ProxyId.parse(s)
    assert str(pid) == s
    assert pid.is_node == s.startswith("ztunnel/") and pid.kind == s.split("/")[0]
    assert SpiffeId.parse(pid.spiffe_id("east.mesh.local"))   # always a valid identity


@pytest.mark.parametrize("s", MALFORMED)
def test_anything_else_is_refused_with_the_expected_form(s: str) -> None:
    with pytest.raises(IdentityError, match=r"ztunnel/<cluster>/<node>, gateway/<cluster>, waypoint/"):
        ProxyId.parse(s)


def test_constructors_validate_too() -> None:
    assert str(ProxyId.node_proxy("east", "node-1")) == "ztunnel/east/node-1"
    assert str(ProxyId.gateway("east")) == "gateway/east"
    for bad in (lambda: ProxyId.node_proxy("east", ""), lambda: ProxyId.node_proxy("e/x", "n"),
                lambda: ProxyId("gateway", "east", "node-1"), lambda: ProxyId("ingress", "east")):
        with pytest.raises(IdentityError):
            bad()


def test_the_proxy_identity_is_injective() -> None:
    ids = sorted({*VALID, "ztunnel/a/b-c", "gateway/ztunnel", "gateway/a-b"})
    spiffe = {s: proxy_spiffe_id("east.mesh.local", s) for s in ids}
    for a, b in itertools.combinations(ids, 2):
        assert spiffe[a] != spiffe[b], (a, b)
    # the one id that would have shared `ztunnel.a.b.c` with ztunnel/a/b.c is not an id
    with pytest.raises(IdentityError):
        proxy_spiffe_id("east.mesh.local", "ztunnel/a.b/c")


@pytest.mark.parametrize("s", ["ztunnel/east/node-1/x", "ztunnel/east/Node-1", "ztunnel/east/node-1\n",
                               "gateway/east/x"])
def test_every_reader_of_proxy_ids_refuses_the_malformed(s: str, tmp_path: object) -> None:
    from pathlib import Path

    from ztunnel.api.config import ProxyConfig, ProxyMode, Stamp

    with pytest.raises(ValueError):
        header_for(s, "east.mesh.local")            # the proxy's hello (status reads it)
    with pytest.raises(ValueError):
        proxy_cluster(s)                             # bootstrap token scope
    with pytest.raises(ValueError):
        BootstrapTokens(Path(str(tmp_path))).create(s)
    with pytest.raises(ValueError):
        proxy_service_account(s)
    with pytest.raises(LabError):
        proxy_pod_name(s)                            # the lab's pod a token is bound to
    with pytest.raises(ValueError):
        node_name(ProxyConfig(proxy_id=s, mode=ProxyMode.NODE, cluster="east", network="",
                              trust_domain="east.mesh.local", stamp=Stamp(0, "", 0)))
    assert cluster_named_by(s) == ""                 # CSR entitlement: no cluster, refused
    review = TokenReviewResult(True, "system:serviceaccount:meshfed-system:ztunnel", audiences=("meshfed-controller",),
                               extra={POD_NAME_EXTRA: ("ztunnel-a",), NODE_NAME_EXTRA: ("node-1",)})
    assert check_service_account(s, review).code == "permission_denied"


def test_readers_agree_on_a_valid_id() -> None:
    from ztunnel.api.config import ProxyConfig, ProxyMode, Stamp

    s = "ztunnel/east/ip-10-0-0-1.ec2.internal"
    cfg = ProxyConfig(proxy_id=s, mode=ProxyMode.NODE, cluster="east", network="", trust_domain="east.mesh.local",
                      stamp=Stamp(0, "", 0))
    assert node_name(cfg) == "ip-10-0-0-1.ec2.internal" == ProxyId.parse(s).node
    assert cluster_named_by(s) == proxy_cluster(s) == header_for(s, "east.mesh.local").cluster == "east"
    assert proxy_pod_name(s) == "ztunnel-ip-10-0-0-1.ec2.internal"
    review = TokenReviewResult(True, "system:serviceaccount:meshfed-system:ztunnel", audiences=("meshfed-controller",),
                               extra={POD_NAME_EXTRA: ("z",), NODE_NAME_EXTRA: ("ip-10-0-0-1.ec2.internal",)})
    assert check_service_account(s, review).ok
    gw = ProxyConfig(proxy_id="gateway/east", mode=ProxyMode.GATEWAY, cluster="east", network="",
                     trust_domain="east.mesh.local", stamp=Stamp(0, "", 0))
    assert node_name(gw) == ""   # a gateway runs on no node of ours (it was read as node "east")


def test_the_proxy_refuses_a_malformed_proxy_id_at_its_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    from ztunnel.__main__ import build_parser

    base = ["--cert-dir", "/nonexistent"]
    assert build_parser().parse_args([*base, "--proxy-id", "gateway/east"]).proxy_id == "gateway/east"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--proxy-id", "ztunnel/east/Node-1"])
    assert "argument --proxy-id: proxy id 'ztunnel/east/Node-1'" in capsys.readouterr().err


def test_an_l7_proxy_runs_as_its_gateway_s_service_account_in_its_namespace() -> None:
    wp, ing = ProxyId.parse("waypoint/east/shop/wp"), ProxyId.parse("ingress/east/shop/gw")
    assert (wp.service_account_namespace, wp.service_account) == ("shop", "wp")        # as Istio deploys them
    assert (ing.service_account_namespace, ing.service_account) == ("shop", "gw-istio")
    assert ProxyId.parse("ztunnel/east/n").service_account_namespace == "meshfed-system"
