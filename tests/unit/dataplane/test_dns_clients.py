"""Who the node proxy's DNS responder answers (`ztunnel.dns.clients`, review finding 4): its
captured pods, the `--dns-allow-from` networks and the node itself on loopback; nobody else (on
kind it listens on every address of the node: otherwise an open resolver through kube-dns)."""

from __future__ import annotations

import pytest

from ztunnel.dns.clients import DnsClients, DnsClientsError, parse_networks

PODS = frozenset({"10.244.1.7"})


@pytest.mark.parametrize(("ip", "allowed", "admitted"), [
    ("10.244.1.7", (), True),                     # a captured pod of this node
    ("10.244.1.8", (), False),                    # a pod the config does not list, no network given
    ("10.244.1.8", ("10.244.0.0/16",), True),     # ... in the cluster's pod CIDR
    ("172.18.0.1", ("10.244.0.0/16",), False),    # the node network (every kind node, and the host)
    ("203.0.113.9", ("10.244.0.0/16",), False),   # the LAN / the internet
    ("127.0.0.1", (), True),                      # the node itself
    ("::1", (), True),
    ("127.0.0.2", (), False),                     # loopback is 127.0.0.1 and ::1, not a /8 to bind from
    ("::ffff:10.244.1.7", (), True),              # a dual-stack socket's view of a captured pod
    ("fd00::5", ("10.244.0.0/16",), False),       # another family than the network given
    ("fd00::5", ("fd00::/64",), True),
    ("fe80::1%eth0", ("fe80::/64",), True),
    ("not-an-address", ("0.0.0.0/0",), False),
    ("", (), False),
])
def test_a_source_is_answered_only_when_it_is_a_captured_pod_an_allowed_network_or_the_node(
        ip: str, allowed: tuple[str, ...], admitted: bool) -> None:
    assert DnsClients(parse_networks(allowed)).admits(ip, PODS) is admitted


def test_a_bad_network_names_the_flag_and_the_fix() -> None:
    with pytest.raises(DnsClientsError, match=r"--dns-allow-from 'pods'.*10\.244\.0\.0/16"):
        parse_networks(["pods"])
    assert parse_networks(["10.244.1.9/16", "10.244.0.0/16"]) == parse_networks(["10.244.0.0/16"])


def test_the_kind_daemonset_answers_its_clusters_pod_network_only() -> None:
    from pathlib import Path

    import gitops
    from clusters.kind.manifests import InstallOptions, node_proxy_daemonset
    from clusters.kind.plan import KIND_POD_SUBNET

    snap = gitops.load_worktree(Path(__file__).resolve().parents[3] / "examples" / "fleet")
    for name, cluster in snap.clusters.items():
        args = node_proxy_daemonset(cluster, InstallOptions())["spec"]["template"]["spec"]["containers"][0]["args"]
        given = [args[i + 1] for i, a in enumerate(args) if a == "--dns-allow-from"]
        assert given == (list(cluster.pod_cidrs) or [KIND_POD_SUBNET]), name


def test_the_proxys_dns_clients_are_the_pods_its_capture_rules_redirect() -> None:
    """One decision: the responder's captured pods are `capture_rules.enrolled_addresses` of the
    config the proxy holds now (this node's pods only), and `--dns-allow-from` is parsed."""
    from ztunnel import __main__ as ztunnel_main
    from ztunnel.api.config import ProxyConfig, ProxyMode, Stamp, Workload
    from ztunnel.xds.state import ProxyState

    def pod(name: str, node: str, ip: str) -> Workload:
        return Workload(f"east/shop/{name}", name, "shop", "east", "east", node, ip,
                        "spiffe://east.mesh/ns/shop/sa/default", "default")

    state = ProxyState()
    enrolled = ztunnel_main.enrolled_of(state)
    assert enrolled() == frozenset()
    cfg = ProxyConfig("ztunnel/east/n1", ProxyMode.NODE, "east", "east", "east.mesh", Stamp(1, "a", 1),
                      workloads=(pod("a", "n1", "10.244.1.7"), pod("b", "n2", "10.244.2.7")))
    assert state.apply(cfg).applied
    assert enrolled() == frozenset({"10.244.1.7"})
    args = ztunnel_main.build_parser().parse_args(["--cert-dir", "x", "--dns-allow-from", "10.244.0.0/16",
                                                   "--dns-allow-from", "fd00::/64"])
    assert args.dns_allow_from == ["10.244.0.0/16", "fd00::/64"]
    assert ztunnel_main.build_parser().parse_args(["--cert-dir", "x"]).dns_allow_from == []
