"""Transparent outbound capture in a node's network namespace: which pods, with which rules.

One implementation for every place a node proxy runs: the lab's node namespaces and the kind
DaemonSet (hostNetwork, so the node's own namespace) both run `python -m ztunnel --capture`, and
the proxy programs these rules itself. Nothing else in meshfed writes capture rules.

Only enrolled pods are captured, as in Istio ambient: a pod is captured when it is one of this
node's workloads in the proxy's config. The controller puts a pod there only if discovery saw it
in a namespace the Cluster's namespaceSelector matches (default `istio.io/dataplane-mode=ambient`),
so labelling or un-labelling a namespace reaches the node as a config push and takes effect for
new connections without restarting any pod.

    nat PREROUTING   -j MESHFED_PODS                             (first rule: before kube-proxy's)
    MESHFED_PODS     -s <pod>/32 -j MESHFED_OUTBOUND             (one per enrolled pod on the node)
    MESHFED_OUTBOUND -p udp --dport 53 -j REDIRECT --to-ports 15053   (with --dns: the pod's DNS,
                     -p tcp --dport 53 -j REDIRECT --to-ports 15053    whatever the nameserver, as istio-cni)
                     -m addrtype --dst-type LOCAL -j RETURN      (the node itself: SOCKS5, HBONE, admin)
                     -p tcp -j REDIRECT --to-ports 15001         (the proxy's transparent listener)

The proxy recovers the destination with SO_ORIGINAL_DST (`ztunnel.proxy.capture`); its DNS
responder (`ztunnel.dns`) answers the mesh's global names. A pod that is not enrolled keeps the
cluster's own DNS and talks to the network directly.

Decide, then act: `outbound_script` and `pods_script` are pure (iptables-restore text; a declared
chain is flushed and refilled in one commit, so a pod is never half-captured); `IptablesCapture`
runs them; `CaptureSync` applies the newest wanted set in its own thread (latest wins), so a slow
`iptables -w` never blocks the proxy's event loop.

Failure modes: when the proxy dies its rules stay, so captured pods' connections are refused
(fail closed, never around the mesh); a restarted proxy keeps the previous pod chain until its
first config replaces it. The backend (legacy or nft) is the one that already holds rules, as
Kubernetes' iptables-wrapper decides, so our rules sit next to kube-proxy's.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ztunnel.api.config import ProxyConfig, ProxyMode
from ztunnel.api.identity import ProxyId
from ztunnel.api.ports import DNS_PORT, OUTBOUND_CAPTURE_PORT

OUTBOUND_CHAIN = "MESHFED_OUTBOUND"
PODS_CHAIN = "MESHFED_PODS"
MAX_CAPTURED_PODS = 10_000      # a node holds ~110 pods (kubelet's default); refuse absurd configs
IPTABLES_TIMEOUT_S = 30.0

Runner = Callable[[Sequence[str], str | None], "CommandResult"]

logger = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """The capture rules could not be installed; the message says what the node is missing."""


@dataclass(frozen=True, slots=True)
class CommandResult:
    returncode: int
    stdout: str = ""
    stderr: str = ""


# --- pure --------------------------------------------------------------------------------------


def enrolled_addresses(cfg: ProxyConfig) -> frozenset[str]:
    """The IPv4 addresses of this node's workloads in the config: the pods to capture."""
    if cfg.mode is not ProxyMode.NODE:
        return frozenset()
    node = ProxyId.parse(cfg.proxy_id).node
    out = set()
    for w in cfg.workloads:
        if w.node != node or w.cluster != cfg.cluster:
            continue
        try:
            out.add(str(ipaddress.IPv4Address(w.address)))
        except ValueError:
            continue  # not an IPv4 pod address: nothing iptables (v4) could match
    return frozenset(out)


def outbound_script(port: int = OUTBOUND_CAPTURE_PORT, dns_port: int | None = None) -> str:
    """iptables-restore input (--noflush) that (re)writes the redirect chain; with `dns_port`, the
    enrolled pods' DNS (udp and tcp 53) goes to the proxy's DNS responder first."""
    for p in (port, dns_port):
        if p is not None and not 1 <= p <= 65535:
            raise ValueError(f"capture port {p} is out of range 1..65535")
    dns = [f"-A {OUTBOUND_CHAIN} -p {proto} --dport {DNS_PORT} -j REDIRECT --to-ports {dns_port}"
           for proto in ("udp", "tcp")] if dns_port is not None else []
    return "\n".join([
        "*nat",
        f":{OUTBOUND_CHAIN} - [0:0]",
        *dns,
        f"-A {OUTBOUND_CHAIN} -m addrtype --dst-type LOCAL -j RETURN",
        f"-A {OUTBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {port}",
        "COMMIT", ""])


def pods_script(addresses: Iterable[str]) -> str:
    """iptables-restore input (--noflush) that makes the pod chain capture exactly `addresses`."""
    pods = sorted({str(ipaddress.IPv4Address(a)) for a in addresses}, key=ipaddress.IPv4Address)
    if len(pods) > MAX_CAPTURED_PODS:
        raise ValueError(f"{len(pods)} pods to capture on one node; at most {MAX_CAPTURED_PODS}")
    return "\n".join(["*nat", f":{PODS_CHAIN} - [0:0]",
                      *(f"-A {PODS_CHAIN} -s {a}/32 -j {OUTBOUND_CHAIN}" for a in pods), "COMMIT", ""])


JUMP = ("-t", "nat", "PREROUTING", "-j", PODS_CHAIN)


