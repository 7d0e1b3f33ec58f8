"""`meshfed controller run --log-format json` logs every state change an operator needs (issue 15).

The real command in a subprocess (a Ray job of its own: the workers' lines reach its stderr),
against three emulated clusters and simulated proxies over gRPC, driven through: the first
commit accepted (applying), clusters up, configs pushed and ACKed (summarised, not one line per
proxy), proxies SYNCED and the commit applied on their ACKs, a NACK, east's endpoints ejected by a
quorum of health reports and the failover that follows for east's clients, a rejected commit, a
staged CA root rotation (root added, signing root switched), a cluster whose API stops answering
until its lease expires, and the reconcile trigger's request log. Every line written through
`logging` is one JSON object; the only other lines are Ray's C++ core (glog, outside Python's
logging); no secret appears in any of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks.simproxy import MemorySink, SimProxy
from clusters.lab.apiserver import EmulatedApiServer
from tests.integration.controller.conftest import REPO_ROOT, free_port, git
from ztunnel.api.proto import meshfed_pb2 as pb

TD = "east.mesh.local"


def _trust(signing: str, *roots: str) -> str:
    names = "\n".join(f"      - name: {r}\n        signing: {'true' if r == signing else 'false'}" for r in roots)
    return (f"apiVersion: meshfed.dev/v1alpha1\nkind: TrustDomain\nmetadata:\n  name: {TD}\nspec:\n"
            f"  federatesWith:\n    - west.mesh.local\n    - south.mesh.local\n  ca:\n    mode: Managed\n"
            f"    roots:\n{names}\n    workloadCertTTL: 24h\n")


class JsonLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[str]:
        """The complete lines so far (the last one may be mid-write)."""
        text = self.path.read_text(errors="replace")
        return [ln for ln in text[: text.rfind("\n") + 1].splitlines() if ln.strip()]

    def records(self) -> list[dict[str, Any]]:
        """Every line our logging wrote (a line that starts like JSON must be JSON)."""
        return [json.loads(ln) for ln in self.lines() if ln.startswith("{")]

    def foreign(self) -> list[str]:
        """Lines not written through `logging`: Ray's C++ core (glog) writes to stderr directly."""
        return [ln for ln in self.lines() if not ln.startswith("{")]

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == kind]

    async def wait(self, kind: str, proc: subprocess.Popen[bytes], timeout_s: float = 90.0,
                   where: Callable[[dict[str, Any]], bool] = lambda _r: True) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            hits = [r for r in self.events(kind) if where(r)]
            if hits:
                return hits[0]
            assert proc.poll() is None, f"the controller exited ({proc.returncode}):\n{self.path.read_text()[-3000:]}"
            await asyncio.sleep(0.2)
        raise AssertionError(f"no {kind} line within {timeout_s} s; events: "
                             f"{sorted({str(r.get('event')) for r in self.records()})}")


class Reporter:
    """A HealthSource: the same verdict on the same endpoints (of `cluster`) in every report."""

    def __init__(self, service: str, uids: list[str], ejected: bool, cluster: str) -> None:
        self.service, self.uids, self.ejected, self.cluster = service, uids, ejected, cluster

    def drain_outcomes(self) -> list[Any]:
        return [pb.EndpointOutcome(service=self.service, workload_uid=u, cluster=self.cluster,
                                   ok=0 if self.ejected else 5, failed=7 if self.ejected else 0, ejected=self.ejected)
                for u in self.uids]


