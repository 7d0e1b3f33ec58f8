"""Data-plane benchmark: raw TCP, raw TLS, an HAProxy mTLS pair, a ztunnel pair, and the
double-HBONE gateway path, side by side in one run, on loopback; then a capacity sweep.

    python -m benchmarks.dataplane [--quick] [--rounds 3] [--profile DIR] [--sweep 100,200,400,800]
                                   [--sweep-s 3] [--max-setups-in-flight N] [--shed-at-loop-lag-ms MS]

Per path: `gbps` (one stream, median of runs), `rr_1k_us_p50`/`rr_1k_us_p99` (1 KB request,
1 KB response on an open connection), `conn_us_p50` (new connection + first byte back; for the
ztunnel paths this includes the SOCKS5 exchange the application does); for the proxied paths, each
proxy's CPU per operation (`rr_cpu_us_<role>`, `conn_cpu_us_<role>`, `bulk_cpu_us_per_mib_<role>`:
steadier than the rates on a shared machine). The echo/sink server runs
in its own process; proxies run as real processes (`python -m ztunnel`, `haproxy`); the client is
blocking sockets in this process. `ztunnel_gateway_full_handshake` is the gateway path again from
a second copy of node A started with `--no-tls-resumption` (new connections only): the before and
after of TLS session resumption, measured in the same rounds. Also: proxy RSS idle and per
endpoint in config (a node loaded with 10000 extra endpoints), an idle node proxy's CPU (ms per
second, `ztunnel_idle_cpu_ms_per_s`), and the framer micro-benchmark (our
HBONE framer vs the `h2` library, in memory). `python_tls_pair` is the floor under the ztunnel
pair: a bare Python TLS relay pair (`benchmarks.tls_relay`: the ztunnels' TLS adapter on uvloop,
mutual TLS, a TLS connection per client connection with sessions reused as HAProxy reuses them,
no HBONE and nothing of the mesh), measured in the same rounds; `python_tls_pair_threaded` the
same relay written with blocking `ssl` sockets and a thread per connection. Their ratios
against HAProxy's pair are in the summary next to ours.

Capacity (`capacity`): an open-loop sweep of new connections per second through node A's SOCKS5
listener (each: connect, 64 bytes echoed, close; 2 s timeout), within the cluster (`pair`) and
through the gateway (`gateway`). Per rate: the share ok / refused (explicitly and at once) /
timed out, p50/p99 of the successful ones and p99 of the refusals; the knee is the highest rate
that held (>= 99 % ok at p99 <= 50 ms). `ejections_during_sweep` counts outlier ejections the sweep
caused at node A and the gateway (saturation must cause none) and `overload_refusals` the
connections each proxy shed.

The last line of output is one JSON object; its `summary` holds the ratios against HAProxy's pair
(`ztunnel_pair_added_latency_ratio`, `ztunnel_pair_throughput_ratio`, `ztunnel_gateway_conn_ratio`,
`ztunnel_gateway_conn_ratio_full_handshake`, `ztunnel_gateway_throughput_ratio`), the knees, the
RSS and idle CPU figures, the load average at start and end, and the targets of issue 16. `event_loop` says
which loop the ztunnels ran (`--event-loop`, passed to them: auto runs uvloop, a dependency).

The machine is shared, so every path is measured once per *round*, rounds interleaved, and each
figure is the median over rounds; a ratio is computed within a round (against HAProxy measured
minutes apart from it, not an hour) and the median of those is reported. `--profile DIR` runs
`py-spy record` on the proxies during the last round's phases (rr / conn / bulk) and prints the top
functions by self time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.measure import pct, proc_cpu_s, proc_run_s
from ztunnel.__main__ import EVENT_LOOPS, resolve_event_loop

ROOT = Path(__file__).resolve().parents[1]
IDLE_CPU_WINDOW_S = 3.0     # how long an idle node proxy's CPU is sampled (its lag probe wakes at 4 Hz)


# --- servers (run in a child process) -------------------------------------------------------------


def serve(host: str, echo_port: int, sink_port: int, tls_port: int, cert: str, key: str, ca: str) -> None:
    import asyncio

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(262144):
                w.write(data)
                await w.drain()
        except OSError:
            pass
        w.close()

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        n = 0
        try:
            want = int.from_bytes(await r.readexactly(8), "big")
            while n < want and (data := await r.read(262144)):
                n += len(data)
            w.write(str(n).encode())
            await w.drain()
        except OSError:
            pass
        w.close()

    async def main() -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        s1 = await asyncio.start_server(echo, host, echo_port)
        s2 = await asyncio.start_server(sink, host, sink_port)
        s3 = await asyncio.start_server(echo, host, tls_port, ssl=ctx)
        s4 = await asyncio.start_server(sink, host, tls_port + 1, ssl=ctx)
        print("ready", flush=True)
        await asyncio.gather(s1.serve_forever(), s2.serve_forever(), s3.serve_forever(), s4.serve_forever())

    asyncio.run(main())


# --- client measurements ---------------------------------------------------------------------------


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Path_:
    def __init__(self, name: str, connect: Any) -> None:
        self.name, self.connect = name, connect


def socks_open(socks: tuple[str, int], host: str, port: int, src: str) -> socket.socket:
    s = socket.create_connection(socks, source_address=(src, 0))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b"\x05\x01\x00\x05\x01\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big"))
    got = b""
    while len(got) < 12:
        chunk = s.recv(12 - len(got))
        if not chunk:
            raise ConnectionError("proxy closed during SOCKS")
        got += chunk
    if got[3] != 0:
        raise ConnectionError(f"SOCKS reply {got[3]}")
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        c = s.recv(n - len(buf))
        if not c:
            raise ConnectionError("closed")
        buf += c
    return bytes(buf)


class Profiler:
    """`py-spy record` on the proxies during one phase of a measurement (--profile DIR)."""

    def __init__(self, out_dir: Path | None, pids: dict[str, int]) -> None:
        self.out_dir, self.pids = out_dir, pids
        self.procs: list[tuple[Path, subprocess.Popen[bytes]]] = []

    def start(self, phase: str) -> None:
        if self.out_dir is None:
            return
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        for name, pid in self.pids.items():
            out = self.out_dir / f"{phase}-{name}.txt"
            p = subprocess.Popen([spy, "record", "--format", "raw", "--rate", "250", "--nonblocking",
                                  "-o", str(out), "-p", str(pid)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs.append((out, p))
        time.sleep(0.5)  # py-spy attaches

    def stop(self) -> None:
        for _, p in self.procs:
            p.send_signal(signal.SIGINT)
        for _, p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()


def top_functions(raw: Path, n: int = 12) -> list[tuple[str, float, float]]:
    """(function, self %, inclusive %) from a py-spy raw (collapsed stacks) file, by self time."""
    self_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [_short_frame(f) for f in stack.split(";")]
        if frames and frames[0].startswith(("process ", "thread ")):
            frames = frames[1:]
        if not frames:
            continue
        total += count
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + count
        for f in set(frames):
            incl_n[f] = incl_n.get(f, 0) + count
    ranked = sorted(self_n.items(), key=lambda kv: -kv[1])[:n]
    return [(f, round(100 * c / max(1, total), 1), round(100 * incl_n[f] / max(1, total), 1)) for f, c in ranked]


def _short_frame(frame: str) -> str:
    """`func (/path/to/mod.py:123)` → `func (mod.py)`."""
    name, sep, where = frame.partition(" (")
    if not sep:
        return frame
    return f"{name} ({where.split(':')[0].rsplit('/', 1)[-1]})"


def measure(connect_echo: Any, connect_sink: Any, quick: bool, prof: Profiler | None = None,
            conn_only: bool = False, cpu_pids: dict[str, int] | None = None,
            bulk_pids: dict[str, int] | None = None) -> dict[str, float]:
    """One round of a path. `cpu_pids` (the path's proxy processes by role): their CPU per 1 KB
    request/response, per new connection and per MiB of the single stream is reported too
    (`rr_cpu_us_<role>`, `conn_cpu_us_<role>`, `bulk_cpu_us_per_mib_<role>`): what a latency,
    connection or throughput figure costs each hop, load or not. `bulk_pids`: the processes the
    bulk stream goes through, when not those (the bare relays run one pair per upstream)."""
    prof = prof or Profiler(None, {})
    cpu_pids = cpu_pids or {}
    if conn_only:
        return measure_conn(connect_echo, quick, prof, cpu_pids)
    # request/response 1 KB
    prof.start("rr")
    s = connect_echo()
    msg = b"x" * 1024
    for _ in range(50):
        s.sendall(msg)
        recv_exact(s, 1024)
    lat = []
    cpu0 = {role: proc_run_s(pid) for role, pid in cpu_pids.items()}
    for _ in range(300 if quick else 1000):
        t0 = time.perf_counter()
        s.sendall(msg)
        recv_exact(s, 1024)
        lat.append(time.perf_counter() - t0)
    rr_cpu = cpu_us_per_op("rr_cpu_us_", cpu_pids, cpu0, len(lat))
    s.close()
    prof.stop()
    lat.sort()
    conn = measure_conn(connect_echo, quick, prof, cpu_pids)
    # throughput, single stream
    prof.start("bulk")
    total = (64 if quick else 128) * 1024 * 1024
    chunk = b"\0" * (256 * 1024)
    runs = []
    # clock ticks, not schedstat: a second or so is long enough, and the relays' per-connection
    # threads have ended by the second reading (schedstat counts live threads only)
    bulk_pids = bulk_pids or cpu_pids
    cpu0 = {role: proc_cpu_s([pid]) for role, pid in bulk_pids.items()}
    for _ in range(2):
        c = connect_sink()
        t0 = time.perf_counter()
        c.sendall(total.to_bytes(8, "big"))
        sent = 0
        while sent < total:
            c.sendall(chunk)
            sent += len(chunk)
        reply = c.recv(64)
        dt = time.perf_counter() - t0
        c.close()
        if int(reply or b"0") != total:
            raise RuntimeError(f"sink got {reply!r}, expected {total}")
        runs.append(total * 8 / dt / 1e9)
    mib = len(runs) * total // (1024 * 1024)
    bulk_cpu = {f"bulk_cpu_us_per_mib_{role}": round((proc_cpu_s([pid]) - cpu0[role]) * 1e6 / mib, 1)
                for role, pid in bulk_pids.items()}
    prof.stop()
    return {
        "gbps": round(statistics.median(runs), 3),
        **bulk_cpu,
        "rr_1k_us_p50": round(lat[len(lat) // 2] * 1e6, 1),
        "rr_1k_us_p99": round(lat[int(len(lat) * 0.99)] * 1e6, 1),
        **rr_cpu,
        **conn,
    }


def cpu_us_per_op(prefix: str, cpu_pids: dict[str, int], cpu0: dict[str, float], ops: int) -> dict[str, float]:
    """CPU µs each role's process spent per operation since `cpu0` (its `proc_run_s` readings)."""
    return {f"{prefix}{role}": round((proc_run_s(pid) - cpu0[role]) * 1e6 / ops, 1) for role, pid in cpu_pids.items()}


def measure_conn(connect_echo: Any, quick: bool, prof: Profiler, cpu_pids: dict[str, int]) -> dict[str, float]:
    """Median µs of a new connection + first byte back (`conn_us_p50`), and the CPU µs each of
    `cpu_pids` spent per connection (`conn_cpu_us_<role>`)."""
    prof.start("conn")
    conn = []
    cpu0 = {role: proc_run_s(pid) for role, pid in cpu_pids.items()}
    for _ in range(30 if quick else 80):
        t0 = time.perf_counter()
        c = connect_echo()
        c.sendall(b"!")
        recv_exact(c, 1)
        conn.append(time.perf_counter() - t0)
        c.close()
    time.sleep(0.05)   # what the proxies do for the last close is part of a connection's cost
    cpu = cpu_us_per_op("conn_cpu_us_", cpu_pids, cpu0, len(conn))
    prof.stop()
    return {"conn_us_p50": round(statistics.median(conn) * 1e6, 1), **cpu}


# --- capacity: open-loop rate sweep ---------------------------------------------------------------

SWEEP_P99_MS_MAX = 50.0      # issue 16: across clusters >= 400/s at p99 <= 50 ms
SWEEP_OK_MIN = 0.99
SWEEP_TIMEOUT_S = 2.0


def rate_sweep(socks: tuple[str, int], src: str, dest: tuple[str, int], rates: list[int],
               seconds: float) -> dict[str, Any]:
    """Open-loop load: `rate` new connections per second (a schedule, not a closed loop: a slow proxy
    does not slow the offered load down), each a SOCKS5 CONNECT through the node proxy, 64 bytes
    echoed, closed. Per rate: the share that succeeded, was refused (an explicit, immediate
    refusal: a SOCKS failure reply or a reset before it), timed out or failed otherwise, and p50/p99
    of the successful ones and of the refusals. The knee is the highest rate that still held
    (>= 99 % ok, p99 <= 50 ms)."""
    import asyncio

    async def one(started_at: float) -> tuple[str, float]:
        w = None
        try:
            async with asyncio.timeout(SWEEP_TIMEOUT_S):
                r, w = await asyncio.open_connection(*socks, local_addr=(src, 0))
                w.write(b"\x05\x01\x00\x05\x01\x00\x01" + socket.inet_aton(dest[0]) + dest[1].to_bytes(2, "big"))
                rep = await r.readexactly(12)
                if rep[3] != 0:
                    return "refused", time.perf_counter() - started_at
                w.write(b"p" * 64)
                await r.readexactly(64)
                return "ok", time.perf_counter() - started_at
        except TimeoutError:
            return "timeout", time.perf_counter() - started_at
        except (ConnectionError, asyncio.IncompleteReadError):
            return "refused", time.perf_counter() - started_at
        except OSError:
            return "error", time.perf_counter() - started_at
        finally:
            if w is not None:
                w.close()

    async def at_rate(rate: int) -> dict[str, Any]:
        n = max(1, int(rate * seconds))
        t0 = time.perf_counter()
        tasks = []
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(time.perf_counter())))
        done = await asyncio.gather(*tasks)
        by: dict[str, list[float]] = {}
        for kind, dt in done:
            by.setdefault(kind, []).append(dt)
        ok = sorted(by.get("ok", []))
        refused = sorted(by.get("refused", []))

        def ms(xs: list[float], q: float) -> float | None:
            return round(pct(xs, q) * 1000, 1) if xs else None

        return {"rate": rate, "sent": n, "completed_per_s": round(n / (time.perf_counter() - t0), 1),
                "ok": round(len(ok) / n, 3), "refused": round(len(refused) / n, 3),
                "timeout": round(len(by.get("timeout", [])) / n, 3), "error": round(len(by.get("error", [])) / n, 3),
                "ok_p50_ms": ms(ok, 0.5), "ok_p99_ms": ms(ok, 0.99), "refused_p99_ms": ms(refused, 0.99)}

    async def sweep() -> list[dict[str, Any]]:
        out = []
        for rate in rates:
            out.append(await at_rate(rate))
            await asyncio.sleep(1.0)  # let the proxies drain what the last rate left
        return out

    steps = asyncio.run(sweep())
    knee = 0
    for s in sorted(steps, key=lambda s: s["rate"]):  # the last rate that held before the first that did not
        if s["ok"] < SWEEP_OK_MIN or (s["ok_p99_ms"] or 1e9) > SWEEP_P99_MS_MAX:
            break
        knee = s["rate"]
    return {"steps": steps, "knee_rate": knee}


