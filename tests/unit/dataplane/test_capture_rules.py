"""Capture rules (pure) and their sync: only enrolled pods are captured, the node itself never.

Moved here from the lab's topology tests when the rules moved into the proxy (`--capture`), so
that the lab's node namespaces and the kind DaemonSet run one implementation.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from ztunnel.api.config import ProxyConfig, ProxyMode, Stamp, Workload
from ztunnel.proxy.capture_rules import (
    CaptureError,
    CaptureSync,
    CommandResult,
    IptablesCapture,
    choose_backend,
    enrolled_addresses,
    outbound_script,
    pods_script,
)


def wl(name: str, address: str, node: str = "node-1", cluster: str = "east") -> Workload:
    return Workload(uid=f"{cluster}/shop/{name}", name=name, namespace="shop", cluster=cluster, network="n",
                    node=node, address=address, identity=f"spiffe://td/ns/shop/sa/{name}", service_account=name)


def config(*workloads: Workload, mode: ProxyMode = ProxyMode.NODE) -> ProxyConfig:
    return ProxyConfig(proxy_id="ztunnel/east/node-1" if mode is ProxyMode.NODE else "gateway/east", mode=mode,
                       cluster="east", network="n", trust_domain="td", stamp=Stamp(1, "abc", 1),
                       workloads=tuple(workloads))


def test_the_redirect_chain_skips_the_node_itself_and_redirects_tcp_to_the_transparent_port() -> None:
    text = outbound_script(15001)
    assert text.splitlines() == [
        "*nat", ":MESHFED_OUTBOUND - [0:0]",
        "-A MESHFED_OUTBOUND -m addrtype --dst-type LOCAL -j RETURN",   # SOCKS5, HBONE, admin on the node
        "-A MESHFED_OUTBOUND -p tcp -j REDIRECT --to-ports 15001",
        "COMMIT"]
    with pytest.raises(ValueError):
        outbound_script(0)


def test_enrolled_pods_dns_goes_to_the_node_proxy_before_anything_else() -> None:
    """udp and tcp 53 from an enrolled pod, to whatever nameserver, go to the DNS responder (15053)
    — before the TCP capture, which would otherwise take tcp/53 to the outbound port (moved here
    with the rules from the lab's topology: the DNS work put them there first)."""
    lines = outbound_script(15001, dns_port=15053).splitlines()
    assert lines[2:4] == ["-A MESHFED_OUTBOUND -p udp --dport 53 -j REDIRECT --to-ports 15053",
                          "-A MESHFED_OUTBOUND -p tcp --dport 53 -j REDIRECT --to-ports 15053"]
    assert lines.index("-A MESHFED_OUTBOUND -p tcp -j REDIRECT --to-ports 15001") > 3


def test_the_pod_chain_names_exactly_the_enrolled_pods_in_one_commit() -> None:
    text = pods_script(["10.10.2.11", "10.10.1.12", "10.10.1.12"])
    assert text.splitlines() == [
        "*nat", ":MESHFED_PODS - [0:0]",   # declared: flushed and refilled atomically
        "-A MESHFED_PODS -s 10.10.1.12/32 -j MESHFED_OUTBOUND",   # every protocol: udp/53 too
        "-A MESHFED_PODS -s 10.10.2.11/32 -j MESHFED_OUTBOUND",
        "COMMIT"]
    assert pods_script([]).splitlines() == ["*nat", ":MESHFED_PODS - [0:0]", "COMMIT"]  # nobody enrolled
    with pytest.raises(ValueError):
        pods_script(["10.0.0.1; rm -rf /"])


def test_enrolled_pods_are_this_node_s_workloads_of_this_cluster() -> None:
    cfg = config(wl("a", "10.10.1.11"), wl("b", "10.10.2.11", node="node-2"), wl("c", "10.20.1.11", cluster="west"),
                 wl("v6", "fd00::1"))
    assert enrolled_addresses(cfg) == {"10.10.1.11"}
    assert enrolled_addresses(config(wl("a", "10.10.1.11"), mode=ProxyMode.GATEWAY)) == frozenset()


@pytest.mark.parametrize(("legacy", "nft", "backend"), [
    (40, 0, "iptables-legacy"), (0, 40, "iptables-nft"), (0, 0, "iptables"), (None, 3, "iptables"), (5, 5, "iptables"),
])
def test_the_backend_is_the_one_that_already_holds_rules(legacy: int | None, nft: int | None, backend: str) -> None:
    assert choose_backend(legacy, nft) == backend


class FakeIptables:
    def __init__(self, fail_restore: int = 0, chain_exists: bool = False) -> None:
        self.calls: list[tuple[tuple[str, ...], str | None]] = []
        self.fail_restore = fail_restore
        self.chain_exists = chain_exists
        self.jump_present = False
        self.lock = threading.Lock()

    def __call__(self, argv: Sequence[str], stdin: str | None) -> CommandResult:
        with self.lock:
            self.calls.append((tuple(argv), stdin))
        if argv[0].endswith("-save"):
            return CommandResult(0, "-A KUBE-SERVICES -j X\n" if "nft" in argv[0] else "")
        if "-N" in argv:
            return CommandResult(1, "", "iptables: Chain already exists.") if self.chain_exists else CommandResult(0)
        if "-C" in argv:
            return CommandResult(0 if self.jump_present else 1)
        if argv[0].endswith("-restore") and self.fail_restore:
            self.fail_restore -= 1
            return CommandResult(4, "", "iptables-restore: unable to initialize table 'nat'")
        return CommandResult(0)


def test_install_creates_chains_keeps_an_existing_pod_chain_and_hooks_in_first() -> None:
    fake = FakeIptables(chain_exists=True)
    cap = IptablesCapture(15001, run=fake)
    assert cap.backend == "iptables-nft"   # kube-proxy's rules are there
    cap.install()
    argvs = [c[0] for c in fake.calls if not c[0][0].endswith("-save")]
    assert argvs[0] == ("iptables-nft", "-w", "-t", "nat", "-N", "MESHFED_PODS")  # "exists" is fine
    assert argvs[1] == ("iptables-nft-restore", "-w", "--noflush")
    assert ":MESHFED_PODS" not in str(fake.calls[3][1])   # a restarted proxy keeps the pods it captured
    assert argvs[-1] == ("iptables-nft", "-w", "-t", "nat", "-I", "PREROUTING", "1", "-j", "MESHFED_PODS")
    fake.calls.clear()
    fake.jump_present = True
    cap.install()  # idempotent: the jump is not added twice
    assert not any("-I" in c[0] for c in fake.calls)


def test_install_failure_names_what_the_node_lacks() -> None:
    with pytest.raises(CaptureError, match="CAP_NET_ADMIN"):
        IptablesCapture(15001, run=FakeIptables(fail_restore=1)).install()


def test_sync_applies_the_newest_set_and_retries_after_a_failure() -> None:
    fake = FakeIptables(fail_restore=1)
    logs: list[dict[str, object]] = []
    sync = CaptureSync(IptablesCapture(15001, run=fake), lambda **kw: logs.append(kw), retry_s=0.01)
    try:
        sync.update(frozenset({"10.10.1.11"}))
        assert sync.wait_applied(frozenset({"10.10.1.11"}), 5.0)
        assert logs[0]["applied"] is False and logs[-1]["applied"] is True   # failed once, then retried
        sync.update(frozenset())                                              # namespace un-enrolled
        assert sync.wait_applied(frozenset(), 5.0)
        assert logs[-1]["removed"] == ["10.10.1.11"]
        last = [stdin for argv, stdin in fake.calls if argv[0].endswith("-restore")][-1]
        assert last is not None and "-s 10.10.1.11/32" not in last
        assert sync.as_dict()["pods"] == [] and sync.as_dict()["backend"] == "iptables-nft"
    finally:
        sync.stop()
