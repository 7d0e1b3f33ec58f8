"""Health reports end to end, and the live operator views, on the controller with Ray.

Simulated proxies in east and south report, through the health stream, that they eject the
endpoints of `checkout` in west. A quorum of observers (2 of 3) makes the failover engine eject
them, unhealthy for every proxy, including those that never reported; the push carries
it; `meshfed failover history` shows the event with its trigger (the vote), the policy file and
the commit; `meshfed explain --controller` and `meshfed trust --controller` answer live.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from benchmarks.simproxy import SimProxy
from clusters.lab.apiserver import EmulatedApiServer
from federation.cli.main import cli
from federation.server.grpc_services import wait_until
from tests.integration.controller.conftest import free_port, git
from tests.integration.controller.test_controller import rendered_proxies, start_controller
from ztunnel.api.proto import meshfed_pb2 as pb

pytestmark = pytest.mark.usefixtures("ray_session")

B = "west"


class Reporter:
    """A HealthSource: the same verdict on the same endpoints in every report."""

    def __init__(self, service: str, uids: list[str], ejected: bool) -> None:
        self.service, self.uids, self.ejected = service, uids, ejected
        self.reports = 0

    def drain_outcomes(self) -> list[Any]:
        self.reports += 1
        return [pb.EndpointOutcome(service=self.service, workload_uid=u, cluster=B, ok=0 if self.ejected else 5,
                                   failed=7 if self.ejected else 0, ejected=self.ejected) for u in self.uids]


def cli_run(url: str, *args: str) -> Any:
    return CliRunner(env={"COLUMNS": "250"}).invoke(cli, [*args, "--controller", url], standalone_mode=False,
                                                    catch_exceptions=False)


def healthy_in(proxy: SimProxy, service: str, uids: list[str]) -> dict[str, bool]:
    cur = proxy.sub.current
    if cur is None:
        return {}
    return {e.workload_uid: e.healthy for s in cur.services if s.hostname == service for e in s.endpoints
            if e.workload_uid in uids}


async def test_quorum_of_health_reports_ejects_for_everyone(
        fleet_repo: Path, tmp_path: Path, emulated_clusters: tuple[dict[str, EmulatedApiServer], Path]) -> None:
    _servers, kubeconfig = emulated_clusters
    port = free_port()
    ctl = start_controller(fleet_repo, tmp_path / "state", kubeconfig, port)
    proxies: list[SimProxy] = []
    try:
        ids = await rendered_proxies(ctl)
        url = ctl.status_server.url
        assert await wait_until(lambda: any(e["cluster"] == B for e in ctl.endpoints("checkout", "east")["endpoints"]),
                                60, 0.2), ctl.refresh()["clusters"]
        view = ctl.endpoints("checkout", "east")
        service = view["service"]
        uids = sorted(e["workload"] for e in view["endpoints"] if e["cluster"] == B)
        assert uids, view

        outside = sorted(p for p in ids if p.startswith("ztunnel/") and p.split("/")[1] != B)
        observers, bystander = outside[:3], outside[3]
        for i, pid in enumerate(observers):
            p = SimProxy(pid, f"127.0.0.1:{port}", cluster=pid.split("/")[1])
            p.client.health = Reporter(service, uids, ejected=i < 2)  # 2 of 3 eject: a quorum
            p.client.health_interval_s = 0.2
            proxies.append(p.start())
        bystanders = [SimProxy(pid, f"127.0.0.1:{port}", cluster=pid.split("/")[1]).start()
                      for pid in (bystander, "gateway/east")]
        proxies.extend(bystanders)
        first = git(fleet_repo, "rev-parse", "HEAD")
        assert await wait_until(lambda: all(p.revision == first for p in proxies), 20)

        # every node proxy outside west, reporting or not, gets west's endpoints as unhealthy
        def ejected_everywhere() -> bool:
            return all(healthy_in(p, service, uids) and not any(healthy_in(p, service, uids).values())
                       for p in proxies if p.proxy_id.startswith("ztunnel/"))

        assert await wait_until(ejected_everywhere, 20), [healthy_in(p, service, uids) for p in proxies]
        st = ctl.refresh()
        assert set(st["unhealthy_endpoints"]) == {f"{service} {u}" for u in uids}
        assert st["config_server"]["health_reports"] >= 3

        # failover history: the event, its trigger (the vote), the policy file and the commit
        hist = json.loads(cli_run(url, "failover", "history", service, "--since", "10m", "-o", "json").output)
        ejections = [e for e in hist if e["kind"] == "EndpointEjected" and e["detail"]["endpoint"] in uids]
        assert {e["detail"]["endpoint"] for e in ejections} == set(uids)
        ev = ejections[0]
        assert ev["trigger"].startswith("health reports: 2 of 3 proxies")
        assert ev["detail"]["reason"] == "HealthReportQuorum" and ev["from_cluster"] == B
        policy_file = ev["policy_file"].split(":")[0]
        assert (fleet_repo / policy_file).is_file(), ev
        assert ev["revision"] == git(fleet_repo, "log", "-1", "--format=%H", "--", policy_file)
        table = cli_run(url, "failover", "history", "--since", "10m").output
        assert "EndpointEjected" in table and "health reports" in table and first[:8] in table

        # live explain and trust
        res = cli_run(url, "explain", "checkout", "--from", "east", "-o", "json")
        data = json.loads(res.output)
        # the ejection comes from the engine's own state (explain_service), not from a patch
        assert data["live"] and data["ejections"]["active"] == uids
        west_eps = [e for t in data["tiers"] for g in t["groups"] if g["cluster"] == B for e in g["endpoints"]]
        assert west_eps and all(e["ejected"] and e["reason"] == "HealthReportQuorum" and not e["healthy"]
                                for e in west_eps if e["uid"] in uids)
        assert "ejected for everyone" in cli_run(url, "explain", "checkout", "--from", "east").output
        bad = CliRunner().invoke(cli, ["explain", "nosuch", "--from", "east", "--controller", url])
        assert bad.exit_code == 1 and "nosuch" in bad.output  # unknown names are problems (exit 1), not usage
        trust = json.loads(cli_run(url, "trust", "-o", "json").output)
        assert {d["name"] for d in trust["trustDomains"]} == {"east.mesh.local", "west.mesh.local",
                                                              "south.mesh.local"}
        assert all(d["roots"] and d["roots"][0]["fingerprint"] for d in trust["trustDomains"])
        assert all(d["bundleSource"] == "controller" for d in trust["trustDomains"])

        # the observers heal: the quorum is gone, the endpoints come back for everyone
        for p in proxies[:3]:
            p.client.health.ejected = False  # type: ignore[union-attr]
        assert await wait_until(lambda: all(all(healthy_in(p, service, uids).values())
                                            for p in proxies if p.proxy_id.startswith("ztunnel/")), 20)
        hist = json.loads(cli_run(url, "failover", "history", service, "-o", "json").output)
        assert any(e["kind"] == "EndpointUnejected" and e["detail"]["endpoint"] in uids for e in hist)
    finally:
        for p in proxies:
            await p.stop()
        ctl.stop()
