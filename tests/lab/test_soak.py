"""THE SOAK — weeks in minutes (issue 11): a three-cluster lab federation under steady traffic while
its calendar advances more than 30 days.

How time travels: every process of the lab (controller and its Ray workers, proxies, gateways,
agents) reads its *calendar* — certificate and token validity, renewal schedules, the root
rotation gate — through `ztunnel.api.clock`, which adds the offset in the file named by
`$MESHFED_CALENDAR_OFFSET_FILE`. This test sets that variable before the lab starts (every process
inherits it; the controller also hands it to its Ray actors) and rewrites the file in steps of
`STEP_S` simulated seconds, about one real second apart; after each step it waits (`settle`, at
most `SETTLE_MAX_S`) until the renewals the step made due are done — the calendar is a simulation
clock, and on the shared machine the lab's processes stall for seconds at a time (load averages of
30-50 on two cores were seen), which must not turn into certificates expiring between steps.
Leases, debounce, keepalives, backoff and timeouts run on monotonic clocks and never see the jumps. libfaketime is not used: with the
monotonic clock left alone Python's sleeps fail (EINVAL), and moving it too fires every timeout.

What happens on the simulated calendar (workload certificates live 24 h, renewed at half-life;
the controller's serving certificates likewise):
- day 2: root-2 of east.mesh.local is published through Git; day 4: east switches to root-2; six
  simulated hours later a commit retiring root-1 is refused (its leaves are still live); day 6,
  when they have expired, the retirement is pushed again and applied. Each stage is applied by
  every proxy (SYNCED) before the next;
- day 8 and day 16: the controller is killed and restarted (its state directory survives);
- day 10 to day 12: west's east-west gateway is offline, longer than a certificate's lifetime;
  meanwhile `meshfed check` flags its expired certificate; when it comes back it finds its
  persisted certificate expired, obtains a new one with its ServiceAccount token and re-syncs;
- the calendar does not move while the controller is down (proxies renew through it; an outage
  longer than a certificate's remaining life would fail every proxy closed, which is the design).

Asserted at the end: every proxy SYNCED at the last revision; 0 failed requests (a request fails
when it gets no 2xx within `REQUEST_TIMEOUT_S`) outside the injected faults (the controller's
restarts and the gateway's outage; in fact none inside either is expected: the load is served in
each client's own cluster and the killed gateway carries none of it); every workload certificate
renewed at half-life throughout and the serving certificates too; open file descriptors and RSS
of each proxy within `FD_GROWTH_MAX` and `RSS_GROWTH_MAX` from day 8 (a week of rotations in:
pools and caches warm) to the end (the restarted gateway excluded), and of the controller's
processes (the `meshfed controller run` process and Ray's, actors included), each, that ran from a
day after its last restart to the end (Ray starts and retires idle workers: those are counted, not
compared); and at rest no more connections on the controller's config port than one per proxy
(+ `CONFIG_CONNECTIONS_SLACK`): every cut stream and renewal once left one behind, which the fd
bound caught only weeks later. The figures are printed (`-s`) for the lead to quote.

A limitation, by construction: OpenSSL (Python `ssl`, grpcio) checks validity on the real clock.
Under a simulated calendar the CA starts certificates at the real clock (`ztunnel.api.clock`
`not_before_anchor_s`), so they are valid for both; an expired certificate is therefore detected
by meshfed's own checks on the calendar (the certificate manager, the peer verifier, the
controller's client verification), not by OpenSSL. The gateway offline across a lifetime proves
the recovery path those checks drive (defect 5), not OpenSSL's refusal.

Wall time measured on the shared 2-core machine: 4 min 15 s at a quiet moment, 8 min 23 s with a
load average of 50-70 from other runs (lab up and convergence 15 s to 2.5 min; 187 steps with
their settling, two controller restarts and four pushes 4 to 6 min).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from chaos.demo import DemoError, LabFederation, replace_in, served_summary
from tests.lab.federation import converged_federation
from ztunnel.api.clock import CALENDAR_OFFSET_ENV, write_offset

# the soak is the whole module: bring-up, 31 simulated days, teardown (CI: < 10 minutes of wall time)
pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.soak, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
STATE_DIR = Path(os.environ.get("MESHFED_SOAK_STATE_DIR", "/tmp/meshfed-soak"))
OFFSET_FILE = STATE_DIR.with_name(STATE_DIR.name + ".calendar-offset")

HOUR_S = 3600.0
DAY_S = 24 * HOUR_S
STEP_S = 4 * HOUR_S          # a third of the half-life renewal interval: no certificate ages past 19 h
STEP_REAL_S = 0.8            # the proxies notice a jump within a second (`calendar_wait_s`) and renew
SETTLE_MAX_S = 20.0          # after a step, wait at most this long for the renewals it made due
REQUEST_TIMEOUT_S = 10.0     # a request slower than this failed; a busy shared machine stalls for seconds
REST_S = 10.0                # resources are read with the calendar at rest: no renewal's connection in flight
SIMULATED_DAYS = 31
LOAD_RATE_PER_S = 4.0        # per cluster
ROTATED_TD = "east.mesh.local"
OFFLINE = ("gateway", "west")   # the proxy offline across a certificate's lifetime
FD_GROWTH_MAX = 20
RSS_GROWTH_MAX = 0.25        # of the starting RSS
CONFIG_CONNECTIONS_SLACK = 2  # at rest: one connection per proxy, and a straggler or two being torn down
RSS_GROWTH_FLOOR_KIB = 8 * 1024   # small processes: allocator noise is not a leak


def _print(*parts: Any) -> None:
    print("[soak]", *parts, flush=True)


# --- processes: fds and RSS from the host's /proc ----------------------------------------------


def _proc_table() -> dict[int, tuple[int, list[str]]]:
    """pid -> (parent pid, argv) of every process on the host."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            argv = (p / "cmdline").read_bytes().decode(errors="replace").split("\0")
            ppid = int(next(line.split()[1] for line in (p / "status").read_text().splitlines()
                            if line.startswith("PPid:")))
        except (OSError, StopIteration, ValueError):
            continue
        out[int(p.name)] = (ppid, argv)
    return out


