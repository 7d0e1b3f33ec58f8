"""Faults for the lab: decided from the plan (pure), applied and undone by the supervisor.

`plan_fault()` turns a request ("partition pod east/shop/checkout-*") into `FaultStep`s: signals
for processes, iptables rules in a dedicated chain (`MESHFED-FAULT`, hooked into INPUT, OUTPUT and
FORWARD of the namespaces it touches), blackhole routes, link state, and latency proxies. Each
step knows its own undo, so `heal` is exact: it removes what was added and nothing else.

Kinds of fault, and what a client sees:
- kill (SIGKILL): fast failure — connection refused/reset at once;
- stop/cont (SIGSTOP/SIGCONT): gray failure — connections open, nothing answers;
- partition --mode drop: silent loss — connects time out; --mode reject: TCP resets at once;
- blackhole: a /32 blackhole route — the sender's connect fails locally (EINVAL);
- link-down: the veth in the sandbox root is set down (node or gateway off the network);
- latency: a transparent user-space relay adds `delay_ms` in each direction (`tc netem` does not
  work on these kernels). It finds the original destination with SO_ORIGINAL_DST and marks its own
  connections (SO_MARK `LATENCY_MARK`) so the redirect rule lets them through;
- bandwidth: a token bucket caps `rate_kbit` — on a gateway, `tc tbf` on both ends of its WAN link
  (what it sends and what it receives); on a WAN path, an `htb` class that only the other gateway's
  address is filtered into, on each gateway, so other paths keep their speed;
- clock-skew: the process is restarted under `faketime` (its wall clock moved by `skew_s`, its
  monotonic clock left alone so timers keep working); heal restarts it with the real clock. Only
  that process: preloading faketime into the whole lab made bring-up ten times slower;
- behaviour: a demo server answers 503, slowly, or never (its control socket); heal restores the
  behaviour the LabCluster declared;
- partition of an API server: the cluster's emulated Kubernetes API stops answering (drop: silently,
  every request times out; reject: refused) — discovery loses the cluster and its lease expires.

Targets: `pod CLUSTER/NS/NAME` (fnmatch globs allowed), `node CLUSTER/NODE`, `gateway CLUSTER`,
`wan CLUSTER_A CLUSTER_B` (the WAN path between two clusters' gateways), `controller`,
`api CLUSTER` (its emulated API server; the port is known only once the lab runs, so the caller
passes `api_ports`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import math
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from clusters.lab.topology import MGMT_BRIDGE, ROOT_NS, LabPlan, NetnsName, PodPlan

FAULT_CHAIN = "MESHFED-FAULT"
LATENCY_MARK = 0x4D46
SO_ORIGINAL_DST = 80
SO_MARK = 36
TARGET_KINDS = ("pod", "node", "gateway", "wan", "controller", "api")
FAULT_KINDS = ("kill", "stop", "cont", "partition", "blackhole", "latency", "link-down", "bandwidth", "clock-skew",
               "behaviour")
BEHAVIOURS = ("Healthy", "Error503", "Slow", "Hang")   # clusters.lab.demo_server.BEHAVIOURS
TBF_LATENCY_MS = 400      # how long a packet may queue behind the cap before it is dropped
UNCAPPED_RATE = "10gbit"  # the htb class everything but the capped path goes through


class FaultError(ValueError):
    """A fault request names nothing in the lab, or an impossible combination."""


@dataclass(frozen=True, slots=True)
class Signal:
    process: str  # supervisor process key: "pod:<c>/<ns>/<name>", "ztunnel:<c>/<node>", "gateway:<c>", "controller"
    signal: str   # "KILL" | "STOP" | "CONT"


@dataclass(frozen=True, slots=True)
class Rule:
    netns: NetnsName
    args: tuple[str, ...]  # rule spec appended to MESHFED-FAULT (filter) or a nat chain
    table: str = "filter"
    chain: str = FAULT_CHAIN


@dataclass(frozen=True, slots=True)
class Blackhole:
    netns: NetnsName
    cidr: str


@dataclass(frozen=True, slots=True)
class LinkDown:
    netns: NetnsName
    dev: str


@dataclass(frozen=True, slots=True)
class Latency:
    netns: NetnsName
    destination: str  # IP whose TCP traffic goes through the relay
    delay_ms: float
    from_ifaces: tuple[str, ...] = ()  # also capture forwarded traffic arriving on these


@dataclass(frozen=True, slots=True)
class Shape:
    """Traffic shaping on `dev` in `netns`: `commands` are `tc` argument lists run in order; the
    undo removes the root qdisc they installed (one shaping fault per device at a time)."""

    netns: NetnsName
    dev: str
    commands: tuple[tuple[str, ...], ...]


@dataclass(frozen=True, slots=True)
class ClockSkew:
    process: str      # supervisor process key, restarted with its wall clock moved by skew_s
    skew_s: float


@dataclass(frozen=True, slots=True)
class SetBehaviour:
    cluster: str
    namespace: str
    pod: str
    behaviour: str    # what the demo server does while the fault lasts
    restore: str      # what the LabCluster declared (heal puts it back)


FaultStep = Signal | Rule | Blackhole | LinkDown | Latency | Shape | ClockSkew | SetBehaviour


@dataclass(frozen=True, slots=True)
class FaultRequest:
    kind: str
    target: str            # one of TARGET_KINDS
    names: tuple[str, ...]
    mode: str = "drop"     # partition: drop | reject
    delay_ms: float = 0.0
    rate_kbit: float = 0.0   # bandwidth
    skew_s: float = 0.0      # clock-skew
    behaviour: str = ""      # behaviour: one of BEHAVIOURS


def find_pods(plan: LabPlan, pattern: str) -> list[PodPlan]:
    """`CLUSTER/NS/NAME` or `CLUSTER/NAME`, with globs; at least one pod must match."""
    parts = pattern.split("/")
    if len(parts) not in (2, 3):
        raise FaultError(f"pod target {pattern!r}: write CLUSTER/NAMESPACE/POD (globs allowed), "
                         "e.g. east/shop/checkout-*")
    cl = parts[0]
    ns, name = (parts[1], parts[2]) if len(parts) == 3 else ("*", parts[1])
    found = [p for c in plan.clusters if fnmatch.fnmatchcase(c.name, cl) for p in c.pods
             if fnmatch.fnmatchcase(p.namespace, ns) and fnmatch.fnmatchcase(p.name, name)]
    if not found:
        known = ", ".join(f"{p.cluster}/{p.namespace}/{p.name}" for c in plan.clusters for p in c.pods)
        raise FaultError(f"no pod matches {pattern!r}; pods: {known}")
    return found


def _drop(netns: NetnsName, match: tuple[str, ...], mode: str) -> list[Rule]:
    if mode == "reject":
        return [Rule(netns, (*match, "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset")),
                Rule(netns, (*match, "-j", "REJECT"))]
    if mode != "drop":
        raise FaultError(f"partition mode {mode!r}: use drop (silent, timeouts) or reject (fast, resets)")
    return [Rule(netns, (*match, "-j", "DROP"))]


def tbf(dev: str, rate_kbit: float) -> tuple[str, ...]:
    """`tc` arguments for a token bucket of `rate_kbit` as the root qdisc of `dev`. The bucket holds
    at least a few full-size packets (a smaller burst than one MTU would pass nothing)."""
    burst_bytes = max(4 * 1600, int(rate_kbit * 1000 / 8 / 10))   # ~100 ms of traffic at the rate
    return ("qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate_kbit:g}kbit", "burst", str(burst_bytes),
            "latency", f"{TBF_LATENCY_MS}ms")


def htb_to(dev: str, destination: str, rate_kbit: float) -> tuple[tuple[str, ...], ...]:
    """`tc` commands capping only traffic to `destination` on `dev` (the rest is uncapped)."""
    rate = f"{rate_kbit:g}kbit"
    return (("qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1"),
            ("class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", UNCAPPED_RATE),
            ("class", "add", "dev", dev, "parent", "1:", "classid", "1:2", "htb", "rate", rate, "ceil", rate),
            ("filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match", "ip",
             "dst", f"{destination}/32", "flowid", "1:2"))


SKEW_MONOTONIC_MARGIN_S = 60.0   # what a skewed process's monotonic clock keeps above zero


def check_skew(skew_s: float, monotonic_now_s: float) -> None:
    """libfaketime moves the monotonic clock with the wall clock (see `commands.skewed_argv`); a
    negative skew larger than this host's monotonic clock (about its uptime) would take it below
    zero, where a process's sleeps and timers hang. Refuse that with the largest skew that fits."""
    if skew_s < 0 and monotonic_now_s + skew_s < SKEW_MONOTONIC_MARGIN_S:
        fits = max(0, int(monotonic_now_s - SKEW_MONOTONIC_MARGIN_S))
        raise FaultError(f"clock-skew {skew_s:+.0f} s would move the process's monotonic clock below zero (this "
                         f"host's reads {monotonic_now_s:.0f} s); on this host skew back at most -{fits} s")


