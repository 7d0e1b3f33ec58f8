"""The waypoint scenario on a running lab of `examples/l7`: the steps `meshfed demo --scenario
waypoint` tells and `tests/lab/test_waypoint.py` asserts, as adapters over `LabFederation`.

- `canary_split`: n requests on ONE keep-alive connection from a client pod (the split is per request
  at the waypoint: a per-connection split would send them all to one version);
- `delete_denied`: a request-level DENY (DELETE on checkout) and the waypoint's access-log line;
- `fail_version`: pods of a version answer 503 under open-loop load; what the waypoint ejected, when,
  which cluster served afterwards, the failed requests, and the controller's failover history;
- `inference`: POSTs through the ingress gateway from the cluster's edge namespace (the guide's
  inference route, the InferencePool).

Only adapters: the lab's exec, its behaviour switch, its logs, the controller's status API. The
pure pieces are `chaos.demo` (`between`, `workload_of`).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from chaos.demo import DemoError, LabFederation, between, workload_of

CHECKOUT_HOST = "checkout.shop.svc.clusterset.local"
CHECKOUT_URL = f"http://{CHECKOUT_HOST}:80/"
GUIDE_URL = "http://my-service.my-app.svc.cluster.local:80/"   # the guide's name (namespace sameness)
WAYPOINT = "waypoint/{cluster}/shop/waypoint"

# One keep-alive HTTP/1.1 connection, n requests; counts per serving pod, status and caller identity.
KEEPALIVE = r'''
import collections, http.client, json, sys
host, n, method, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
headers = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
conn = http.client.HTTPConnection(host, 80, timeout=10)
pods, codes, identities, bodies = collections.Counter(), collections.Counter(), collections.Counter(), []
for _ in range(n):
    conn.request(method, path, headers=headers)
    r = conn.getresponse()
    body = r.read()
    codes[r.status] += 1
    try:
        d = json.loads(body)
        pods[d.get("pod", "?")] += 1
        identities[d.get("peer_identity", "")] += 1
    except ValueError:
        bodies.append(body.decode(errors="replace")[:200])
conn.close()
print(json.dumps({"pods": pods, "codes": codes, "identities": identities, "bodies": bodies[:3]}))
'''

# POSTs to an ingress gateway: which model, pod and cluster answered (or the error).
INGRESS = r'''
import collections, json, sys, urllib.error, urllib.request
base, n, path, model = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
out = collections.Counter()
for _ in range(n):
    body = {"prompt": "hi"} if not model else {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            d = json.loads(r.read())
            out[f"{r.status} {d['model']} {d['cluster']}/{d['pod']}"] += 1
    except urllib.error.HTTPError as e:
        out[f"{e.code} {e.read().decode(errors='replace')[:120]}"] += 1
    except Exception as e:
        out[f"0 {type(e).__name__}"] += 1
print(json.dumps(out))
'''


def run_py(fed: LabFederation, where: str, code: str, *args: str, timeout_s: float = 300.0) -> dict[str, Any]:
    """Run a Python snippet in a lab namespace; its last line of output, as JSON."""
    r = fed.runner.exec(where, [sys.executable, "-c", code, *args], timeout_s=timeout_s)
    if r.returncode != 0:
        raise DemoError(f"{where}: the client failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def proxy_log(fed: LabFederation, proxy_id: str) -> list[dict[str, Any]]:
    """A proxy's JSON log lines (access log, ejections) from the lab's logs directory."""
    path = fed.state_dir / "logs" / (proxy_id.replace("/", "-") + ".log")
    out = []
    for line in path.read_text().splitlines() if path.exists() else ():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def ingress_address(fed: LabFederation) -> str:
    for c in fed.lab.get("clusters", []):
        for p in c["pods"]:
            if p["role"] == "ingress":
                return str(p["address"])
    raise DemoError("the lab runs no ingress gateway (does the fleet declare a Gateway that is not a waypoint?)")


@dataclass
class Split:
    requests: int
    by_workload: dict[str, int]
    codes: dict[str, int]
    identities: dict[str, int]
    seconds: float

    def share(self, workload: str) -> float:
        return self.by_workload.get(workload, 0) / max(1, self.requests)


def canary_split(fed: LabFederation, cluster: str, n: int = 2000) -> Split:
    t0 = time.monotonic()
    res = run_py(fed, fed.client_pod(cluster), KEEPALIVE, CHECKOUT_HOST, str(n), "GET", "/")
    by: dict[str, int] = {}
    for pod, k in res["pods"].items():
        by[workload_of(pod)] = by.get(workload_of(pod), 0) + k
    return Split(n, by, res["codes"], res["identities"], time.monotonic() - t0)


def delete_denied(fed: LabFederation, cluster: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the client's view of three DELETEs, the waypoint's access-log line of the last denial)."""
    res = run_py(fed, fed.client_pod(cluster), KEEPALIVE, CHECKOUT_HOST, "3", "DELETE", "/orders/7")
    denied = [r for r in proxy_log(fed, WAYPOINT.format(cluster=cluster))
              if r.get("kind") == "request" and r.get("status") == 403]
    return res, (denied[-1] if denied else None)