def choose_backend(legacy_rules: int | None, nft_rules: int | None) -> str:
    """`iptables-legacy` or `iptables-nft`: the one with more rules already (kube-proxy's), as
    iptables-wrapper decides; `iptables` (the system default) when neither holds any or only one
    variant is installed."""
    if legacy_rules is None or nft_rules is None or legacy_rules == nft_rules:
        return "iptables"
    return "iptables-legacy" if legacy_rules > nft_rules else "iptables-nft"


def count_rules(save_output: str) -> int:
    return sum(1 for line in save_output.splitlines() if line.startswith("-A "))


# --- acting -------------------------------------------------------------------------------------


def run_command(argv: Sequence[str], stdin: str | None) -> CommandResult:
    try:
        r = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=IPTABLES_TIMEOUT_S,
                           check=False)
    except FileNotFoundError:
        return CommandResult(127, "", f"{argv[0]}: not found")
    except subprocess.TimeoutExpired:
        return CommandResult(124, "", f"{argv[0]} did not finish within {IPTABLES_TIMEOUT_S:.0f} s (xtables lock?)")
    return CommandResult(r.returncode, r.stdout, r.stderr)


class IptablesCapture:
    """Runs the scripts with one iptables backend in the current network namespace."""

    def __init__(self, port: int = OUTBOUND_CAPTURE_PORT, run: Runner = run_command,
                 backend: str | None = None, dns_port: int | None = None) -> None:
        self.port, self.dns_port = port, dns_port
        self.run = run
        self.backend = backend or self._detect()

    def _detect(self) -> str:
        counts: list[int | None] = []
        for variant in ("iptables-legacy-save", "iptables-nft-save"):
            r = self.run([variant, "-t", "nat"], None)  # 127 when that variant is not installed
            counts.append(count_rules(r.stdout) if r.returncode == 0 else None)
        return choose_backend(counts[0], counts[1])

    def _check(self, r: CommandResult, what: str) -> None:
        if r.returncode != 0:
            raise CaptureError(f"{what} failed (exit {r.returncode}): {r.stderr.strip()[:500]}; transparent capture "
                               f"needs {self.backend} and CAP_NET_ADMIN in the node's network namespace "
                               f"(the DaemonSet grants NET_ADMIN; the lab runs as root)")

    def install(self) -> None:
        """Create the chains (keeping an existing pod chain: a restarted proxy stays fail-closed),
        rewrite the redirect chain, and hook the pod chain in first."""
        r = self.run([self.backend, "-w", "-t", "nat", "-N", PODS_CHAIN], None)
        if r.returncode != 0 and "exists" not in r.stderr:
            self._check(r, f"{self.backend} -t nat -N {PODS_CHAIN}")
        self._check(self.run([f"{self.backend}-restore", "-w", "--noflush"], outbound_script(self.port, self.dns_port)),
                    f"{self.backend}-restore (the {OUTBOUND_CHAIN} chain)")
        table, chain, *rule = JUMP[1:]
        if self.run([self.backend, "-w", "-t", table, "-C", chain, *rule], None).returncode != 0:
            self._check(self.run([self.backend, "-w", "-t", table, "-I", chain, "1", *rule], None),
                        f"{self.backend} -t nat -I PREROUTING 1 … -j {PODS_CHAIN}")

    def sync(self, addresses: Iterable[str]) -> None:
        self._check(self.run([f"{self.backend}-restore", "-w", "--noflush"], pods_script(addresses)),
                    f"{self.backend}-restore (the {PODS_CHAIN} chain)")


@dataclass
class CaptureStatus:
    wanted: frozenset[str] | None = None
    applied: frozenset[str] | None = None
    syncs: int = 0
    last_error: str = ""


class CaptureSync:
    """Keeps the pod chain equal to the newest wanted set, in a daemon thread (latest wins).

    Invariant: `status.applied` is the set the kernel holds (as of the last successful sync); a
    failed sync is retried with the newest set after `retry_s`.
    """

    def __init__(self, capture: IptablesCapture, log: Callable[..., None] | None = None, retry_s: float = 1.0) -> None:
        self.capture = capture
        if log is None:
            from ztunnel.api.logsetup import event_log

            log = event_log(logger, lambda f: logging.INFO if f.get("applied", True) else logging.WARNING)
        self.log = log
        self.retry_s = retry_s
        self.status = CaptureStatus()
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="capture-sync", daemon=True)
        self._thread.start()

    def update(self, addresses: frozenset[str]) -> None:
        with self._cv:
            self.status.wanted = addresses
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and (self.status.wanted is None or self.status.wanted == self.status.applied):
                    self._cv.wait()
                if self._stopped:
                    return
                wanted = self.status.wanted
            assert wanted is not None
            try:
                self.capture.sync(wanted)
            except (CaptureError, ValueError) as e:
                self.status.last_error = str(e)
                self.log(kind="capture", applied=False, error=str(e))
                with self._cv:
                    self._cv.wait(self.retry_s)
                continue
            with self._cv:
                before = self.status.applied or frozenset()
                self.status.applied = wanted
                self.status.syncs += 1
                self.status.last_error = ""
            self.log(kind="capture", applied=True, pods=len(wanted), added=sorted(wanted - before),
                     removed=sorted(before - wanted))

    def wait_applied(self, addresses: frozenset[str], timeout_s: float) -> bool:
        """For tests and start-up: block until `addresses` are applied (or time out)."""
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.status.applied == addresses:
                return True
            time.sleep(0.01)
        return self.status.applied == addresses

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.capture.backend, "pods": sorted(self.status.applied or ()),
                "syncs": self.status.syncs, "last_error": self.status.last_error}
