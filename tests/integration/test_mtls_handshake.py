"""Two real processes complete an mTLS handshake across two federated trust domains (east, west)
and fail against a third, unfederated one (south) — once at the `ssl` gate (no bundle for it) and
once at the trust-domain check (bundle known, no federatesWith edge).

The peers are this file run as a program (`python -m tests.integration.test_mtls_handshake
server|client DIR …`): each loads its SVID, key and trust configuration from DIR, builds the
`ztunnel.identity.tls` contexts and reports what happened as JSON lines on stdout.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
EAST, WEST, SOUTH = "east.mesh", "west.mesh", "south.mesh"
IDS = {EAST: f"spiffe://{EAST}/ns/shop/sa/api", WEST: f"spiffe://{WEST}/ns/web/sa/front",
       SOUTH: f"spiffe://{SOUTH}/ns/ops/sa/probe"}


# --- the peer program --------------------------------------------------------------------------

def _load_peer(d: Path) -> tuple[bytes, bytes, Any, str]:
    from ztunnel.api.bundle import parse_bundle
    from ztunnel.api.verify import TrustStore

    cfg = json.loads((d / "trust.json").read_text())
    bundles = {td: list(parse_bundle((d / f).read_bytes(), td).authorities) for td, f in cfg["bundles"].items()}
    store = TrustStore(bundles, cfg["federated"])
    return (d / "chain.pem").read_bytes(), (d / "key.pem").read_bytes(), store, cfg["local"]


def _say(**event: Any) -> None:
    print(json.dumps(event), flush=True)


def serve(d: Path, count: int) -> None:
    from ztunnel.api.verify import PeerVerificationError
    from ztunnel.identity import tls

    chain, key, store, local = _load_peer(d)
    ctx = tls.server_context(chain, key, store)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        srv.settimeout(30)
        _say(event="listening", port=srv.getsockname()[1])
        for _ in range(count):
            conn, _addr = srv.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as s:
                    try:
                        peer = tls.verify_connection(s, store, time.time(), local_trust_domain=local)
                    except PeerVerificationError as e:
                        _say(event="rejected", code=e.code, reason=e.reason)
                        continue
                    _say(event="accepted", peer=str(peer), alpn=s.selected_alpn_protocol())
                    s.sendall(f"hello from {local}\n".encode())
            except (ssl.SSLError, OSError) as e:
                _say(event="handshake_failed", error=str(e))
            finally:
                conn.close()


def dial(d: Path, port: int, expected: str) -> int:
    from ztunnel.api.verify import PeerVerificationError
    from ztunnel.identity import tls

    chain, key, store, local = _load_peer(d)
    ctx = tls.client_context(chain, key, store)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as s:
            try:
                peer = tls.verify_connection(s, store, time.time(), expected=[expected], local_trust_domain=local)
            except PeerVerificationError as e:
                _say(event="rejected", code=e.code, reason=e.reason)
                return 1
            greeting = s.recv(100).decode()  # TLS 1.3: a rejected client certificate surfaces here
            if not greeting:
                _say(event="closed_by_server", peer=str(peer))
                return 1
            _say(event="accepted", peer=str(peer), greeting=greeting.strip())
            return 0
    except (ssl.SSLError, OSError) as e:
        _say(event="handshake_failed", error=str(e))
        return 1


# --- the test ----------------------------------------------------------------------------------

def _write_peer(base: Path, name: str, svid: Any, local: str, bundles: dict[str, Any],
                federated: dict[str, list[str]]) -> Path:
    from ztunnel.api.bundle import emit_bundle

    d = base / name
    d.mkdir(mode=0o700)
    (d / "chain.pem").write_bytes(svid.chain_pem)
    fd = os.open(d / "key.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, svid.key_pem)
    os.close(fd)
    files = {}
    for td, ca in bundles.items():
        (d / f"{td}.bundle.json").write_text(emit_bundle(ca.bundle(1)))
        files[td] = f"{td}.bundle.json"
    (d / "trust.json").write_text(json.dumps({"local": local, "bundles": files, "federated": federated}))
    return d


def _peer_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.integration.test_mtls_handshake", *args]


def _events(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from federation.controller.ca import TrustDomainCA

    now = time.time()
    cas = {td: TrustDomainCA.create(td, now_s=now - 3600) for td in (EAST, WEST, SOUTH)}
    base = tmp_path_factory.mktemp("mtls")
    fed = {EAST: [WEST], WEST: [EAST], SOUTH: []}
    ew = {EAST: cas[EAST], WEST: cas[WEST]}
    return {
        # east knows south's bundle (a pooled CA file would) but does not federate with it
        "east": _write_peer(base, "east", cas[EAST].issue_svid(IDS[EAST]), EAST, cas, fed),
        "west": _write_peer(base, "west", cas[WEST].issue_svid(IDS[WEST]), WEST, ew, fed),
        "south": _write_peer(base, "south", cas[SOUTH].issue_svid(IDS[SOUTH]), SOUTH, cas, fed),
    }


def _start_server(d: Path, count: int) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(_peer_cmd("server", str(d), str(count)), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(5)
        raise AssertionError(f"server did not start: {proc.stderr.read() if proc.stderr else ''}")
    return proc, int(json.loads(line)["port"])


def _dial(d: Path, port: int, expected: str) -> tuple[int, list[dict[str, Any]]]:
    res = subprocess.run(_peer_cmd("client", str(d), str(port), expected), cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    return res.returncode, _events(res.stdout)


def test_federated_peers_handshake_and_unfederated_fails(peers: dict[str, Path]) -> None:
    east, east_port = _start_server(peers["east"], count=2)
    south, south_port = _start_server(peers["south"], count=1)
    try:
        # 1. west -> east: federated both ways; each side verifies the other's trust-domain-bound SVID
        rc, ev = _dial(peers["west"], east_port, IDS[EAST])
        assert rc == 0, ev
        assert ev[-1] == {"event": "accepted", "peer": IDS[EAST], "greeting": f"hello from {EAST}"}
        # 2. south -> east: passes the ssl gate (east holds south's bundle), rejected: no federation edge
        rc, ev = _dial(peers["south"], east_port, IDS[EAST])
        assert rc == 1, ev
        # 3. west -> south: west has no bundle for south, the handshake itself fails
        rc, ev3 = _dial(peers["west"], south_port, IDS[SOUTH])
        assert rc == 1 and ev3[-1]["event"] == "handshake_failed", ev3
        assert "certificate verify failed" in ev3[-1]["error"]
        east_out, _ = east.communicate(timeout=30)
        south_out, _ = south.communicate(timeout=30)
    finally:
        for p in (east, south):
            if p.poll() is None:
                p.kill()
                p.wait()
    east_ev = _events(east_out)
    assert east_ev[0] == {"event": "accepted", "peer": IDS[WEST], "alpn": "h2"}
    assert east_ev[1]["event"] == "rejected" and east_ev[1]["code"] == "not_federated", east_ev
    assert "federatesWith" in east_ev[1]["reason"]
    assert _events(south_out)[0]["event"] == "handshake_failed"


if __name__ == "__main__":
    mode, directory = sys.argv[1], Path(sys.argv[2])
    if mode == "server":
        serve(directory, int(sys.argv[3]))
    else:
        sys.exit(dial(directory, int(sys.argv[3]), sys.argv[4]))