@dataclass
class VersionFailure:
    """What happened while pods of one version answered 503."""

    fault_at_s: float
    heal_at_s: float
    requests: int                           # to the failed version during the fault
    failed: int
    ejected: list[str]                      # what the waypoint ejected
    ejected_after_ms: float | None          # from the fault to the last of those ejections
    after_ejection: int                     # requests after it
    served_after: list[str]                 # clusters that served them
    failed_after: int
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def kinds(self) -> list[tuple[str, str, str]]:
        return [(e["kind"], e["from_cluster"], e["to_cluster"]) for e in self.history]


def fail_version(fed: LabFederation, cluster: str, pods: Sequence[str], workload: str, namespace: str = "shop",
                 url: str = CHECKOUT_URL, service: str = "shop/checkout", hold_s: float = 12.0,
                 rate_per_s: float = 20.0) -> VersionFailure:
    """Make `pods` answer 503 for `hold_s` under load from `cluster`'s client; restore them."""
    since_s = time.time()
    name = f"{cluster}-{workload}"
    fed.start_load(cluster, rate_per_s, timeout_s=5.0, url=url, name=name)
    time.sleep(3.0)
    fault_at = fed.note("fault_injected", fault="503", target=" ".join(pods), cluster=cluster)["at_s"]
    for pod in pods:
        fed.runner.behaviour(cluster, pod, "Error503", namespace)
    time.sleep(hold_s)
    heal_at = fed.note("fault_healed", fault="503", target=" ".join(pods), cluster=cluster)["at_s"]
    for pod in pods:
        fed.runner.behaviour(cluster, pod, "Healthy", namespace)
    time.sleep(1.0)
    records = fed.stop_load(name)
    mine = [r for r in records if r["outcome"] != "ok" or workload_of(str(r.get("pod", ""))) == workload]
    during = between(mine, fault_at, heal_at)
    proxy = f"waypoint/{cluster}/{namespace}/waypoint"
    ejections = [e for e in proxy_log(fed, proxy)
                 if e.get("kind") == "EndpointEjected" and e.get("enforced") and fault_at - 1 <= float(e.get("ts", 0)) <= heal_at]
    ejected_at = max((float(e["ts"]) for e in ejections), default=None)
    after = between(mine, ejected_at, heal_at) if ejected_at is not None else []
    history: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        history = fed.api(f"/api/v1/failover-history?service={service}&since_s={since_s}")
        if any(e["kind"] in ("FailedOver", "EndpointEjected") for e in history) and (
                len(ejections) < len(pods) or any(e["kind"] == "FailedOver" for e in history)):
            break
        time.sleep(1.0)
    return VersionFailure(
        fault_at_s=fault_at, heal_at_s=heal_at, requests=len(during),
        failed=sum(r["outcome"] != "ok" for r in during), ejected=sorted({e["key"] for e in ejections}),
        ejected_after_ms=None if ejected_at is None else 1000 * (ejected_at - fault_at),
        after_ejection=len(after), served_after=sorted({str(r.get("cluster")) for r in after if r["outcome"] == "ok"}),
        failed_after=sum(r["outcome"] != "ok" for r in after), history=history)


def inference(fed: LabFederation, n: int, path: str = "/v1/completions", model: str = "") -> dict[str, int]:
    """POST n requests through the ingress gateway from its cluster's edge (the east-west gateway's
    namespace stands for a client outside the mesh): counts per "status model cluster/pod"."""
    base = f"http://{ingress_address(fed)}:80"
    cluster = next(c["name"] for c in fed.lab["clusters"] if any(p["role"] == "ingress" for p in c["pods"]))
    out: dict[str, int] = run_py(fed, f"gateway:{cluster}", INGRESS, base, str(n), path, model)
    return out


def models(counts: dict[str, int]) -> dict[str, int]:
    """`inference` counts per model (errors under their own keys)."""
    out: dict[str, int] = {}
    for k, v in counts.items():
        key = k.split(" ")[1] if k.startswith("200 ") else k
        out[key] = out.get(key, 0) + v
    return out