def _tree(root: int, table: Mapping[int, tuple[int, list[str]]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _argv) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _usage(pids: Sequence[int]) -> dict[int, tuple[int, int]]:
    """pid -> (fds, RSS KiB) of each of `pids` still running."""
    out = {}
    for pid in pids:
        try:
            fds = len(os.listdir(f"/proc/{pid}/fd"))
            rss = int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                           if line.startswith("VmRSS:")))
        except (OSError, StopIteration, ValueError):
            continue
        out[pid] = (fds, rss)
    return out


def _tcp_sockets(pid: int) -> dict[str, tuple[int, int]]:
    """Socket inode -> (local port, remote port) of the TCP sockets in `pid`'s network namespace."""
    out: dict[str, tuple[int, int]] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            out[f[9]] = (int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16))
    return out


def _fd_targets(pid: int) -> list[str]:
    """What each open file descriptor of `pid` points at (`socket:[<inode>]`, a path, `pipe:[...]`);
    OSError when the process is gone. A descriptor closed while being read is skipped."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return out


def _describe(pid: int) -> str:
    """A process for a failure message: its title (Ray names its workers `ray::<Actor>`), what its
    file descriptors are (pipes, files...), and its TCP sockets by the local port they serve
    (`:<port>`: accepted or listening there) or the remote port they dial (`-><port>`)."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ").strip()
        tcp = _tcp_sockets(pid)
        listening = {lp for lp, rp in tcp.values() if rp == 0}
        kinds: dict[str, int] = {}
        for target in _fd_targets(pid):
            if target.startswith("socket:["):
                lp, rp = tcp.get(target[8:-1], (0, 0))
                kind = "unix/udp" if (lp, rp) == (0, 0) else f":{lp}" if lp in listening else f"->{rp}"
            else:
                kind = target.split(":", 1)[0] if ":" in target and not target.startswith("/") else "file"
            kinds[kind] = kinds.get(kind, 0) + 1
    except OSError as e:
        return f"pid {pid}: gone ({e.strerror})"
    return f"pid {pid} {title[:80]!r}: fds {dict(sorted(kinds.items()))}"


