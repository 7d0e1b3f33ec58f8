"""Waypoint benchmark: HTTP request/response through client ztunnel → waypoint → server ztunnel,
against HAProxy doing the same hop chain in HTTP mode, and against no proxy at all, in one run.

    python -m benchmarks.waypoint [--quick] [--rounds 3] [--seconds 4] [--clients 8]

The chains (loopback, each hop its own process, mTLS between hops):

- `direct`: client → HTTP server (the baseline the *added* latency is measured against);
- `haproxy`: client → HAProxy (TCP, originates mTLS) → HAProxy (HTTP mode: terminates mTLS, parses
  every request, keeps upstream connections alive, originates mTLS) → HAProxy (TCP, terminates mTLS)
  → server: what an operator would run instead of ztunnel → waypoint → ztunnel;
- `waypoint`: client → node ztunnel (SOCKS5, then HBONE as the client's identity) → waypoint (HTTP/1.1
  per request: authorization, route, backend, outlier outcome, access-log off) → node ztunnel (HBONE
  as the waypoint, naming the caller) → server.

Per chain: `p50_us`/`p99_us` (one keep-alive connection, sequential 64-byte GETs) and `rps` (`--clients`
processes, each one keep-alive connection, sequential requests, for `--seconds`). Rounds are
interleaved and each figure is the median over rounds; the ratios are computed within a round. The
last line of output is one JSON object; its `summary` holds `added_p50_ratio` and `added_p99_ratio`
((waypoint − direct) / (haproxy − direct)) and `rps_ratio` (waypoint / haproxy), with the targets
(added latency ≤ 2×, requests/s ≥ 0.5×) and what limits the waypoint chain (`limits`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.dataplane import _free_port, rss_kb, socks_open, wait_admin
from ztunnel.__main__ import EVENT_LOOPS, resolve_event_loop

ROOT = Path(__file__).resolve().parents[1]
REQUEST = b"GET /bench HTTP/1.1\r\nHost: echo.bench.svc.clusterset.local\r\n\r\n"
BODY = b"x" * 64


def child_env() -> dict[str, str]:
    """The proxies' and the server's environment: this tree first, then the caller's PYTHONPATH."""
    extra = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + extra if extra else "")}


# --- the HTTP server (a child process) --------------------------------------------------------------


def serve(host: str, port: int) -> None:
    """A keep-alive HTTP/1.1 responder as cheap as possible (GETs without bodies), so the chains, not
    the server, are what is measured."""
    import asyncio

    response = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: " + str(len(BODY)).encode()
                + b"\r\n\r\n" + BODY)

    class Http(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport
            self.buf = b""
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data: bytes) -> None:
            self.buf += data
            n = self.buf.count(b"\r\n\r\n")
            if n:
                self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4:]
                self.t.write(response * n)  # type: ignore[attr-defined]

    async def main() -> None:
        srv = await asyncio.get_running_loop().create_server(Http, host, port, backlog=1024)
        print("ready", flush=True)
        await srv.serve_forever()

    asyncio.run(main())


# --- clients ------------------------------------------------------------------------------------


