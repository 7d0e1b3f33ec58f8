"""Fault injection: carry out the steps `clusters.lab.faults.plan_fault` decides, and undo them.

`plan_fault` (pure) says what a fault is; this module is the one place that acts on it: signals to
the lab's processes, iptables rules in the MESHFED-FAULT chain, blackhole routes, link state,
latency relays, `tc` shaping, processes restarted under `faketime`, and demo-server behaviours.
Every applied step is remembered with what its undo needs, so `heal` removes exactly what was
added.

Invariants: a fault is either applied whole or not at all (a step that fails rolls back the ones
before it, every one of them even when one undo fails); `active` lists applied faults in order; the
lock guards only that bookkeeping, never a command, so a slow fault (a relay starting, a process
being waited for) does not hold up status, another fault on something else, or a heal.

Overlapping faults compose: healing one restores only what no other active fault still holds. A
pod killed by `kill pod` and again by `kill node` stays down until both are healed; a link two
faults took down comes up with the last of them; a demo server's behaviour falls back to the one
another active fault set (`signal_undo` and `still_held` decide, from the faults left active).
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from clusters.lab import faults as F
from clusters.lab.commands import FAKETIME_LIBRARIES, latency_relay_argv, skewed_argv
from clusters.lab.layout import LabError
from clusters.lab.netns import in_netns
from clusters.lab.pods import set_behaviour
from clusters.lab.processes import ManagedProcess, ProcessTable
from clusters.lab.topology import LabPlan, NetnsName, run_ip, run_iptables, run_tc

LATENCY_FIRST_PORT = 15099   # relays listen on 15099, 15100, … in the namespace they delay
RELAY_READY_TIMEOUT_S = 5.0
OPTIONAL_PROCESSES = ("ztunnel:", "gateway:", "controller")  # absent when the lab runs without them


@dataclass(frozen=True, slots=True)
class AppliedStep:
    step: F.FaultStep
    relay: ManagedProcess | None = None              # Latency: the relay it started
    relay_rules: tuple[tuple[str, ...], ...] = ()    # Latency: the nat rules that feed it
    original_argv: tuple[str, ...] = ()              # ClockSkew: how the process ran before


@dataclass(frozen=True, slots=True)
class AppliedFault:
    request: F.FaultRequest
    steps: tuple[AppliedStep, ...]

    def matches(self, target: str | None, names: Sequence[str], kind: str | None = None) -> bool:
        return not target or (self.request.target == target and (not names or tuple(names) == self.request.names)
                              and (not kind or kind == self.request.kind))


class FaultInjector:
    def __init__(self, plan: LabPlan, procs: ProcessTable, log_dir: Path,
                 api_ports: Callable[[], Mapping[str, int]] = dict) -> None:
        self.plan = plan
        self.procs = procs
        self.log_dir = log_dir
        self.api_ports = api_ports   # the emulated API servers' ports, known once bring-up started them
        self._shaped: set[tuple[str, str]] = set()   # (netns, dev) with a shaping root qdisc of ours
        self._lock = threading.Lock()
        self._hook_lock = threading.Lock()
        self._active: list[AppliedFault] = []
        self._hooked: set[str] = set()
        self._nodes_down: dict[tuple[str, str], int] = {}   # (cluster, node) -> faults holding it down
        self._ports = itertools.count(LATENCY_FIRST_PORT)

    # --- queries ---------------------------------------------------------------------------------

    def active(self) -> list[F.FaultRequest]:
        with self._lock:
            return [a.request for a in self._active]

    def node_is_down(self, cluster: str, node: str) -> bool:
        return self._nodes_down.get((cluster, node), 0) > 0

    # --- apply -----------------------------------------------------------------------------------

    def apply(self, req: F.FaultRequest) -> list[str]:
        try:
            steps = F.plan_fault(self.plan, req, self.api_ports())
        except KeyError as e:  # plan lookups name what exists
            raise F.FaultError(str(e.args[0])) from None
        done: list[AppliedStep] = []
        for st in steps:
            try:
                done.append(self._do(st))
            except Exception as e:
                for applied in reversed(done):
                    try:
                        self._undo(applied)
                    except Exception as undo_error:  # report, keep rolling back
                        print(f"fault rollback: could not undo {applied.step!r}: {undo_error}", file=sys.stderr)
                raise LabError(f"{req.kind} {req.target} {' '.join(req.names)}: step {st!r} failed ({e}); "
                               "nothing of this fault stays applied") from None
        node = self._node_of(req)
        with self._lock:
            if node is not None:
                self._nodes_down[node] = self._nodes_down.get(node, 0) + 1
            if req.kind != "cont":
                self._active.append(AppliedFault(req, tuple(done)))
        return [repr(a.step) for a in done]

    @staticmethod
    def _node_of(req: F.FaultRequest) -> tuple[str, str] | None:
        if req.target == "node" and req.kind in ("kill", "stop", "partition", "link-down"):
            cluster, _, node = req.names[0].partition("/")
            return cluster, node
        return None

    def _do(self, st: F.FaultStep) -> AppliedStep:
        if isinstance(st, F.Signal):
            self._signal(st)
        elif isinstance(st, F.Rule):
            self._hook(st.netns)
            run_iptables(st.netns, ("-t", st.table, "-A", st.chain, *st.args))
        elif isinstance(st, F.Blackhole):
            run_ip(st.netns, "route", "add", "blackhole", st.cidr)
        elif isinstance(st, F.LinkDown):
            run_ip(st.netns, "link", "set", st.dev, "down")
        elif isinstance(st, F.Latency):
            return self._start_latency(st)
        elif isinstance(st, F.Shape):
            self._shape(st)
        elif isinstance(st, F.ClockSkew):
            return AppliedStep(st, original_argv=tuple(self._restart(st.process, st.skew_s)))
        elif isinstance(st, F.SetBehaviour):
            self._behave(st, st.behaviour)
        return AppliedStep(st)

    def _shape(self, st: F.Shape) -> None:
        key = (st.netns, st.dev)
        with self._lock:
            if key in self._shaped:
                raise F.FaultError(f"{st.dev} in {st.netns or 'the sandbox root'} is already shaped by another "
                                   "bandwidth fault; heal that one first")
            self._shaped.add(key)
        ran = 0
        try:
            for args in st.commands:
                run_tc(st.netns, args)
                ran += 1
        except Exception:
            if ran:   # our root qdisc is in: removing it takes the classes and filters with it
                self._unshape(st)
            else:     # the root qdisc add failed (another's qdisc is there?): nothing of ours to remove
                with self._lock:
                    self._shaped.discard((st.netns, st.dev))
            raise

    def _unshape(self, st: F.Shape) -> None:
        try:
            run_tc(st.netns, ("qdisc", "del", "dev", st.dev, "root"))
        finally:
            with self._lock:
                self._shaped.discard((st.netns, st.dev))

    def _restart(self, key: str, skew_s: float, argv: Sequence[str] | None = None) -> list[str]:
        """Restart process `key`: under faketime moved by `skew_s`, or (skew 0) with `argv`. Returns
        the argv it ran with before."""
        mp = self.procs.get(key)
        if mp is None or not mp.alive():
            raise F.FaultError(f"{key} is not running (killed by another fault?); heal that first")
        library = next((p for p in FAKETIME_LIBRARIES if os.path.exists(p)), None)
        if skew_s and library is None:
            raise F.FaultError("clock-skew needs libfaketime (Debian package faketime; `make system`); looked in "
                               + ", ".join(FAKETIME_LIBRARIES))
        F.check_skew(skew_s, time.monotonic())
        before = list(mp.argv)
        new_argv = skewed_argv(before, skew_s, library or "") if skew_s else list(argv or before)
        mp.terminate()
        fresh = ManagedProcess(key, mp.netns, new_argv, mp.log)
        self.procs.put(fresh)
        fresh.start()
        return before

    def _behave(self, st: F.SetBehaviour, behaviour: str) -> None:
        code, body = set_behaviour(self.plan.pod(st.cluster, st.pod, st.namespace), behaviour)
        if code != 200:
            raise F.FaultError(f"{st.cluster}/{st.namespace}/{st.pod} refused behaviour {behaviour}: {body}")

    def _signal(self, st: F.Signal) -> None:
        mp = self.procs.get(st.process)
        if mp is None:
            if st.process.startswith(OPTIONAL_PROCESSES):
                return  # not running in this lab (started with --no-ztunnel / --no-controller)
            raise F.FaultError(f"no process {st.process} in this lab")
        if st.signal == "KILL":
            mp.kill()
        elif st.signal == "STOP":
            mp.pause()
        else:
            mp.resume()

    def _hook(self, netns: NetnsName) -> None:
        with self._hook_lock:  # the chain is created once per namespace
            if netns in self._hooked:
                return
            for args in F.hook_chain_rules():
                run_iptables(netns, args)
            self._hooked.add(netns)

    def _start_latency(self, st: F.Latency) -> AppliedStep:
        with self._lock:
            port = next(self._ports)
        mp = ManagedProcess(f"latency:{st.netns or 'root'}:{port}", st.netns,
                            latency_relay_argv([sys.executable], port, st.delay_ms), self.log_dir / "latency.log")
        rules = F.latency_rules(st, port)
        added: list[tuple[str, ...]] = []
        self.procs.put(mp)
        try:
            mp.start()
            _wait_listening(st.netns, port, mp, RELAY_READY_TIMEOUT_S)
            for args in rules:
                run_iptables(st.netns, args)
                added.append(args)
        except Exception as e:
            try:
                self._stop_latency(st.netns, mp, tuple(added))
            except LabError as leftover:   # the fault's own error first; what stayed behind after it
                raise LabError(f"{e}; and its rollback: {leftover}") from None
            raise
        return AppliedStep(st, mp, rules)

    def _stop_latency(self, netns: NetnsName, relay: ManagedProcess | None, rules: Sequence[tuple[str, ...]]) -> None:
        """Remove a relay's redirect rules (newest first) and stop it. Every rule is tried and the relay
        always stopped, so one rule that will not go does not leave the others and a running relay
        behind; what could not be removed is named in the error."""
        failed: list[str] = []
        for args in reversed(rules):
            try:
                run_iptables(netns, _deleting(args))
            except Exception as e:
                failed.append(f"{' '.join(args)} ({e})")
        if relay is not None:
            self.procs.pop(relay.key)
            relay.terminate()
        if failed:
            raise LabError(f"latency rules left in {netns or 'the sandbox root'}: " + "; ".join(failed))

    # --- heal ------------------------------------------------------------------------------------

    def heal(self, target: str | None = None, names: Sequence[str] = (), kind: str | None = None) -> list[str]:
        """Undo faults (all, or those on `target` `names`, of `kind` if given) and restart what they
        killed, unless a fault still active holds it too (that fault's heal restores it)."""
        with self._lock:
            chosen = [a for a in self._active if a.matches(target, names, kind)]
            self._active = [a for a in self._active if not a.matches(target, names, kind)]
        healed: list[str] = []
        for fault in chosen:
            for applied in reversed(fault.steps):
                try:
                    self._undo(applied)
                except Exception as e:  # keep healing the rest; report what failed
                    healed.append(f"could not undo {applied.step!r}: {e}")
            node = self._node_of(fault.request)
            if node is not None:
                with self._lock:
                    self._nodes_down[node] = max(0, self._nodes_down.get(node, 0) - 1)
            r = fault.request
            healed.append(f"{r.kind} {r.target} {' '.join(r.names)}")
        return healed

    def _others(self) -> list[F.FaultStep]:
        """The steps of the faults still active (the one being healed or rolled back is not among
        them: heal takes it out of `active` first, a rolled-back fault never got in)."""
        with self._lock:
            return [a.step for fault in self._active for a in fault.steps]

    def _undo(self, applied: AppliedStep) -> None:
        st = applied.step
        if isinstance(st, F.Signal):
            mp = self.procs.get(st.process)
            if mp is None:
                return
            action = signal_undo(st, self._others(), alive=mp.alive())
            if action in ("start", "start-paused"):
                mp.start()
            if action == "start-paused":
                mp.pause()
            elif action == "resume":
                mp.resume()
        elif isinstance(st, F.Rule):
            run_iptables(st.netns, ("-t", st.table, "-D", st.chain, *st.args))
        elif isinstance(st, F.Blackhole):
            run_ip(st.netns, "route", "del", "blackhole", st.cidr)
        elif isinstance(st, F.LinkDown):
            if not still_held(st, self._others()):
                run_ip(st.netns, "link", "set", st.dev, "up")
        elif isinstance(st, F.Latency):
            self._stop_latency(st.netns, applied.relay, applied.relay_rules)
        elif isinstance(st, F.Shape):
            self._unshape(st)
        elif isinstance(st, F.ClockSkew):
            mp = self.procs.get(st.process)
            if mp is not None and mp.alive():
                self._restart(st.process, 0.0, applied.original_argv)
            elif mp is not None:
                mp.argv = list(applied.original_argv)   # the real clock, whoever starts it
                # died under the skew by itself (no other fault holds it down): start it, or heal
                # would leave it dead
                action = signal_undo(F.Signal(st.process, "KILL"), self._others(), alive=False)
                if action in ("start", "start-paused"):
                    mp.start()
                if action == "start-paused":
                    mp.pause()
        elif isinstance(st, F.SetBehaviour):
            later = [o for o in self._others() if isinstance(o, F.SetBehaviour)
                     and (o.cluster, o.namespace, o.pod) == (st.cluster, st.namespace, st.pod)]
            self._behave(st, later[-1].behaviour if later else st.restore)


def signal_undo(step: F.Signal, others: Sequence[F.FaultStep], *, alive: bool) -> str:
    """What healing `step` does to its process, given the steps of the faults still active:
    "start", "start-paused" (killed by this fault, another still holds it stopped), "resume" or
    "none" (another fault still holds it down: its heal brings it back)."""
    held = {o.signal for o in others if isinstance(o, F.Signal) and o.process == step.process} & {"KILL", "STOP"}
    if "KILL" in held:
        return "none"
    if "STOP" in held:
        return "start-paused" if not alive else "none"
    if not alive:
        return "start"
    return "resume" if step.signal == "STOP" else "none"


def still_held(step: F.LinkDown, others: Sequence[F.FaultStep]) -> bool:
    """Whether another active fault holds the same link down."""
    return any(isinstance(o, F.LinkDown) and (o.netns, o.dev) == (step.netns, step.dev) for o in others)


def _deleting(rule: Sequence[str]) -> tuple[str, ...]:
    return tuple("-D" if a == "-A" else a for a in rule)


def _wait_listening(netns: NetnsName, port: int, mp: ManagedProcess, timeout_s: float) -> None:
    """Until the relay accepts on `port` in `netns` (a connection it closes at once: no original
    destination). `in_netns` switches this thread only."""
    deadline = time.monotonic() + timeout_s
    while True:
        with in_netns(netns), socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, F.SO_MARK, F.LATENCY_MARK)  # not caught by another relay's rule
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if not mp.alive():
            raise LabError(f"the latency relay exited at start; see {mp.log}")
        if time.monotonic() > deadline:
            raise LabError(f"the latency relay did not listen on :{port} within {timeout_s:.0f} s; see {mp.log}")
        time.sleep(0.02)