def metric_total(admin_port: int, name: str, label: str = "") -> float:
    """The sum of a Prometheus counter's series on a proxy's admin port (those with `label`, e.g.
    'reason="overloaded"', when given)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if (line.startswith(name + "{") or line.startswith(name + " ")) and label in line)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_admin(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"proxy exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("proxy not ready")


def framer_microbench() -> dict[str, float]:
    """MB/s of DATA through a client→server pair in memory: our framer vs h2."""
    import h2.config
    import h2.connection

    from ztunnel.hbone.framer import DataReceived, HboneConnection, Role

    payload = b"\0" * 16_384
    n = 2000
    c, s = HboneConnection(Role.CLIENT), HboneConnection(Role.SERVER)
    c.initiate(0.0)
    s.initiate(0.0)
    s.receive_data(c.data_to_send(), 0.0)
    c.receive_data(s.data_to_send(), 0.0)
    s.receive_data(c.data_to_send(), 0.0)
    sid = c.open_stream("1.2.3.4:80")
    s.receive_data(c.data_to_send(), 0.0)
    s.respond(sid, 200)
    c.receive_data(s.data_to_send(), 0.0)
    t0 = time.perf_counter()
    for _ in range(n):
        c.send_data(sid, payload)
        for e in s.receive_data(c.data_to_send(), 0.0):
            if isinstance(e, DataReceived):
                s.acknowledge_received_data(e.stream_id, e.flow_controlled_bytes)
        c.receive_data(s.data_to_send(), 0.0)
    ours = n * len(payload) / (time.perf_counter() - t0) / 1e6
    hc = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    hs = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    hc.initiate_connection()
    hs.initiate_connection()
    hs.receive_data(hc.data_to_send())
    hc.receive_data(hs.data_to_send())
    hs.receive_data(hc.data_to_send())
    sid = hc.get_next_available_stream_id()
    hc.send_headers(sid, [(":method", "CONNECT"), (":authority", "1.2.3.4:80")])
    hs.receive_data(hc.data_to_send())
    hs.send_headers(sid, [(":status", "200")])
    hc.receive_data(hs.data_to_send())
    t0 = time.perf_counter()
    for _ in range(n):
        hc.send_data(sid, payload[:16_384])
        for e in hs.receive_data(hc.data_to_send()):
            if hasattr(e, "flow_controlled_length"):
                hs.acknowledge_received_data(e.flow_controlled_length, sid)
        hc.receive_data(hs.data_to_send())
    theirs = n * len(payload) / (time.perf_counter() - t0) / 1e6
    return {"ours_mb_s": round(ours, 1), "h2_mb_s": round(theirs, 1), "ratio": round(ours / theirs, 2)}


def _median_metrics(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = runs[0].keys()
    return {k: round(statistics.median(r[k] for r in runs), 1 if "us" in k else 3) for k in keys}


def ratios(hp: dict[str, float], raw: dict[str, float], z: dict[str, float]) -> dict[str, float]:
    """A path against HAProxy's pair measured in the same round: throughput, *added* latency (over
    raw TCP), new-connection time."""
    return {
        "gbps_ratio": z["gbps"] / hp["gbps"],
        "added_p50_ratio": (z["rr_1k_us_p50"] - raw["rr_1k_us_p50"]) / max(1.0, hp["rr_1k_us_p50"] - raw["rr_1k_us_p50"]),
        "conn_ratio": z["conn_us_p50"] / hp["conn_us_p50"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="data-plane benchmark; the last line of output is one JSON object")
    ap.add_argument("--quick", action="store_true", help="fewer samples, one round (a smoke run, ~20 s)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds over all paths; figures are medians over rounds (default 3)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="directory: py-spy record the ztunnels during each phase and print the top functions")
    ap.add_argument("--logs", type=Path, default=None, help="directory: keep the ztunnels' access logs there")
    ap.add_argument("--sweep", default="100,200,400,800",
                    help="new connections per second for the open-loop capacity sweep, comma-separated ('' skips it)")
    ap.add_argument("--sweep-s", type=float, default=3.0, help="seconds per rate of the sweep (default 3)")
    ap.add_argument("--only-sweep", action="store_true",
                    help="the capacity sweep alone (no latency/throughput rounds, no RSS): to compare shedding settings")
    ap.add_argument("--event-loop", choices=EVENT_LOOPS, default="auto",
                    help="the ztunnels' --event-loop (default auto: uvloop when installed)")
    ap.add_argument("--max-setups-in-flight", type=int, default=None,
                    help="the ztunnels' --max-setups-in-flight (default: theirs)")
    ap.add_argument("--shed-at-loop-lag-ms", type=float, default=None,
                    help="the ztunnels' --shed-at-loop-lag-ms (default: theirs)")
    ap.add_argument("--serve", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    if args.serve:
        h, e, k, t, cert, key, ca_ = args.serve
        serve(h, int(e), int(k), int(t), cert, key, ca_)
        return
    rounds = 1 if args.quick else max(1, args.rounds)
    t_start = time.monotonic()
    load_start = os.getloadavg()
    sys.path.insert(0, str(ROOT))
    from federation.controller.ca import TrustDomainCA
    from tests.integration import dataplane_topology as topo
    from ztunnel.api.config import ProxyMode

    tmp = Path(tempfile.mkdtemp(prefix="meshfed-bench-"))
    # the ztunnels import this tree first, then whatever PYTHONPATH adds
    zt_env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    procs: list[subprocess.Popen[bytes]] = []
    per_round: dict[str, list[dict[str, float]]] = {}
    extra: dict[str, dict[str, Any]] = {}
    results: dict[str, Any] = {"event_loop": resolve_event_loop(args.event_loop)}
    try:
        td = "east.mesh"
        ca = TrustDomainCA.create(td)
        (tmp / "ca.pem").write_bytes(ca.roots_pem())
        for name in ("server", "client", "hap1", "hap2"):
            iss = ca.issue_svid(f"spiffe://{td}/ns/bench/sa/{name}")
            (tmp / f"{name}.crt").write_bytes(iss.chain_pem)
            (tmp / f"{name}.key").write_bytes(iss.key_pem)
            (tmp / f"{name}.pem").write_bytes(iss.chain_pem + iss.key_pem)
        srv_ip = "127.56.0.100"
        echo_p, sink_p = _free_port(srv_ip), _free_port(srv_ip)
        tls_p = _free_port(srv_ip)  # tls echo; tls_p + 1: tls sink (an address of its own: free)
        sp = subprocess.Popen([sys.executable, "-m", "benchmarks.dataplane", "--serve", srv_ip, str(echo_p),
                               str(sink_p), str(tls_p), str(tmp / "server.crt"), str(tmp / "server.key"),
                               str(tmp / "ca.pem")], cwd=ROOT, stdout=subprocess.PIPE)
        procs.append(sp)
        assert sp.stdout is not None and sp.stdout.readline().strip() == b"ready"

        def tcp(host: str, port: int) -> Any:
            def f() -> socket.socket:
                s = socket.create_connection((host, port))
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return s
            return f

        cctx = ssl.create_default_context(cafile=str(tmp / "ca.pem"))
        cctx.check_hostname = False
        cctx.load_cert_chain(str(tmp / "client.crt"), str(tmp / "client.key"))

        def tls(port: int) -> Any:
            return lambda: cctx.wrap_socket(tcp(srv_ip, port)())

        cpu_pids: dict[str, dict[str, int]] = {}   # path → its proxies' pids by role (a: first hop)
        bulk_pids: dict[str, dict[str, int]] = {}  # the same for the bulk stream where it differs
        paths: dict[str, tuple[Any, Any]] = {
            "raw_tcp": (tcp(srv_ip, echo_p), tcp(srv_ip, sink_p)),
            "raw_tls": (tls(tls_p), tls(tls_p + 1)),
        }
        # haproxy pair: plain → TLS → plain (HAProxy's default 16 KiB buffers, like for like with TLS)
        if shutil.which("haproxy"):
            h1, h2ip = "127.56.0.1", "127.56.0.2"
            p1, p2, p1s, p2s = _free_port(h1), _free_port(h2ip), _free_port(h1), _free_port(h2ip)
            c1 = f"""global
  maxconn 2000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen echo
  bind {h1}:{p1}
  server s {h2ip}:{p2} ssl crt {tmp}/hap1.pem ca-file {tmp}/ca.pem verify required
