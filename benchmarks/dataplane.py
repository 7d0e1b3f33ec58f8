"""Data-plane benchmark: raw TCP, raw TLS, an HAProxy mTLS pair, a ztunnel pair, and the
double-HBONE gateway path, side by side in one run, on loopback.

    python -m benchmarks.dataplane [--quick]

Per path: `gbps` (one stream, median of runs), `rr_1k_us_p50`/`rr_1k_us_p99` (1 KB request,
1 KB response on an open connection), `conn_us_p50` (new connection + first byte back; for the
ztunnel paths this includes the SOCKS5 exchange the application does). The echo/sink server runs
in its own process; proxies run as real processes (`python -m ztunnel`, `haproxy`); the client is
blocking sockets in this process. Also: proxy RSS idle and per endpoint in config (a node loaded
with 5000 extra endpoints), and the framer micro-benchmark (our HBONE framer vs the `h2` library,
in memory). The last line of output is one JSON object.
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

ROOT = Path(__file__).resolve().parents[1]


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


def measure(connect_echo: Any, connect_sink: Any, quick: bool) -> dict[str, float]:
    # request/response 1 KB
    s = connect_echo()
    msg = b"x" * 1024
    for _ in range(50):
        s.sendall(msg)
        recv_exact(s, 1024)
    lat = []
    for _ in range(300 if quick else 2000):
        t0 = time.perf_counter()
        s.sendall(msg)
        recv_exact(s, 1024)
        lat.append(time.perf_counter() - t0)
    s.close()
    lat.sort()
    # new connection + first byte
    conn = []
    for _ in range(30 if quick else 150):
        t0 = time.perf_counter()
        c = connect_echo()
        c.sendall(b"!")
        recv_exact(c, 1)
        conn.append(time.perf_counter() - t0)
        c.close()
    # throughput, single stream
    total = (64 if quick else 256) * 1024 * 1024
    chunk = b"\0" * (256 * 1024)
    runs = []
    for _ in range(2 if quick else 3):
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
    return {
        "gbps": round(statistics.median(runs), 3),
        "rr_1k_us_p50": round(lat[len(lat) // 2] * 1e6, 1),
        "rr_1k_us_p99": round(lat[int(len(lat) * 0.99)] * 1e6, 1),
        "conn_us_p50": round(statistics.median(conn) * 1e6, 1),
    }


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

    from ztunnel.hbone import DataReceived, HboneConnection, Role

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--serve", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        h, e, k, t, cert, key, ca_ = args.serve
        serve(h, int(e), int(k), int(t), cert, key, ca_)
        return
    sys.path.insert(0, str(ROOT))
    from federation.ca import TrustDomainCA
    from tests.integration import dataplane_topology as topo
    from ztunnel.config import ProxyMode

    tmp = Path(tempfile.mkdtemp(prefix="meshfed-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, Any] = {}
    try:
        td = "east.mesh"
        ca = TrustDomainCA.create(td)
        (tmp / "ca.pem").write_bytes(ca.roots_pem())
        pems = {}
        for name in ("server", "client", "hap1", "hap2"):
            iss = ca.issue_svid(f"spiffe://{td}/ns/bench/sa/{name}")
            (tmp / f"{name}.crt").write_bytes(iss.chain_pem)
            (tmp / f"{name}.key").write_bytes(iss.key_pem)
            (tmp / f"{name}.pem").write_bytes(iss.chain_pem + iss.key_pem)
            pems[name] = iss
        srv_ip = "127.56.0.100"
        echo_p, sink_p = _free_port(srv_ip), _free_port(srv_ip)
        tls_p = 47113  # tls echo; tls_p + 1: tls sink
        sp = subprocess.Popen([sys.executable, "-m", "benchmarks.dataplane", "--serve", srv_ip, str(echo_p),
                               str(sink_p), str(tls_p), str(tmp / "server.crt"), str(tmp / "server.key"),
                               str(tmp / "ca.pem")], cwd=ROOT, stdout=subprocess.PIPE)
        procs.append(sp)
        assert sp.stdout is not None and sp.stdout.readline().strip() == b"ready"

        def tcp(port: int) -> Any:
            def f() -> socket.socket:
                s = socket.create_connection((srv_ip, port))
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return s
            return f

        results["raw_tcp"] = measure(tcp(echo_p), tcp(sink_p), args.quick)
        cctx = ssl.create_default_context(cafile=str(tmp / "ca.pem"))
        cctx.check_hostname = False
        cctx.load_cert_chain(str(tmp / "client.crt"), str(tmp / "client.key"))

        def tls(port: int) -> Any:
            return lambda: cctx.wrap_socket(tcp(port)())

        results["raw_tls"] = measure(tls(tls_p), tls(tls_p + 1), args.quick)
        # haproxy pair: plain → TLS → plain
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

            def hp(port: int) -> Any:
                def f() -> socket.socket:
                    s = socket.create_connection((h1, port))
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    return s
                return f
            results["haproxy_pair"] = measure(hp(p1), hp(p1s), args.quick)
            results["haproxy_pair"]["rss_kb_idle"] = rss_kb(hap[0].pid)
        # ztunnel pair and gateway
        client_pod = topo.Pod("east", "a", "client", "127.56.1.101", f"spiffe://{td}/ns/bench/sa/client",
                              node_address="127.56.1.11")
        server_pod = topo.Pod("east", "b", "server", srv_ip, f"spiffe://{td}/ns/bench/sa/server",
                              node_address="127.56.1.12")
        gw_ip = "127.56.1.250"
        hb = _free_port(gw_ip)
        wl = [client_pod.workload(), server_pod.workload()]
        svcs = []
        remote = []
        for name, port in (("echo", echo_p), ("sink", sink_p)):
            host = f"{name}.bench.svc.clusterset.local"
            ep = topo.endpoint(server_pod, port, hb)
            svcs.append(topo.service(host, "", port, port, [ep], sans=[server_pod.identity], connect_timeout_s=2))
            remote.append(topo.service(host, f"127.56.2.{len(remote) + 1}", port, port,
                                       [topo.endpoint(server_pod, port, hb, via_gateway=f"{gw_ip}:{hb}")],
                                       sans=[server_pod.identity], connect_timeout_s=2))
        import dataclasses
        svcs_a = [dataclasses.replace(s_, vip=f"127.56.3.{i + 1}") for i, s_ in enumerate(svcs)]
        cfg_a = topo.proxy_config("ztunnel/east/a", "east", td, workloads=wl, services=svcs_a + remote, bundles=[],
                                  local_identities=[client_pod.identity])
        cfg_a = dataclasses.replace(cfg_a, bundles=(ca.trust_bundle(),))
        cfg_b = dataclasses.replace(cfg_a, proxy_id="ztunnel/east/b", local_identities=(server_pod.identity,),
                                    services=tuple(svcs))
        gw_id = f"spiffe://{td}/ns/bench/sa/gateway"
        cfg_g = dataclasses.replace(cfg_a, proxy_id="gateway/east", mode=ProxyMode.GATEWAY, workloads=(),
                                    services=tuple(svcs), local_identities=(gw_id,))
        ids = {"a": client_pod.identity, "b": server_pod.identity, "g": gw_id}
        ips = {"a": client_pod.node_address, "b": server_pod.node_address, "g": gw_ip}
        admin = {}
        zt: dict[str, subprocess.Popen[bytes]] = {}
        socks_port = _free_port(ips["a"])
        for k, cfg in (("a", cfg_a), ("b", cfg_b), ("g", cfg_g)):
            d = tmp / k
            iss = ca.issue_svid(ids[k])
            topo.write_cert_dir(d, {ids[k]: (iss.chain_pem, iss.key_pem)})
            topo.write_config(tmp / f"{k}.json", cfg)
            admin[k] = _free_port("127.0.0.1")
            cmd = [sys.executable, "-m", "ztunnel", "--config", str(tmp / f"{k}.json"), "--cert-dir", str(d),
                   "--hbone", f"{ips[k]}:{hb}", "--socks", f"{ips[k]}:{socks_port}" if k == "a" else "",
                   "--admin", f"127.0.0.1:{admin[k]}", "--access-log", "off"]
            p = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
            procs.append(p)
            zt[k] = p
        for k in zt:
            wait_admin(admin[k], zt[k])
        time.sleep(0.3)
        idle_rss = rss_kb(zt["a"].pid)

        def zs(vip: str, port: int) -> Any:
            return lambda: socks_open((ips["a"], socks_port), vip, port, client_pod.address)

        results["ztunnel_pair"] = measure(zs("127.56.3.1", echo_p), zs("127.56.3.2", sink_p), args.quick)
        results["ztunnel_pair"]["rss_kb_idle"] = idle_rss
        results["ztunnel_gateway"] = measure(zs("127.56.2.1", echo_p), zs("127.56.2.2", sink_p), args.quick)
        results["ztunnel_gateway"]["rss_kb_idle_gateway"] = rss_kb(zt["g"].pid)
        # per-endpoint RSS: a node with 5000 endpoints more in config
        n_eps = 5000
        big = dataclasses.replace(svcs_a[0], hostname="big.bench.svc.clusterset.local", vip="127.56.4.1",
                                  endpoints=tuple(dataclasses.replace(svcs_a[0].endpoints[0],
                                                                      workload_uid=f"east/bench/p{i}",
                                                                      address=f"127.57.{i // 250}.{i % 250 + 1}")
                                                  for i in range(n_eps)))
        topo.write_config(tmp / "big.json", dataclasses.replace(cfg_a, services=(*cfg_a.services, big)))
        adm = _free_port("127.0.0.1")
        p = subprocess.Popen([sys.executable, "-m", "ztunnel", "--config", str(tmp / "big.json"), "--cert-dir",
                              str(tmp / "a"), "--hbone", f"127.56.1.21:{hb}", "--socks", "",
                              "--admin", f"127.0.0.1:{adm}", "--access-log", "off"], cwd=ROOT,
                             stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
        procs.append(p)
        wait_admin(adm, p)
        time.sleep(0.3)
        results["rss"] = {"ztunnel_idle_kb": idle_rss,
                          "bytes_per_endpoint": round((rss_kb(p.pid) - idle_rss) * 1024 / n_eps)}
        results["framer"] = framer_microbench()
        hp_ = results.get("haproxy_pair")
        if hp_:
            raw = results["raw_tcp"]["rr_1k_us_p50"]
            for k in ("ztunnel_pair", "ztunnel_gateway"):
                z = results[k]
                z["vs_haproxy"] = {
                    "gbps_ratio": round(z["gbps"] / hp_["gbps"], 2),
                    "added_p50_ratio": round((z["rr_1k_us_p50"] - raw) / max(1e-9, hp_["rr_1k_us_p50"] - raw), 2),
                    "conn_ratio": round(z["conn_us_p50"] / hp_["conn_us_p50"], 2),
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
        print(f"{k:16s} {v}", file=sys.stderr)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