def _commit(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def _post(url: str, token_file: Path) -> None:
    """A Git hook's announcement; writes need the controller's token (issue 11 part C)."""
    headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
    urllib.request.urlopen(urllib.request.Request(url, method="POST", data=b"", headers=headers), timeout=10).read()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _start(argv: list[str], cwd: Path, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as err:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)


@pytest.mark.usefixtures("ray_session")
async def test_controller_run_logs_each_state_change_as_json(
        fleet_repo: Path, tmp_path: Path, emulated_clusters: tuple[dict[str, EmulatedApiServer], Path]) -> None:
    servers, kubeconfig = emulated_clusters
    fed = fleet_repo / "federation.yaml"
    fed.write_text(fed.read_text().replace("leaseTTL: 30s", "leaseTTL: 8s"))
    first = _commit(fleet_repo, "short lease for the test")
    port, status_port = free_port(), free_port()
    status = f"http://127.0.0.1:{status_port}"
    token_file = tmp_path / "state" / "status-api-token"   # written 0600 by the state owner
    log_path = tmp_path / "controller.log"
    import ray

    # the command joins the session's Ray (starting a second one on a loaded 2-core machine times
    # out); its actors are workers of its own job, started with its logging set-up
    ray_address = ray.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MESHFED_LOG"))}
    env.update(PYTHONPATH=str(REPO_ROOT), RAY_USE_UVLOOP="0")
    proc = _start([sys.executable, "-c", "from federation.cli.main import main; main()", "controller", "run",
                   "--repo", str(fleet_repo), "--state-dir", str(tmp_path / "state"), "--listen", f"127.0.0.1:{port}",
                   "--status-listen", f"127.0.0.1:{status_port}", "--kubeconfig", str(kubeconfig), "--insecure",
                   "--git-poll-interval", "3600", "--ray-address", ray_address, "--log-format", "json"],
                  tmp_path, env, log_path)
    log = JsonLog(log_path)
    proxies: list[SimProxy] = []
    try:
        started = await log.wait("ControllerStarted", proc, 120)
        assert started["level"] == "INFO" and started["logger"] == "federation.ray.driver"
        # accepted and rendered: "applying" until the proxies' ACKs reach the quorum (issue 11 part B)
        applying = await log.wait("CommitApplying", proc)
        assert applying["revision"] == first and applying["logger"] == "federation.controller.reconciler"
        assert log.events("CommitApplied") == []        # no proxy has connected: nothing ACKed yet
        for c in ("east", "west", "south"):
            await log.wait("ClusterUp", proc, where=lambda r, c=c: r["cluster"] == c)

        # proxies connect: pushes and ACKs summarised per revision, then "all SYNCED"
        for _ in range(600):   # every proxy rendered (clusters come up one by one)
            ids = sorted(p["proxy"] for p in _get(status + "/api/v1/status")["proxies"])
            if len(ids) == 9:
                break
            await asyncio.sleep(0.2)
        assert len(ids) == 9, ids
        endpoints = _get(status + "/api/v1/endpoints?service=checkout&from=east")
        service = endpoints["service"]
        east_uids = sorted(e["workload"] for e in endpoints["endpoints"] if e["cluster"] == "east")
        observers = ["ztunnel/east/node-1", "ztunnel/east/node-2"]   # the only proxies that see east's pods
        nacker = "ztunnel/south/node-1"
        for pid in ids:
            sink = MemorySink(reject=lambda c: ["checkout-v3 uses an unsupported appProtocol"]
                              if any(s.name == "checkout-v3" for s in c.services) else [])
            p = SimProxy(pid, f"127.0.0.1:{port}", cluster=pid.split("/")[1], sink=sink if pid == nacker else None)
            if pid in observers:
                p.client.health = Reporter(service, east_uids, ejected=True, cluster="east")  # 2 of 2: a quorum
                p.client.health_interval_s = 0.2
            proxies.append(p.start())
        acked = await log.wait("ConfigAcked", proc)
        assert acked["revision"] == first and acked["count"] >= 1 and "proxies ACKed revision" in acked["msg"]
        synced = await log.wait("ProxiesSynced", proc, 60)
        assert synced["count"] == 9 and synced["revision"] == first
        assert len(log.events("ConfigAcked")) < 9   # summarised: not one line per proxy
        applied = await log.wait("CommitApplied", proc, 30)
        assert applied["revision"] == first and applied["logger"] == "federation.controller.reconciler"

        # a quorum of health reports ejects east's own checkout endpoints for everyone ...
        ejected = await log.wait("EndpointEjected", proc, 60)
        assert ejected["endpoint"] in east_uids and ejected["policy_file"] and ejected["revision"] == first
        assert "health reports" in ejected["trigger"] and ejected["level"] == "INFO"
        # ... so east's clients lose their local tier: they fail over to the other clusters
        failover = await log.wait("FailedOver", proc, 60, where=lambda r: str(r["source"]).split("/")[0] == "east")
        assert failover["level"] == "WARNING" and failover["policy_file"] and failover["revision"] == first

        # a commit one proxy cannot apply: pushed to every proxy, NACKed by one
        svc = (fleet_repo / "services/shop/checkout-v2.yaml").read_text()
        (fleet_repo / "services/shop/checkout-v3.yaml").write_text(svc.replace("checkout-v2", "checkout-v3"))
        second = _commit(fleet_repo, "add checkout-v3")
        _post(status + "/api/v1/reconcile", token_file)
        await log.wait("CommitApplying", proc, where=lambda r: r["revision"] == second)
        # one NACK of south's three proxies: two ACKs are still a quorum there
        await log.wait("CommitApplied", proc, where=lambda r: r["revision"] == second)
        await log.wait("ConfigPushed", proc, where=lambda r: second[:8] in r["revisions"])
        nack = await log.wait("ConfigNacked", proc, 30)
        assert nack["proxy"] == nacker and "unsupported appProtocol" in nack["error"] and nack["level"] == "WARNING"
        request = await log.wait("HttpRequest", proc, 10, where=lambda r: r["method"] == "POST")
        assert request["path"] == "/api/v1/reconcile" and request["status"] == 202   # accepted: fetch now
        assert request["authenticated"] is True and request["level"] == "INFO"

        # a rejected commit: a new root that signs before it was published (MF0407)
        trust = fleet_repo / "trust" / f"{TD}.yaml"
        trust.write_text(_trust("root-2", "root-1", "root-2"))
        bad = _commit(fleet_repo, "switch to root-2 at once")
        _post(status + "/api/v1/reconcile", token_file)
        rejected = await log.wait("CommitRejected", proc, 30)
        assert rejected["revision"] == bad and rejected["level"] == "WARNING"
        assert any("MF0407" in p for p in rejected["problems"]) and rejected["applied_revision"] == second

        # a staged rotation: publish root-2, then sign with it
        trust.write_text(_trust("root-1", "root-1", "root-2"))
        _commit(fleet_repo, "publish root-2")
        _post(status + "/api/v1/reconcile", token_file)
        added = await log.wait("CaRootsChanged", proc, 30)
        assert added["trust_domain"] == TD and added["added"] == ["root-2"]
        trust.write_text(_trust("root-2", "root-1", "root-2"))
        _commit(fleet_repo, "sign with root-2")
        _post(status + "/api/v1/reconcile", token_file)
        rotated = await log.wait("SigningRootRotated", proc, 30)
        assert (rotated["previous_root"], rotated["signing_root"]) == ("root-1", "root-2")

        # west's API stops answering: unreachable once, then the lease expires
        servers["west"].stop()
        unreachable = await log.wait("ClusterApiUnreachable", proc, 60, where=lambda r: r["cluster"] == "west")
        assert unreachable["level"] == "WARNING" and unreachable["error"]
        expired = await log.wait("ClusterLeaseExpired", proc, 60, where=lambda r: r["cluster"] == "west")
        assert expired["level"] == "WARNING" and "expired" in expired["msg"]

        # sane volume: a dead API server is reported once per error, not once per HTTP retry
        assert not [r for r in log.records() if r["logger"].startswith("urllib3")]
        # nothing secret, ever: no private key, no bootstrap token
        text = log_path.read_text()
        assert "PRIVATE KEY-----" not in text
        assert token_file.read_text().strip() not in text       # the status API's token
        tokens = json.loads((tmp_path / "state" / "bootstrap-tokens.json").read_text()) \
            if (tmp_path / "state" / "bootstrap-tokens.json").exists() else {}
        for value in (tokens.values() if isinstance(tokens, dict) else []):
            assert str(value) not in text
    finally:
        for p in proxies:
            await p.stop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    ray_core = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [A-Z] \d+ \d+\] \S+\.cc:\d+:|^\*\*\* SIGTERM|^PC: @|^ +@ ")
    assert all(ray_core.match(ln) for ln in log.foreign()), [ln for ln in log.foreign() if not ray_core.match(ln)]
    stopped = [r for r in log.records() if r.get("msg") == "meshfed controller: stopping"]
    assert stopped, "SIGTERM is logged before the controller stops"