def _connections_served(pids: Sequence[int], port: int, samples: int = 3, every_s: float = 1.0) -> int:
    """Connections accepted on `port` (not the listener) held by `pids`: each socket once (a child
    may share its parent's), the least of `samples` readings `every_s` apart (as `_sample`)."""
    readings = []
    for i in range(samples):
        if i:
            time.sleep(every_s)
        inodes: set[str] = set()
        for pid in pids:
            tcp = _tcp_sockets(pid)
            try:
                targets = _fd_targets(pid)
            except OSError:
                continue
            for target in targets:
                lp, rp = tcp.get(target[8:-1], (0, 0)) if target.startswith("socket:[") else (0, 0)
                if lp == port and rp != 0:
                    inodes.add(target)
        readings.append(len(inodes))
    return min(readings)


def _total(usage: Mapping[int, tuple[int, int]]) -> tuple[int, int]:
    return sum(u[0] for u in usage.values()), sum(u[1] for u in usage.values())


def _lab_processes(state_dir: Path) -> dict[str, list[int]]:
    """'controller' -> the controller's process tree; proxy id -> its process tree."""
    table = _proc_table()
    sd = str(state_dir)
    mine = {pid: argv for pid, (_pp, argv) in table.items()
            if any(a == sd or a.startswith(sd + "/") for a in argv)}

    def name_of(argv: Sequence[str]) -> str:
        if "controller" in argv and "run" in argv:
            return "controller"
        return argv[argv.index("--proxy-id") + 1] if "ztunnel" in argv and "--proxy-id" in argv else ""

    out: dict[str, list[int]] = {}
    for pid, argv in mine.items():
        name = name_of(argv)
        parent = table[pid][0]
        # the outermost process of that name (a wrapper that execs, e.g. `env`, is the same process)
        if name and (parent not in mine or name_of(mine[parent]) != name):
            out[name] = _tree(pid, table)
    return out


def _sample(state_dir: Path, samples: int = 3, every_s: float = 1.0) -> dict[str, dict[int, tuple[int, int]]]:
    """Per process, the least fds and RSS of `samples` readings `every_s` apart: a connection in
    flight (a CSR, a request) at one instant is not growth."""
    out: dict[str, dict[int, tuple[int, int]]] = {}
    for i in range(samples):
        if i:
            time.sleep(every_s)
        for name, pids in _lab_processes(state_dir).items():
            now = _usage(pids)
            have = out.setdefault(name, now)
            for pid, (fds, rss) in now.items():
                if pid in have:
                    have[pid] = (min(have[pid][0], fds), min(have[pid][1], rss))
    return out


# --- the calendar and the federation -------------------------------------------------------------