def _check_params(req: FaultRequest) -> None:
    """The parameters a kind needs, present and sane (the CLI and experiment files both come here)."""
    if req.kind == "latency" and not 0 < req.delay_ms <= 10_000:
        raise FaultError(f"latency needs a delay in (0, 10000] ms, got {req.delay_ms:g}")
    if req.kind == "bandwidth" and not 8 <= req.rate_kbit <= 10_000_000:
        raise FaultError(f"bandwidth needs a rate in 8..10000000 kbit/s, got {req.rate_kbit:g}")
    # NaN compares false to everything: `nan == 0` and `abs(nan) > limit` would both let it through
    # (to FAKETIME=+nan), so finiteness is checked first; the other kinds' `not lo < x <= hi` refuse NaN
    if req.kind == "clock-skew" and (not math.isfinite(req.skew_s) or req.skew_s == 0
                                     or abs(req.skew_s) > 400 * 86400):
        raise FaultError(f"clock-skew needs a non-zero skew of at most 400 days, got {req.skew_s:g} s")
    if req.kind == "behaviour" and req.behaviour not in BEHAVIOURS:
        raise FaultError(f"behaviour {req.behaviour!r}: one of {', '.join(BEHAVIOURS)}")


def plan_fault(plan: LabPlan, req: FaultRequest, api_ports: Mapping[str, int] | None = None) -> list[FaultStep]:
    if req.kind not in FAULT_KINDS:
        raise FaultError(f"unknown fault {req.kind!r}; one of {', '.join(FAULT_KINDS)}")
    if req.target not in TARGET_KINDS:
        raise FaultError(f"unknown target kind {req.target!r}; one of {', '.join(TARGET_KINDS)}")
    _check_params(req)
    sig = {"kill": "KILL", "stop": "STOP", "cont": "CONT"}.get(req.kind)
    steps: list[FaultStep] = []

    def need(n: int) -> None:
        if len(req.names) != n:
            raise FaultError(f"{req.kind} {req.target} takes {n} name(s), got {list(req.names)}")

    if req.kind == "behaviour" and req.target != "pod":
        raise FaultError(f"behaviour applies to pods (the demo servers), not to a {req.target}")
    if req.kind == "bandwidth" and req.target not in ("gateway", "wan"):
        raise FaultError(f"bandwidth caps a gateway's WAN link or a WAN path, not a {req.target}: target "
                         "gateway CLUSTER or wan CLUSTER_A CLUSTER_B")
    if req.kind == "clock-skew" and req.target in ("wan", "api"):
        raise FaultError(f"clock-skew moves one process's clock: target a node (its ztunnel), a gateway, a pod "
                         f"or the controller, not a {req.target}")
    if req.target == "api":
        need(1)
        cluster = plan.cluster(req.names[0]).name
        if req.kind != "partition":
            raise FaultError(f"the emulated API server of {cluster} runs inside the lab's supervisor: take it away "
                             "with `partition api CLUSTER` (--mode drop: it stops answering; reject: refused)")
        port = (api_ports or {}).get(cluster)
        if not port:
            raise FaultError(f"the API server of {cluster} has no known port (is the lab running?)")
        verdict = (("-j", "DROP"),) if req.mode == "drop" else \
            (("-j", "REJECT", "--reject-with", "tcp-reset"),) if req.mode == "reject" else None
        if verdict is None:
            raise FaultError(f"partition mode {req.mode!r}: use drop (silent, timeouts) or reject (fast, resets)")
        # both directions: new connections and the watches already open go quiet together
        return [Rule(ROOT_NS, ("-p", "tcp", "-d", "127.0.0.1", "--dport", str(port), *verdict[0])),
                Rule(ROOT_NS, ("-p", "tcp", "-s", "127.0.0.1", "--sport", str(port), *verdict[0]))]
    if req.target == "pod":
        if not req.names:
            raise FaultError("name at least one pod: CLUSTER/NAMESPACE/POD")
        pods = [p for pat in req.names for p in find_pods(plan, pat)]
        for p in pods:
            node = plan.cluster(p.cluster).node(p.node)
            if sig:
                steps.append(Signal(f"pod:{p.key}", sig))
            elif req.kind == "behaviour":
                steps.append(SetBehaviour(p.cluster, p.namespace, p.name, req.behaviour, p.behaviour.value))
            elif req.kind == "clock-skew":
                steps.append(ClockSkew(f"pod:{p.key}", req.skew_s))
            elif req.kind == "partition":
                steps += _drop(node.netns, ("-d", p.address), req.mode) + _drop(node.netns, ("-s", p.address), req.mode)
            elif req.kind == "blackhole":
                steps.append(Blackhole(node.netns, f"{p.address}/32"))
            elif req.kind == "latency":
                steps.append(Latency(node.netns, p.address, req.delay_ms, ("eth0",)))
            elif req.kind == "link-down":
                steps.append(LinkDown(node.netns, p.host_ifname))
        return steps
    if req.target == "node":
        need(1)
        cl_name, _, node_name = req.names[0].partition("/")
        cl = plan.cluster(cl_name)
        node = cl.node(node_name)
        if sig:
            # A node going down takes its pods with it.
            steps.append(Signal(f"ztunnel:{cl.name}/{node.name}", sig))
            steps += [Signal(f"pod:{p.key}", sig) for p in cl.pods if p.node == node.name]
        elif req.kind == "clock-skew":
            steps.append(ClockSkew(f"ztunnel:{cl.name}/{node.name}", req.skew_s))  # the node's proxy, not its pods
        elif req.kind == "partition":
            steps += _drop(node.netns, ("-i", "eth0"), req.mode) + _drop(node.netns, ("-o", "eth0"), req.mode)
        elif req.kind == "link-down":
            steps.append(LinkDown(ROOT_NS, node.uplink_root_ifname))
        elif req.kind == "blackhole":
            steps += [Blackhole(other.netns, node.pod_cidr) for other in cl.nodes if other is not node]
        elif req.kind == "latency":
            raise FaultError("latency on a node: target its pods (pod CLUSTER/NS/*) or the WAN instead")
        else:
            raise FaultError(f"{req.kind} does not apply to a node")
        return steps
    if req.target == "gateway":
        need(1)
        gw = plan.cluster(req.names[0]).gateway
        if gw is None:
            raise FaultError(f"cluster {req.names[0]} has no east-west gateway")
        if sig:
            steps.append(Signal(f"gateway:{gw.cluster}", sig))
        elif req.kind == "clock-skew":
            steps.append(ClockSkew(f"gateway:{gw.cluster}", req.skew_s))
        elif req.kind == "bandwidth":
            # what the gateway sends (its wan0) and what it receives (the bridge side of the same link)
            steps += [Shape(gw.netns, "wan0", (tbf("wan0", req.rate_kbit),)),
                      Shape(ROOT_NS, gw.wan_root_ifname, (tbf(gw.wan_root_ifname, req.rate_kbit),))]
        elif req.kind == "partition":
            steps += _drop(gw.netns, ("-i", "wan0"), req.mode) + _drop(gw.netns, ("-o", "wan0"), req.mode)
        elif req.kind == "link-down":
            steps.append(LinkDown(ROOT_NS, gw.wan_root_ifname))
        elif req.kind == "blackhole":
            for c in plan.clusters:
                if c.name != gw.cluster and c.gateway is not None:
                    steps.append(Blackhole(c.gateway.netns, f"{gw.wan_address}/32"))
                    steps += [Blackhole(n.netns, f"{gw.wan_address}/32") for n in c.nodes]
        else:
            steps.append(Latency(gw.netns, "0.0.0.0/0", req.delay_ms, ("eth0",)))
        return steps
    if req.target == "wan":
        need(2)
        a, b = plan.cluster(req.names[0]).gateway, plan.cluster(req.names[1]).gateway
        if a is None or b is None:
            raise FaultError("both clusters of a WAN fault need an east-west gateway")
        if sig:
            raise FaultError("kill/stop/cont apply to processes: target a gateway, not the WAN")
        for here, there in ((a, b), (b, a)):
            if req.kind == "partition":
                steps += _drop(here.netns, ("-d", there.wan_address), req.mode)
                steps += _drop(here.netns, ("-s", there.wan_address), req.mode)
            elif req.kind == "blackhole":
                steps.append(Blackhole(here.netns, f"{there.wan_address}/32"))
            elif req.kind == "latency":
                steps.append(Latency(here.netns, there.wan_address, req.delay_ms, ("eth0",)))
            elif req.kind == "bandwidth":
                steps.append(Shape(here.netns, "wan0", htb_to("wan0", there.wan_address, req.rate_kbit)))
            else:
                raise FaultError("link-down on a WAN path: take a gateway's link down instead")
        return steps
    # controller
    if sig:
        return [Signal("controller", sig)]
    if req.kind == "clock-skew":
        return [ClockSkew("controller", req.skew_s)]
    if req.kind == "partition":
        steps += _drop(ROOT_NS, ("-i", MGMT_BRIDGE), req.mode) + _drop(ROOT_NS, ("-o", MGMT_BRIDGE), req.mode)
        return steps
    if req.kind == "link-down":
        return [LinkDown(ROOT_NS, MGMT_BRIDGE)]
    raise FaultError(f"{req.kind} does not apply to the controller; use kill, stop, partition or link-down")