listen sink
  bind {h1}:{p1s}
  server s {h2ip}:{p2s} ssl crt {tmp}/hap1.pem ca-file {tmp}/ca.pem verify required
"""
            c2 = f"""global
  maxconn 2000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen echo
  bind {h2ip}:{p2} ssl crt {tmp}/hap2.pem ca-file {tmp}/ca.pem verify required
  server s {srv_ip}:{echo_p}
listen sink
  bind {h2ip}:{p2s} ssl crt {tmp}/hap2.pem ca-file {tmp}/ca.pem verify required
  server s {srv_ip}:{sink_p}
"""
            hap = []
            for i, c in enumerate((c1, c2)):
                (tmp / f"h{i}.cfg").write_text(c)
                p = subprocess.Popen(["haproxy", "-f", str(tmp / f"h{i}.cfg")], stderr=subprocess.DEVNULL)
                procs.append(p)
                hap.append(p)
            time.sleep(0.5)
            paths["haproxy_pair"] = (tcp(h1, p1), tcp(h1, p1s))
            cpu_pids["haproxy_pair"] = {"a": hap[0].pid, "b": hap[1].pid}
            extra["haproxy_pair"] = {"rss_kb_idle": rss_kb(hap[0].pid)}
        else:
            print("haproxy not installed (scripts/setup-system.sh installs it): no ratios", file=sys.stderr)
        # floors for a Python proxy pair: bare TLS relay pairs (benchmarks.tls_relay), built as ours
        # (the ztunnels' TLS adapter on uvloop) and threaded (blocking ssl sockets)
        for path, (py1, py2), flags in (("python_tls_pair", ("127.56.0.3", "127.56.0.4"), []),
                                        ("python_tls_pair_threaded", ("127.56.0.5", "127.56.0.6"), ["--threads"])):
            py_ports = {name: (_free_port(py1), _free_port(py2)) for name in ("echo", "sink")}
            for name, upstream in (("echo", echo_p), ("sink", sink_p)):
                a_port, b_port = py_ports[name]
                for mode, lh, lp, uh, up, who in (("server", py2, b_port, srv_ip, upstream, "hap2"),
                                                  ("client", py1, a_port, py2, b_port, "hap1")):
                    rp = subprocess.Popen([sys.executable, "-m", "benchmarks.tls_relay", mode, lh, str(lp), uh,
                                           str(up), str(tmp / f"{who}.crt"), str(tmp / f"{who}.key"),
                                           str(tmp / "ca.pem"), *flags], cwd=ROOT, stdout=subprocess.PIPE)
                    procs.append(rp)
                    assert rp.stdout is not None and rp.stdout.readline().strip() == b"ready"
                    # the relays the echo rounds go through, and those the bulk stream does
                    pids = cpu_pids if name == "echo" else bulk_pids
                    pids.setdefault(path, {})["a" if mode == "client" else "b"] = rp.pid
            paths[path] = (tcp(py1, py_ports["echo"][0]), tcp(py1, py_ports["sink"][0]))
        # ztunnel pair and gateway
        client_pod = topo.Pod("east", "a", "client", "127.56.1.101", f"spiffe://{td}/ns/bench/sa/client",
                              node_address="127.56.1.11")
        server_pod = topo.Pod("east", "b", "server", srv_ip, f"spiffe://{td}/ns/bench/sa/server",
                              node_address="127.56.1.12")
        gw_ip = "127.56.1.250"
        gw_id = f"spiffe://{td}/ns/bench/sa/gateway"
        hb = _free_port(gw_ip)
        wl = [client_pod.workload(), server_pod.workload()]
        svcs: list[Any] = []
        remote: list[Any] = []
        for name, port in (("echo", echo_p), ("sink", sink_p)):
            host = f"{name}.bench.svc.clusterset.local"
            ep = topo.endpoint(server_pod, port, hb)
            svcs.append(topo.service(host, "", port, port, [ep], sans=[server_pod.identity], connect_timeout_s=2))
            remote.append(topo.service(host, f"127.56.2.{len(remote) + 1}", port, port,
                                       [topo.endpoint(server_pod, port, hb, via_gateway=f"{gw_ip}:{hb}",
                                                      gateway_identity=gw_id)],
                                       sans=[server_pod.identity], connect_timeout_s=2))
        import dataclasses
        svcs_a = [dataclasses.replace(s_, vip=f"127.56.3.{i + 1}") for i, s_ in enumerate(svcs)]
        cfg_a = topo.proxy_config("ztunnel/east/a", "east", td, workloads=wl, services=svcs_a + remote, bundles=[],
                                  local_identities=[client_pod.identity])
        cfg_a = dataclasses.replace(cfg_a, bundles=(ca.trust_bundle(),))
        cfg_b = dataclasses.replace(cfg_a, proxy_id="ztunnel/east/b", local_identities=(server_pod.identity,),
                                    services=tuple(svcs))
        cfg_g = dataclasses.replace(cfg_a, proxy_id="gateway/east", mode=ProxyMode.GATEWAY, workloads=(),
                                    services=tuple(svcs), local_identities=(gw_id,))
        # "f": node A again, with --no-tls-resumption: the full-handshake gateway path, measured in the
        # same rounds as the resumed one (the before/after of resumption in one run)
        ids = {"a": client_pod.identity, "b": server_pod.identity, "g": gw_id, "f": client_pod.identity}
        ips = {"a": client_pod.node_address, "b": server_pod.node_address, "g": gw_ip, "f": "127.56.1.13"}
        admin = {}
        zt: dict[str, subprocess.Popen[bytes]] = {}
        socks_port = _free_port(ips["a"])
        for k, cfg in (("a", cfg_a), ("b", cfg_b), ("g", cfg_g), ("f", cfg_a)):
            d = tmp / k
            iss = ca.issue_svid(ids[k])
            topo.write_cert_dir(d, {ids[k]: (iss.chain_pem, iss.key_pem)})
            topo.write_config(tmp / f"{k}.json", cfg)
            admin[k] = _free_port("127.0.0.1")
            cmd = [sys.executable, "-m", "ztunnel", "--config", str(tmp / f"{k}.json"), "--cert-dir", str(d),
                   "--hbone", f"{ips[k]}:{hb}", "--socks", f"{ips[k]}:{socks_port}" if k in ("a", "f") else "",
                   "--admin", f"127.0.0.1:{admin[k]}", "--access-log", "stderr" if args.logs else "off",
                   "--event-loop", args.event_loop]
            if k == "f":
                cmd.append("--no-tls-resumption")
            if args.max_setups_in_flight is not None:
                cmd += ["--max-setups-in-flight", str(args.max_setups_in_flight)]
            if args.shed_at_loop_lag_ms is not None:
                cmd += ["--shed-at-loop-lag-ms", str(args.shed_at_loop_lag_ms)]
            log = (args.logs / f"ztunnel-{k}.log").open("wb") if args.logs else subprocess.DEVNULL
            p = subprocess.Popen(cmd, cwd=ROOT, stderr=log, env=zt_env)
            procs.append(p)
            zt[k] = p
        for k in zt:
            wait_admin(admin[k], zt[k])
        time.sleep(0.3)
        idle_rss = rss_kb(zt["a"].pid)

        def zs(vip: str, port: int, node: str = "a") -> Any:
            return lambda: socks_open((ips[node], socks_port), vip, port, client_pod.address)

        paths["ztunnel_pair"] = (zs("127.56.3.1", echo_p), zs("127.56.3.2", sink_p))
        cpu_pids["ztunnel_pair"] = {"a": zt["a"].pid, "b": zt["b"].pid}
        cpu_pids["ztunnel_gateway"] = {"a": zt["a"].pid, "g": zt["g"].pid, "b": zt["b"].pid}
        cpu_pids["ztunnel_gateway_full_handshake"] = {"a": zt["f"].pid, "g": zt["g"].pid, "b": zt["b"].pid}
        paths["ztunnel_gateway"] = (zs("127.56.2.1", echo_p), zs("127.56.2.2", sink_p))
        paths["ztunnel_gateway_full_handshake"] = (zs("127.56.2.1", echo_p, "f"), zs("127.56.2.2", sink_p, "f"))
        profilers = {
            "ztunnel_pair": Profiler(args.profile and args.profile / "pair", {"a": zt["a"].pid, "b": zt["b"].pid}),
            "ztunnel_gateway": Profiler(args.profile and args.profile / "gateway",
                                        {"a": zt["a"].pid, "g": zt["g"].pid, "b": zt["b"].pid}),
        }
        for d_ in (args.profile / "pair", args.profile / "gateway") if args.profile else ():
            d_.mkdir(parents=True, exist_ok=True)
        # interleaved rounds: every path once per round, so load from other users hits all alike
        for r in range(0 if args.only_sweep else rounds):
            for name, (echo_c, sink_c) in paths.items():
                prof = profilers.get(name) if r == rounds - 1 else None
                per_round.setdefault(name, []).append(
                    measure(echo_c, sink_c, args.quick, prof, conn_only=name == "ztunnel_gateway_full_handshake",
                            cpu_pids=cpu_pids.get(name), bulk_pids=bulk_pids.get(name)))
        # capacity: open-loop sweep of new connections per second, within the cluster and through the
        # gateway; whether the proxies' own saturation fed outlier detection (it must not)
        rates = [int(x) for x in args.sweep.split(",") if x.strip()]
        if rates:
            ejections_before = sum(metric_total(admin[k], "meshfed_endpoint_ejections_total") for k in ("a", "g"))
            results["capacity"] = {
                "pair": rate_sweep((ips["a"], socks_port), client_pod.address, ("127.56.3.1", echo_p), rates,
                                   args.sweep_s),
                "gateway": rate_sweep((ips["a"], socks_port), client_pod.address, ("127.56.2.1", echo_p), rates,
                                      args.sweep_s),
            }
            results["capacity"]["ejections_during_sweep"] = sum(
                metric_total(admin[k], "meshfed_endpoint_ejections_total") for k in ("a", "g")) - ejections_before
            results["capacity"]["overload_refusals"] = {
                k: metric_total(admin[k], "meshfed_connections_refused_total", 'reason="overloaded"')
                for k in ("a", "g", "b")}
        extra["ztunnel_pair"] = {"rss_kb_idle": idle_rss}
        extra["ztunnel_gateway"] = {"rss_kb_idle_gateway": rss_kb(zt["g"].pid)}
        for name, runs in per_round.items():
            results[name] = {**_median_metrics(runs), **extra.get(name, {})}
        if args.only_sweep:
            if "capacity" in results:
                cap = results["capacity"]
                results["summary"] = {"knee_rate_pair": cap["pair"]["knee_rate"],
                                      "knee_rate_gateway": cap["gateway"]["knee_rate"],
                                      "ejections_during_sweep": cap["ejections_during_sweep"],
                                      "loadavg_start": [round(x, 2) for x in load_start],
                                      "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
        else:
            # per-endpoint RSS: two fresh node processes started side by side, one with the benchmark's
            # config and one with N endpoints more; the difference of their RSS divided by N (fresh
            # processes on both sides: the traffic-carrying node's heap is not a baseline)
            n_eps = 10_000
            big = dataclasses.replace(svcs_a[0], hostname="big.bench.svc.clusterset.local", vip="127.56.4.1",
                                      endpoints=tuple(dataclasses.replace(svcs_a[0].endpoints[0],
                                                                          workload_uid=f"east/bench/p{i}",
                                                                          address=f"127.57.{i // 250}.{i % 250 + 1}")
                                                      for i in range(n_eps)))
            topo.write_config(tmp / "big.json", dataclasses.replace(cfg_a, services=(*cfg_a.services, big)))
            rss_procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
            for label, cfg_file, hb_ip in (("small", tmp / "a.json", "127.56.1.22"), ("big", tmp / "big.json", "127.56.1.21")):
                adm = _free_port("127.0.0.1")
                p = subprocess.Popen([sys.executable, "-m", "ztunnel", "--config", str(cfg_file), "--cert-dir",
                                      str(tmp / "a"), "--hbone", f"{hb_ip}:{hb}", "--socks", "",
                                      "--admin", f"127.0.0.1:{adm}", "--access-log", "off",
                                      "--event-loop", args.event_loop], cwd=ROOT,
                                     stderr=subprocess.PIPE, env=zt_env)
                procs.append(p)
                rss_procs[label] = (p, adm)
            for p, adm in rss_procs.values():
                wait_admin(adm, p)
            time.sleep(0.3)
            small_kb, big_kb = rss_kb(rss_procs["small"][0].pid), rss_kb(rss_procs["big"][0].pid)
            # idle CPU: what a node proxy with no traffic spends (timers, probes), a second after it is ready
            time.sleep(1.0)
            idle_proc = rss_procs["small"][0]
            run0, t0 = proc_run_s(idle_proc.pid), time.monotonic()
            time.sleep(IDLE_CPU_WINDOW_S)
            run1 = proc_run_s(idle_proc.pid)
            # None rather than a figure that looks like a gain: the proxy exited, or no schedstat here
            idle_cpu = (round((run1 - run0) / (time.monotonic() - t0) * 1000, 2)
                        if idle_proc.poll() is None and run0 > 0 and run1 >= run0 else None)
            results["rss"] = {"ztunnel_idle_kb": small_kb, "node_a_before_traffic_kb": idle_rss,
                              "endpoints_added": n_eps, "ztunnel_big_kb": big_kb,
                              "bytes_per_endpoint": round((big_kb - small_kb) * 1024 / n_eps),
                              "ztunnel_idle_cpu_ms_per_s": idle_cpu}
            results["framer"] = framer_microbench()
            if "haproxy_pair" in per_round:
                fh = [f["conn_us_p50"] / h["conn_us_p50"]
                      for h, f in zip(per_round["haproxy_pair"], per_round["ztunnel_gateway_full_handshake"], strict=True)]
                results["ztunnel_gateway_full_handshake"]["vs_haproxy"] = {"conn_ratio": round(statistics.median(fh), 2)}
                for k in ("ztunnel_pair", "ztunnel_gateway", "python_tls_pair", "python_tls_pair_threaded"):
                    rs = [ratios(h, raw, z) for h, raw, z in zip(per_round["haproxy_pair"], per_round["raw_tcp"],
                                                                 per_round[k], strict=True)]
                    results[k]["vs_haproxy"] = {m: round(statistics.median(x[m] for x in rs), 2) for m in rs[0]}
                pair, gw = results["ztunnel_pair"]["vs_haproxy"], results["ztunnel_gateway"]["vs_haproxy"]
                results["summary"] = {
                    "ztunnel_pair_added_latency_ratio": pair["added_p50_ratio"],
                    "ztunnel_pair_throughput_ratio": pair["gbps_ratio"],
                    "ztunnel_gateway_conn_ratio": gw["conn_ratio"],
                    "ztunnel_gateway_conn_ratio_full_handshake": round(statistics.median(fh), 2),
                    "ztunnel_gateway_throughput_ratio": gw["gbps_ratio"],
                    "ztunnel_pair_conn_ratio": pair["conn_ratio"],
                    # the floor: a bare Python TLS relay pair (no HBONE, no mesh) against the same HAProxy pair
                    "python_tls_pair_added_latency_ratio": results["python_tls_pair"]["vs_haproxy"]["added_p50_ratio"],
                    "python_tls_pair_throughput_ratio": results["python_tls_pair"]["vs_haproxy"]["gbps_ratio"],
                    "python_tls_pair_conn_ratio": results["python_tls_pair"]["vs_haproxy"]["conn_ratio"],
                    **{f"python_tls_pair_threaded_{m}": results["python_tls_pair_threaded"]["vs_haproxy"][r]
                       for m, r in (("added_latency_ratio", "added_p50_ratio"), ("throughput_ratio", "gbps_ratio"),
                                    ("conn_ratio", "conn_ratio"))},
                    "ztunnel_rss_idle_mb": round(results["rss"]["ztunnel_idle_kb"] / 1024, 1),
                    "ztunnel_rss_bytes_per_endpoint": results["rss"]["bytes_per_endpoint"],
                    "ztunnel_idle_cpu_ms_per_s": results["rss"]["ztunnel_idle_cpu_ms_per_s"],
                    **({"knee_rate_pair": results["capacity"]["pair"]["knee_rate"],
                        "knee_rate_gateway": results["capacity"]["gateway"]["knee_rate"],
                        "ejections_during_sweep": results["capacity"]["ejections_during_sweep"]}
                       if "capacity" in results else {}),
                    # issue 16's targets (issue 5's were 2.0 / 0.6 / 1.5)
                    "targets": {"pair_added_latency_ratio_max": 1.25, "pair_throughput_ratio_min": 0.8,
                                "gateway_throughput_ratio_min": 0.6, "gateway_conn_ratio_max": 1.5,
                                "gateway_conn_ratio_stretch": 1.0, "knee_rate_gateway_min": 400,
                                "knee_p99_ms_max": SWEEP_P99_MS_MAX, "ejections_during_sweep": 0,
                                "rss_idle_mb_max": 40, "rss_bytes_per_endpoint_max": 400},
                    "rounds": rounds,
                    "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                    "wall_s": round(time.monotonic() - t_start, 1),
                }
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.profile:
        prof_out: dict[str, Any] = {}
        for f in sorted(args.profile.glob("*/*.txt")):
            top = top_functions(f)
            prof_out[f"{f.parent.name}/{f.stem}"] = top
            print(f"--- profile {f.parent.name}/{f.stem} (self %, inclusive %)", file=sys.stderr)
            for fn, self_pct, incl in top:
                print(f"  {self_pct:5.1f} {incl:5.1f}  {fn}", file=sys.stderr)
        results["profile_top"] = {k: v[:5] for k, v in prof_out.items()}
    for k, v in results.items():
        print(f"{k:16s} {v}", file=sys.stderr)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