@dataclass
class Soak:
    fed: LabFederation
    started_at_s: float = field(default_factory=time.time)   # (before the lab came up)
    offset_s: float = 0.0
    steps: int = 0
    fault_windows: list[tuple[str, float, float]] = field(default_factory=list)   # (what, real start, end)
    serving_renewals: int = 0        # summed over the controller's incarnations
    settle_s: list[float] = field(default_factory=list)   # per step: how long the renewals took to catch up
    unsettled: int = 0               # steps after which they had not within SETTLE_MAX_S
    _renewals_seen: tuple[int, int] = (0, 0)   # (epoch, renewals) of the incarnation last seen

    def advance(self, days: float) -> None:
        """Move the calendar `days` forward in steps of STEP_S, ~STEP_REAL_S of real time each,
        and after each step wait (`settle`) for the renewals it made due: the calendar is a
        simulation clock, and on a shared machine the lab's processes can stall for seconds."""
        target = self.offset_s + days * DAY_S
        while self.offset_s < target - 1.0:
            self.offset_s = min(target, self.offset_s + STEP_S)
            write_offset(OFFSET_FILE, self.offset_s)
            self.steps += 1
            time.sleep(STEP_REAL_S)
            self.settle()
        self.note_renewals()

    def settle(self) -> None:
        """Until every connected proxy's certificates are within their renewal time and the
        controller's serving certificates too (at most SETTLE_MAX_S; `unsettled` counts misses)."""
        from federation.controller.checks import proxy_certificate_verdict

        t0 = time.monotonic()
        while True:
            st = self.fed.status()
            if st is not None:
                today_s = time.time() + self.offset_s
                late = [p["proxy"] for p in st.get("proxies") or [] if p.get("connected") and p.get("certificate")
                        and proxy_certificate_verdict(p["certificate"], today_s)]
                serving = (st.get("config_server") or {}).get("serving_certificate") or {}
                if not late and not (serving and today_s >= float(serving["renew_at_s"])):
                    self.settle_s.append(time.monotonic() - t0)
                    return
            if time.monotonic() - t0 > SETTLE_MAX_S:
                self.unsettled += 1
                return
            time.sleep(0.1)

    @property
    def day(self) -> float:
        return self.offset_s / DAY_S

    def status(self) -> dict[str, Any]:
        st = self.fed.status()
        if st is None:
            raise DemoError("the controller's status API does not answer")
        return st

    def note_renewals(self) -> None:
        """Serving-certificate renewals of the running controller (its counter restarts with it)."""
        st = self.fed.status() or {}
        epoch = int((st.get("controller") or {}).get("epoch") or 0)
        n = int(((st.get("config_server") or {}).get("serving_certificate") or {}).get("renewals") or 0)
        seen_epoch, seen = self._renewals_seen
        self.serving_renewals += n - (seen if epoch == seen_epoch else 0)
        self._renewals_seen = (epoch, n)

    def check(self) -> dict[str, dict[str, Any]]:
        return {c["check"].split(" (")[0]: c for c in self.fed.api("/api/v1/check", timeout_s=10.0)}

    def push_trust(self, roots: str, message: str) -> str:
        """Replace east.mesh.local's roots list with `roots` (YAML lines) and push."""
        def edit(wt: Path) -> str:
            path = wt / "trust" / f"{ROTATED_TD}.yaml"
            text = path.read_text()
            start = text.index("    roots:\n")
            end = text.index("    workloadCertTTL:")
            path.write_text(text[:start] + "    roots:\n" + roots + text[end:])
            return message

        return self.fed.push(edit)

    def wait_synced(self, revision: str, timeout_s: float = 120.0) -> float:
        """Until `revision` is applied and every proxy ACKed it (SYNCED); seconds taken."""
        t0 = time.monotonic()
        last: dict[str, Any] = {}
        while time.monotonic() - t0 < timeout_s:
            st = self.fed.status()
            if st is not None:
                last = st
                ps = st.get("proxies") or []
                # connected too: a proxy that is away keeps the SYNCED state of its last ACK
                if ((st.get("applied") or {}).get("revision") == revision and len(ps) >= self.fed.proxy_count()
                        and all(p.get("sync") == "SYNCED" and p.get("acked_revision") == revision
                                and p.get("connected") for p in ps)):
                    return time.monotonic() - t0
            time.sleep(0.25)
        behind = [f"{p['proxy']} {p['sync']} {str(p.get('acked_revision'))[:8]} connected={p.get('connected')}"
                  for p in last.get("proxies") or []
                  if p.get("sync") != "SYNCED" or p.get("acked_revision") != revision or not p.get("connected")]
        raise DemoError(f"revision {revision[:8]} not applied and SYNCED everywhere within {timeout_s:.0f} s "
                        f"(applied {str((last.get('applied') or {}).get('revision'))[:8]}; behind: {behind}); see "
                        f"{STATE_DIR}/logs")

    def restart_controller(self, revision: str) -> float:
        self.note_renewals()
        t0 = time.time()
        self.fed.runner.fault("kill", "controller", [])
        assert self.fed.status() is None
        time.sleep(3.0)
        self.fed.runner.heal()   # (no other fault is active at a restart)
        took_s = self.wait_synced(revision, timeout_s=180.0)
        self.fault_windows.append(("controller restart", t0, time.time()))
        return took_s


ROOTS_PUBLISHED = "      - name: root-1\n        signing: true\n      - name: root-2\n        signing: false\n"
ROOTS_SWITCHED = "      - name: root-1\n        signing: false\n      - name: root-2\n        signing: true\n"
ROOTS_RETIRED = "      - name: root-2\n        signing: true\n"