def hook_chain_rules() -> tuple[tuple[str, ...], ...]:
    """iptables invocations that create MESHFED-FAULT and hook it (idempotence is the caller's)."""
    # RSTs always pass: a REJECT's own reset leaves through OUTPUT and must not be caught by the
    # partition it reports (with DROP nothing ever gets far enough to be reset).
    return (("-N", FAULT_CHAIN), ("-A", FAULT_CHAIN, "-p", "tcp", "--tcp-flags", "RST", "RST", "-j", "RETURN"),
            ("-I", "INPUT", "-j", FAULT_CHAIN), ("-I", "OUTPUT", "-j", FAULT_CHAIN),
            ("-I", "FORWARD", "-j", FAULT_CHAIN))


def latency_rules(step: Latency, port: int) -> tuple[tuple[str, ...], ...]:
    """nat rules that send TCP for `step.destination` to the relay on `port` (its own traffic excepted)."""
    dst = () if step.destination == "0.0.0.0/0" else ("-d", step.destination)
    rules: list[tuple[str, ...]] = [("-t", "nat", "-A", "OUTPUT", *dst, "-p", "tcp", "-m", "mark", "!", "--mark",
                                     str(LATENCY_MARK), "-j", "REDIRECT", "--to-ports", str(port))]
    for iface in step.from_ifaces:
        rules.append(("-t", "nat", "-A", "PREROUTING", "-i", iface, *dst, "-p", "tcp",
                      "-j", "REDIRECT", "--to-ports", str(port)))
    return tuple(rules)