def _read_response(s: socket.socket, buf: bytearray) -> None:
    """Read one response (Content-Length framed) from `s`, keeping what follows it in `buf`."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buf[:end]).lower()
            i = head.find(b"content-length:")
            length = int(head[i + 15:head.find(b"\r\n", i) if head.find(b"\r\n", i) >= 0 else len(head)]) if i >= 0 else 0
            if len(buf) >= end + 4 + length:
                if not head.startswith(b"http/1.1 200"):
                    raise RuntimeError(f"status {head[:40]!r}")
                del buf[:end + 4 + length]
                return
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the proxy")
        buf += chunk


def connector(kind: str, target: tuple[str, int], socks: tuple[str, int] | None, src: str) -> socket.socket:
    if socks is not None:
        return socks_open(socks, target[0], target[1], src)
    s = socket.create_connection(target)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def latency(target: tuple[str, int], socks: tuple[str, int] | None, src: str, n: int) -> tuple[float, float]:
    s = connector("", target, socks, src)
    buf = bytearray()
    for _ in range(100):
        s.sendall(REQUEST)
        _read_response(s, buf)
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        s.sendall(REQUEST)
        _read_response(s, buf)
        lat.append(time.perf_counter() - t0)
    s.close()
    lat.sort()
    return lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6


def _rps_worker(args: tuple[tuple[str, int], tuple[str, int] | None, str, float, float]) -> int:
    target, socks, src, start_at, seconds = args
    s = connector("", target, socks, src)
    buf = bytearray()
    s.sendall(REQUEST)
    _read_response(s, buf)
    while time.time() < start_at:
        time.sleep(0.001)
    n = 0
    end = start_at + seconds
    while time.time() < end:
        s.sendall(REQUEST)
        _read_response(s, buf)
        n += 1
    s.close()
    return n


def rps(pool: Any, target: tuple[str, int], socks: tuple[str, int] | None, src: str, clients: int,
        seconds: float) -> float:
    start_at = time.time() + 1.0
    counts = pool.map(_rps_worker, [(target, socks, src, start_at, seconds)] * clients)
    return float(sum(counts)) / seconds


# --- the chains -----------------------------------------------------------------------------------


def haproxy_chain(tmp: Path, server: tuple[str, int]) -> tuple[list[subprocess.Popen[bytes]], tuple[str, int]]:
    """Three HAProxies: TCP+mTLS out, HTTP mode in the middle (mTLS both sides), TCP+mTLS in."""
    a, b, c = "127.58.0.1", "127.58.0.2", "127.58.0.3"
    pa, pb, pc = _free_port(a), _free_port(b), _free_port(c)
    common = ("global\n  maxconn 4000\ndefaults\n  timeout connect 5s\n  timeout client 60s\n"
              "  timeout server 60s\n")
    tls_out = f"ssl crt {tmp}/hap.pem ca-file {tmp}/ca.pem verify required"
    tls_in = f"ssl crt {tmp}/hap.pem ca-file {tmp}/ca.pem verify required"
    cfgs = [
        common + f"listen client\n  mode tcp\n  bind {a}:{pa}\n  server s {b}:{pb} {tls_out}\n",
        common + (f"listen waypoint\n  mode http\n  option http-keep-alive\n  http-reuse always\n"
                  f"  bind {b}:{pb} {tls_in}\n  server s {c}:{pc} {tls_out}\n"),
        common + f"listen server\n  mode tcp\n  bind {c}:{pc} {tls_in}\n  server s {server[0]}:{server[1]}\n",
    ]
    procs = []
    for i, cfg in enumerate(cfgs):
        (tmp / f"hap{i}.cfg").write_text(cfg)
        procs.append(subprocess.Popen(["haproxy", "-f", str(tmp / f"hap{i}.cfg")], stderr=subprocess.DEVNULL))
    time.sleep(0.5)
    return procs, (a, pa)


def waypoint_chain(tmp: Path, server: tuple[str, int], logs: Path | None, loop: str = "auto"
                   ) -> tuple[dict[str, subprocess.Popen[bytes]], tuple[str, int], str, str]:
    """Node ztunnel a (client) → waypoint w → node ztunnel b (server), as processes from files."""
    from federation.controller.ca import TrustDomainCA
    from tests.integration import dataplane_topology as topo
    from ztunnel.api.config import ProxyMode, WaypointRef

    td = "east.mesh"
    ca = TrustDomainCA.create(td)
    (tmp / "ca.pem").write_bytes(ca.roots_pem())
    hap = ca.issue_svid(f"spiffe://{td}/ns/bench/sa/haproxy")
    (tmp / "hap.pem").write_bytes(hap.chain_pem + hap.key_pem)
    client = topo.Pod("east", "a", "client", "127.58.1.101", f"spiffe://{td}/ns/bench/sa/client", "bench",
                      node_address="127.58.1.11")
    srv = topo.Pod("east", "b", "server", server[0], f"spiffe://{td}/ns/bench/sa/server", "bench",
                   node_address="127.58.1.12")
    wp_ip = "127.58.1.50"
    wp_id = f"spiffe://{td}/ns/bench/sa/waypoint"
    hb = _free_port(wp_ip)
    host = "echo.bench.svc.clusterset.local"
    vip = "127.58.3.1"
    wp = WaypointRef("waypoint", "bench", wp_id, (f"{wp_ip}:{hb}",), (wp_id,))
    svc = dataclasses.replace(topo.service(host, vip, server[1], server[1], [topo.endpoint(srv, server[1], hb)],
                                           connect_timeout_s=2), waypoint=wp)
    wl = [client.workload(), srv.workload()]
    base = topo.proxy_config("ztunnel/east/a", "east", td, workloads=wl, services=[svc], bundles=[],
                             local_identities=[client.identity])
    base = dataclasses.replace(base, bundles=(ca.trust_bundle(),))
    cfgs = {
        "a": base,
        "w": dataclasses.replace(base, proxy_id="waypoint/east/bench/waypoint", mode=ProxyMode.WAYPOINT,
                                 workloads=(), local_identities=(wp_id,)),
        "b": dataclasses.replace(base, proxy_id="ztunnel/east/b", local_identities=(srv.identity,)),
    }
    ids = {"a": client.identity, "w": wp_id, "b": srv.identity}
    ips = {"a": client.node_address, "w": wp_ip, "b": srv.node_address}
    socks_port = _free_port(ips["a"])
    procs: dict[str, subprocess.Popen[bytes]] = {}
    admins: dict[str, int] = {}
    for k, cfg in cfgs.items():
        iss = ca.issue_svid(ids[k])
        topo.write_cert_dir(tmp / k, {ids[k]: (iss.chain_pem, iss.key_pem)})
        topo.write_config(tmp / f"{k}.json", cfg)
        admins[k] = _free_port("127.0.0.1")
        cmd = [sys.executable, "-m", "ztunnel", "--config", str(tmp / f"{k}.json"), "--cert-dir", str(tmp / k),
               "--hbone", f"{ips[k]}:{hb}", "--socks", f"{ips[k]}:{socks_port}" if k == "a" else "",
               "--admin", f"127.0.0.1:{admins[k]}", "--access-log", "stderr" if logs else "off", "--event-loop", loop]
        log = (logs / f"{k}.log").open("wb") if logs else subprocess.DEVNULL
        procs[k] = subprocess.Popen(cmd, cwd=ROOT, stderr=log, env=child_env())
    for k, p in procs.items():
        wait_admin(admins[k], p)
    return procs, (ips["a"], socks_port), vip, client.address


def main() -> None:
    ap = argparse.ArgumentParser(description="waypoint benchmark; the last line of output is one JSON object")
    ap.add_argument("--quick", action="store_true", help="one short round (a smoke run)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each requests/s run")
    ap.add_argument("--clients", type=int, default=8, help="concurrent keep-alive connections for requests/s")
    ap.add_argument("--requests", type=int, default=2000, help="sequential requests for the latency figures")
    ap.add_argument("--logs", type=Path, default=None, help="keep the proxies' access logs in this directory")
    ap.add_argument("--event-loop", choices=EVENT_LOOPS, default="auto",
                    help="the proxies' --event-loop (default auto: uvloop when installed)")
    ap.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    if not shutil.which("haproxy"):
        raise SystemExit("haproxy is not installed (scripts/setup-system.sh installs it): nothing to compare with")
    rounds = 1 if args.quick else max(1, args.rounds)
    seconds = 2.0 if args.quick else args.seconds
    n_lat = 500 if args.quick else args.requests
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    t_start = time.monotonic()
    load_start = os.getloadavg()[0]   # the machine is shared: every figure comes with its load
    tmp = Path(tempfile.mkdtemp(prefix="meshfed-bench-wp-"))
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, Any] = {}
    try:
        srv_ip = "127.58.0.100"
        srv_port = _free_port(srv_ip)
        sp = subprocess.Popen([sys.executable, "-m", "benchmarks.waypoint", "--serve", srv_ip, str(srv_port)],
                              cwd=ROOT, stdout=subprocess.PIPE, env=child_env())
        procs.append(sp)
        assert sp.stdout is not None and sp.stdout.readline().strip() == b"ready"
        zt, socks, vip, client_ip = waypoint_chain(tmp, (srv_ip, srv_port), args.logs, args.event_loop)
        procs += list(zt.values())
        hap, hap_addr = haproxy_chain(tmp, (srv_ip, srv_port))
        procs += hap
        chains: dict[str, tuple[tuple[str, int], tuple[str, int] | None, str]] = {
            "direct": ((srv_ip, srv_port), None, "127.0.0.1"),
            "haproxy": (hap_addr, None, "127.0.0.1"),
            "waypoint": ((vip, srv_port), socks, client_ip),
        }
        per_round: dict[str, list[dict[str, float]]] = {k: [] for k in chains}
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(args.clients) as pool:
            for _ in range(rounds):
                for name, (target, sk, src) in chains.items():
                    p50, p99 = latency(target, sk, src, n_lat)
                    r = rps(pool, target, sk, src, args.clients, seconds)
                    per_round[name].append({"p50_us": p50, "p99_us": p99, "rps": r})
        for name, runs in per_round.items():
            results[name] = {k: round(statistics.median(x[k] for x in runs), 1) for k in runs[0]}
        results["waypoint"]["rss_kb"] = rss_kb(zt["w"].pid)
        ratios = []
        for d, h, w in zip(per_round["direct"], per_round["haproxy"], per_round["waypoint"], strict=True):
            ratios.append({
                "added_p50_ratio": (w["p50_us"] - d["p50_us"]) / max(1.0, h["p50_us"] - d["p50_us"]),
                "added_p99_ratio": (w["p99_us"] - d["p99_us"]) / max(1.0, h["p99_us"] - d["p99_us"]),
                "rps_ratio": w["rps"] / max(1.0, h["rps"]),
            })
        summary = {k: round(statistics.median(r[k] for r in ratios), 2) for k in ratios[0]}
        results["summary"] = {
            **summary,
            "targets": {"added_latency_ratio_max": 2.0, "rps_ratio_min": 0.5},
            "met": {"added_p50": summary["added_p50_ratio"] <= 2.0, "added_p99": summary["added_p99_ratio"] <= 2.0,
                    "rps": summary["rps_ratio"] >= 0.5},
            "limits": ("the waypoint chain is three single-threaded Python processes (one event loop, one core each at "
                       "most) against three HAProxies in C; per request the waypoint parses and writes HTTP/1.1 "
                       "twice (llhttp) and frames HBONE twice, and every hop pays a TLS record in and out; on this "
                       "2-core machine the clients, the server and all six proxies share the two cores, so "
                       "requests/s measures the sum of per-request CPU of the chain"),
            "clients": args.clients, "seconds": seconds, "rounds": rounds, "latency_requests": n_lat,
            "cpus": os.cpu_count(), "wall_s": round(time.monotonic() - t_start, 1),
            "event_loop": resolve_event_loop(args.event_loop), "load_avg_1m": {"start": round(load_start, 1), "end": round(os.getloadavg()[0], 1)},
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
    for k, v in results.items():
        print(f"{k:10s} {v}", file=sys.stderr)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