@pytest.fixture(scope="module")
def soak() -> Iterator[Soak]:
    started_at_s = time.time()
    before = os.environ.get(CALENDAR_OFFSET_ENV)
    write_offset(OFFSET_FILE, 0.0)
    os.environ[CALENDAR_OFFSET_ENV] = str(OFFSET_FILE)   # inherited by the sandbox and everything in it
    try:
        with converged_federation(REPO / "examples" / "fleet", STATE_DIR, state_dir_env="MESHFED_SOAK_STATE_DIR",
                                  converge_timeout_s=180, say=_print) as f:
            yield Soak(f, started_at_s)
    finally:
        if before is None:
            os.environ.pop(CALENDAR_OFFSET_ENV, None)
        else:
            os.environ[CALENDAR_OFFSET_ENV] = before
        OFFSET_FILE.unlink(missing_ok=True)


def _count(logs: Path, pattern: str, glob: str, since_s: float) -> int:
    """Lines matching `pattern` logged at or after `since_s` (a lab's logs are appended to across
    runs in one state directory; every line starts with its UTC timestamp)."""
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since_s))
    rx = re.compile(pattern)
    return sum(1 for p in logs.glob(glob) for line in p.read_text(errors="replace").splitlines()
               if line[:19] >= since and rx.search(line))


def _growth_ok(start: tuple[int, int], end: tuple[int, int]) -> bool:
    return (end[0] <= start[0] + FD_GROWTH_MAX
            and end[1] <= start[1] + max(start[1] * RSS_GROWTH_MAX, RSS_GROWTH_FLOOR_KIB))