# --- the latency relay (a process started in the target namespace) ------------------------------


def original_destination(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack("!H", raw[2:4])[0]
    return socket.inet_ntoa(raw[4:8]), port


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Forward chunks in order, each `delay_s` after it arrived (a delay line, not a rate limit)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(deliver())
        while True:
            try:
                data = await reader.read(65536)
            except OSError:
                data = b""
            queue.put_nowait((loop.time() + delay_s, data))
            if not data:
                break


async def serve_latency(port: int, delay_ms: float) -> None:
    delay_s = delay_ms / 1000.0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            host, dport = original_destination(sock)
            out = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            out.setsockopt(socket.SOL_SOCKET, SO_MARK, LATENCY_MARK)
            out.setblocking(False)
            await asyncio.sleep(delay_s)  # the SYN's one-way delay
            await asyncio.get_running_loop().sock_connect(out, (host, dport))
            ur, uw = await asyncio.open_connection(sock=out)
        except OSError:
            writer.close()
            return
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_pump(reader, uw, delay_s))
                tg.create_task(_pump(ur, writer, delay_s))
        except* OSError:
            pass
        finally:
            uw.close()
            writer.close()

    server = await asyncio.start_server(handle, "0.0.0.0", port, reuse_address=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="transparent TCP delay line (lab latency fault)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--delay-ms", type=float, required=True)
    a = ap.parse_args(argv)
    asyncio.run(serve_latency(a.port, a.delay_ms))


if __name__ == "__main__":
    main()