def test_thirty_days_of_rotations_restarts_and_an_offline_proxy_under_steady_traffic(soak: Soak) -> None:
    fed = soak.fed
    wall0 = time.monotonic()
    head0 = fed.head()
    for c in fed.clusters:
        fed.start_load(c, LOAD_RATE_PER_S, timeout_s=REQUEST_TIMEOUT_S)
    soak.advance(0.5)                                   # first renewals, load running
    assert len(_lab_processes(STATE_DIR)) == fed.proxy_count() + 1, sorted(_lab_processes(STATE_DIR))

    # --- staged root rotation of east.mesh.local through Git -------------------------------------
    soak.advance(2.0 - soak.day)
    published = soak.push_trust(ROOTS_PUBLISHED, "soak: publish root-2 of east.mesh.local")
    _print(f"day {soak.day:.2f}: root-2 published, applied and SYNCED in {soak.wait_synced(published):.1f} s")
    soak.advance(4.0 - soak.day)
    switched = soak.push_trust(ROOTS_SWITCHED, "soak: east.mesh.local signs with root-2")
    _print(f"day {soak.day:.2f}: switched to root-2, applied and SYNCED in {soak.wait_synced(switched):.1f} s")
    switched_day = soak.day
    soak.advance(0.25)
    early = soak.push_trust(ROOTS_RETIRED, "soak: retire root-1 (too early: its leaves are live)")
    st = fed.wait_attempted(early)
    assert st["desired"]["ok"] is False and (st.get("applied") or {}).get("revision") == switched
    assert any("would invalidate live certificates" in p.get("message", "") for p in st["problems"]), st["problems"]
    soak.advance(6.0 - soak.day)                        # root-1's last leaf (24 h) expired long ago

    def retire_again(wt: Path) -> str:                  # the same tree as the refused commit, re-attempted
        replace_in(wt / "trust" / f"{ROTATED_TD}.yaml", "  ca:\n", "  ca:  # root-1 retired after its leaves expired\n")
        return "soak: retire root-1 (its leaves expired)"

    retired = fed.push(retire_again)
    _print(f"day {soak.day:.2f}: root-1 retired, applied and SYNCED in {soak.wait_synced(retired):.1f} s")
    east_roots = [r["root"] for r in soak.status().get("trust") or [] if r["trust_domain"] == ROTATED_TD]
    assert any("root-2" in r for r in east_roots), east_roots

    # --- the controller killed and restarted ----------------------------------------------------
    soak.advance(8.0 - soak.day)
    time.sleep(REST_S)
    start_usage = _sample(STATE_DIR)                    # warm: a week of rotations, pools and caches filled
    restart_1_s = soak.restart_controller(retired)
    _print(f"day {soak.day:.2f}: controller restarted, every proxy re-SYNCED in {restart_1_s:.1f} s")

    # --- one proxy offline across a whole certificate lifetime ----------------------------------
    soak.advance(10.0 - soak.day)
    kind, name = OFFLINE
    proxy = f"{kind}/{name}"
    t_off = time.time()
    fed.runner.fault("kill", kind, [name])
    soak.advance(1.5)
    flagged = soak.check()["proxy certificates valid and renewed in time"]
    assert not flagged["ok"] and f"{proxy} (" in flagged["cause"] and "expired" in flagged["cause"], flagged
    cli = subprocess.run([sys.executable, "-m", "federation.cli.main", "check", "--controller", fed.controller_url,
                          "-o", "json"], capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
    assert cli.returncode == 1 and proxy in cli.stdout, (cli.returncode, cli.stdout[-2000:], cli.stderr[-2000:])
    soak.advance(12.0 - soak.day)
    fed.runner.heal(kind, [name])
    back_s = soak.wait_synced(retired, timeout_s=120.0)
    _print(f"day {soak.day:.2f}: {proxy} back after 2 simulated days, SYNCED in {back_s:.1f} s")
    soak.fault_windows.append((f"{proxy} offline", t_off, time.time()))
    gw_log = (STATE_DIR / "logs" / f"{kind}-{name}.log").read_text(errors="replace")
    # its persisted certificate expired on the calendar: dropped, and a new one bought with its token
    dropped = list(re.finditer(r'event[=":]+credential_dropped', gw_log))
    assert dropped, gw_log[-3000:]
    since = gw_log[dropped[-1].start():]
    assert "already expired" in since and re.search(r'event[=":]+bootstrapped', since), since[:3000]
    assert soak.check()["proxy certificates valid and renewed in time"]["ok"]

    # --- the controller again, then the rest of the month ---------------------------------------
    soak.advance(16.0 - soak.day)
    restart_2_s = soak.restart_controller(retired)
    _print(f"day {soak.day:.2f}: controller restarted again, every proxy re-SYNCED in {restart_2_s:.1f} s")
    soak.advance(1.0)                                   # the new incarnation warmed up (Ray workers, imports)
    time.sleep(REST_S)
    restarted_usage = _sample(STATE_DIR)
    restarted_described = {p: _describe(p) for p in restarted_usage["controller"]}
    soak.advance(SIMULATED_DAYS - soak.day)

    # --- the end ---------------------------------------------------------------------------------
    time.sleep(REST_S)
    end_usage = _sample(STATE_DIR)
    config_port = int(json.loads((STATE_DIR / "lab.json").read_text())["controller"]["grpc"].rsplit(":", 1)[1])
    config_connections = _connections_served(sorted(end_usage["controller"]), config_port)
    records = {c: fed.stop_load(c) for c in fed.clusters}
    soak.wait_synced(retired, timeout_s=60.0)
    final = soak.status()
    checks = soak.check()
    soak.note_renewals()
    wall_s = time.monotonic() - wall0

    def in_fault(r: Mapping[str, Any]) -> bool:
        t = float(r.get("start_s", 0.0))
        return any(t0 <= t < t1 for _what, t0, t1 in soak.fault_windows)

    every = [r for recs in records.values() for r in recs]
    failed = [r for r in every if r.get("outcome") != "ok"]
    failed_outside = [r for r in failed if not in_fault(r)]
    logs = STATE_DIR / "logs"
    rotated = _count(logs, r"certmanager: certificate rotated for", "*.log", soak.started_at_s)
    issued = _count(logs, r"certmanager: certificate issued for", "*.log", soak.started_at_s)

    _print(f"simulated {soak.day:.1f} days in {soak.steps} steps of {STEP_S / HOUR_S:.0f} h; wall "
           f"{wall_s:.0f} s for the scenario")
    _print(f"revisions: publish {published[:8]}, switch {switched[:8]} (day {switched_day:.2f}), early retire "
           f"{early[:8]} refused, retire {retired[:8]} applied; started at {head0[:8]}")
    _print(f"workload certificates rotated {rotated} times (+{issued} first issues and bootstraps) across "
           f"{fed.proxy_count()} proxies; controller serving certificates renewed {soak.serving_renewals} times")
    _print(f"controller restarts: 2 (re-SYNCED in {restart_1_s:.1f} s and {restart_2_s:.1f} s); {proxy} offline "
           f"{(soak.fault_windows[1][2] - soak.fault_windows[1][1]):.0f} s real = 2 simulated days, re-SYNCED "
           f"{back_s:.1f} s after it came back")
    for c, recs in records.items():
        _print(f"load from {c}: {len(recs)} requests: {served_summary(recs)}")
    _print(f"requests {len(every)}, failed {len(failed)} ({len(failed_outside)} outside the injected faults)")
    _print(f"settling after each step: median {sorted(soak.settle_s)[len(soak.settle_s) // 2]:.2f} s, max "
           f"{max(soak.settle_s):.2f} s; {soak.unsettled} steps not settled within {SETTLE_MAX_S:.0f} s")
    for name_ in sorted(end_usage):
        s_, e_ = _total(start_usage.get(name_, {})), _total(end_usage[name_])
        _print(f"{name_}: fds {s_[0]} -> {e_[0]}, RSS {s_[1] // 1024} -> {e_[1] // 1024} MiB"
               f" ({len(start_usage.get(name_, {}))} -> {len(end_usage[name_])} processes)")
    ctl_start, ctl_end = restarted_usage["controller"], end_usage["controller"]
    ctl_both = sorted(set(ctl_start) & set(ctl_end))
    ctl_s, ctl_e = _total({p: ctl_start[p] for p in ctl_both}), _total({p: ctl_end[p] for p in ctl_both})
    ctl_grown = {p: (ctl_start[p], ctl_end[p]) for p in ctl_both if not _growth_ok(ctl_start[p], ctl_end[p])}
    worst = max(ctl_both, key=lambda p: ctl_end[p][0] - ctl_start[p][0])
    _print(f"controller's processes that ran from a day after its last restart to the end ({len(ctl_both)}): "
           f"fds {ctl_s[0]} -> {ctl_e[0]}, RSS {ctl_s[1] // 1024} -> {ctl_e[1] // 1024} MiB; most fds gained by one "
           f"process: {ctl_end[worst][0] - ctl_start[worst][0]:+d} ({restarted_described.get(worst)} -> {_describe(worst)})")

    _print(f"connections on the controller's config port (:{config_port}) at rest: {config_connections} "
           f"for {fed.proxy_count()} proxies")

    # every proxy SYNCED at the last revision, and the month's checks green
    assert {p["sync"] for p in final["proxies"]} == {"SYNCED"}
    assert {p["acked_revision"] for p in final["proxies"]} == {retired} and len(final["proxies"]) == fed.proxy_count()
    assert checks["proxy certificates valid and renewed in time"]["ok"], checks["proxy certificates valid and renewed in time"]
    assert checks["serving certificates renewed in time"]["ok"]
    # traffic: nothing failed outside the injected faults
    assert len(every) >= LOAD_RATE_PER_S * len(records) * 120
    assert not failed_outside, failed_outside[:5]
    # rotation: every identity renewed at half-life for a month (≥ 2 per simulated day each)
    identities = sum(int((p.get("certificate") or {}).get("identities") or 0) for p in final["proxies"])
    assert rotated >= identities * (SIMULATED_DAYS - 4) * 1.5, (rotated, identities)
    assert soak.serving_renewals >= 2 * (SIMULATED_DAYS - 16) - 2
    # resources: no fd or memory growth beyond the bounds
    grown = {n: (_total(start_usage[n]), _total(end_usage[n])) for n in end_usage
             if n not in ("controller", proxy) and n in start_usage and not _growth_ok(_total(start_usage[n]), _total(end_usage[n]))}
    assert not grown, grown
    assert not ctl_grown, (ctl_grown, [(restarted_described.get(p), _describe(p)) for p in ctl_grown])  # per process
    # at rest a proxy holds one connection to the config port (its config and health streams share
    # it): a channel that outlives its use shows here long before it shows in the fd bound
    assert config_connections <= fed.proxy_count() + CONFIG_CONNECTIONS_SLACK, \
        (config_connections, [_describe(p) for p in end_usage["controller"]])
    assert json.dumps(final)   # the status stayed serialisable (a smoke check of the document)
