"""The main job's moving parts: a running lab federation driven from the host, step by step.

`LabFederation` wraps `clusters.lab.runner.LabRunner` with what the demo (`meshfed demo`) and the
lab-tier end-to-end tests need: bring the lab up from a fleet directory, reach the controller's
status API through the lab's host portal, wait for convergence (every proxy SYNCED at the desired
revision), ask the global service from a cluster's client pod (curl inside the pod's namespace:
the pod dials `checkout.shop.svc.clusterset.local`, the node's iptables hand the connection to the
ztunnel), run the open-loop load generator in client pods, `git push` a change to the lab's Git
server, inject and heal faults, and record a timeline on the same wall clock as the load.

Only adapters live here (subprocess for `git`, HTTP for the status API, the lab's runner: its control
socket, and `LabRunner.exec` entering the lab's namespaces);
the figures come from `chaos.analysis` (pure) and the report from `chaos.report`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos.analysis import (
    workload_of as workload_of,  # re-exported: the demo CLI and chaos.waypoint use it from here
)

SERVICE_HOST = "checkout.shop.svc.clusterset.local"
SERVICE_URL = f"http://{SERVICE_HOST}:80/"
_GET = """
import json, sys, urllib.error, urllib.request
url, timeout_s = sys.argv[1], float(sys.argv[2])
try:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=timeout_s) as r:
        out = {"status": r.status, "body": r.read().decode(errors="replace"), "error": ""}
except urllib.error.HTTPError as e:
    out = {"status": e.code, "body": e.read().decode(errors="replace"), "error": f"HTTP {e.code}"}
except Exception as e:
    out = {"status": 0, "body": "", "error": f"{type(e).__name__}: {e}"}
print(json.dumps(out))
"""


class DemoError(RuntimeError):
    """A step of the story could not complete; the message says which and where to look."""


@dataclass
class LabFederation:
    fleet_dir: Path
    state_dir: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    runner: Any = None
    lab: dict[str, Any] = field(default_factory=dict)
    loads: dict[str, Path] = field(default_factory=dict)

    # --- lifecycle ----------------------------------------------------------------------------

    def up(self, up_timeout_s: float = 120.0) -> dict[str, Any]:
        import gitops
        from clusters.lab.runner import LabOptions, LabRunner

        snap = gitops.load_worktree(self.fleet_dir)
        self.runner = LabRunner(LabOptions(self.state_dir, up_timeout_s=up_timeout_s))
        self.lab = self.runner.up_from_snapshot(snap, self.fleet_dir)
        return self.lab

    def attach(self) -> None:
        """Use a lab that is already running in `state_dir`."""
        from clusters.lab.runner import LabOptions, LabRunner

        self.runner = LabRunner(LabOptions(self.state_dir))
        self.lab = self.runner.status()["lab"]

    def down(self) -> dict[str, Any]:
        return dict(self.runner.down()) if self.runner is not None else {}

    def note(self, kind: str, **fields: Any) -> dict[str, Any]:
        ev = {"at_s": time.time(), "kind": kind, **fields}
        self.events.append(ev)
        return ev

    # --- the controller -------------------------------------------------------------------------

    @property
    def controller_url(self) -> str:
        port = (self.lab.get("ports") or {}).get("controller-http-host")
        if not port:
            raise DemoError("the lab has no host door to the controller's status API (portal unavailable?); "
                            f"see {self.state_dir}/lab.json 'features'")
        return f"http://127.0.0.1:{port}"

    def api(self, path: str, timeout_s: float = 5.0) -> Any:
        with urllib.request.urlopen(self.controller_url + path, timeout=timeout_s) as r:
            return json.loads(r.read())

    def status(self) -> dict[str, Any] | None:
        try:
            st = self.api("/api/v1/status")
        except (OSError, ValueError, urllib.error.URLError):
            return None
        return st if isinstance(st, dict) else None

    def wait_converged(self, timeout_s: float = 120.0, revision: str | None = None,
                       proxies: int | None = None) -> tuple[dict[str, Any], float]:
        """Every proxy SYNCED at the desired revision (= `revision` if given); returns (status, s)."""
        t0 = time.monotonic()
        want_n = proxies if proxies is not None else self.proxy_count()
        last: dict[str, Any] | None = None
        while time.monotonic() - t0 < timeout_s:
            st = self.status()
            if st is not None:
                last = st
                desired = (st.get("desired") or {}).get("revision", "")
                ps = st.get("proxies") or []
                if (desired and (revision is None or desired == revision) and len(ps) >= want_n
                        and all(p.get("sync") == "SYNCED" and p.get("acked_revision") == desired for p in ps)):
                    return st, time.monotonic() - t0
            time.sleep(0.25)
        summary = ", ".join(f"{p['proxy']} {p['sync']}" for p in (last or {}).get("proxies", [])
                            if p.get("sync") != "SYNCED") or "no status"
        raise DemoError(f"the federation did not converge within {timeout_s:.0f} s ({summary}); "
                        f"see {self.state_dir}/logs/controller.log and the proxies' logs there")

    def proxy_count(self) -> int:
        """Node ztunnels, east-west gateways, and the waypoints and ingress gateways that run as pods."""
        return sum(len(c["nodes"]) + (1 if c.get("gateway") else 0)
                   + sum(1 for p in c.get("pods", []) if p.get("role") in ("waypoint", "ingress"))
                   for c in self.lab.get("clusters", []))

    def tiers(self, cluster: str, service: str = SERVICE_HOST) -> list[str]:
        """Clusters in the order `cluster`'s proxies fail over (from the rendered endpoints)."""
        data = self.api(f"/api/v1/endpoints?service={service}&from={cluster}")
        best: dict[str, int] = {}
        for e in data.get("endpoints", []):
            best[e["cluster"]] = min(best.get(e["cluster"], 1 << 30), int(e["tier"]))
        return sorted(best, key=lambda c: (best[c], c))

    # --- pods -------------------------------------------------------------------------------------

    @property
    def clusters(self) -> list[str]:
        return [c["name"] for c in self.lab.get("clusters", [])]

    def client_pod(self, cluster: str, service_account: str | None = None) -> str:
        pods = self.client_pods(cluster, service_account)
        if not pods:
            raise DemoError(f"cluster {cluster} has no client pod"
                            f"{' with service account ' + service_account if service_account else ''}")
        return pods[0]

    def client_pods(self, cluster: str, service_account: str | None = None) -> list[str]:
        """Every client pod of `cluster` (`pod:C/NS/NAME`), in the lab's order."""
        return [f"pod:{cluster}/{p['namespace']}/{p['name']}"
                for c in self.lab.get("clusters", []) if c["name"] == cluster
                for p in c["pods"]
                if p["role"] == "client" and (service_account is None or p["service_account"] == service_account)]

    def _get(self, where: str, url: str, timeout_s: float) -> tuple[int, str, str]:
        """HTTP GET from inside a lab namespace: (status, body, error)."""
        r = self.runner.exec(where, [sys.executable, "-c", _GET, url, str(timeout_s)], timeout_s=timeout_s + 10)
        try:
            res = json.loads(r.stdout)
        except ValueError:
            return 0, "", (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        return int(res["status"]), str(res["body"]), str(res["error"])

    def ask(self, where: str, url: str = SERVICE_URL, timeout_s: float = 5.0) -> dict[str, Any]:
        """One request from inside a pod (`pod:C/NS/NAME`); the echo's JSON, or {"error": ...}."""
        status, body, error = self._get(where, url, timeout_s)
        if error:
            return {"error": error, "status": status}
        try:
            data: dict[str, Any] = json.loads(body)
        except ValueError:
            return {"error": f"not JSON: {body[:100]!r}", "status": status}
        data["status"] = status
        return data

    def proxy_config(self, node_where: str) -> dict[str, Any]:
        """The config a proxy runs (its admin endpoint, inside its namespace)."""
        status, body, error = self._get(node_where, "http://127.0.0.1:15021/config_dump", 3.0)
        if error or status != 200:
            raise DemoError(f"config_dump of {node_where}: {error or status}")
        data: dict[str, Any] = json.loads(body)
        return data

    # --- load -------------------------------------------------------------------------------------

    def start_load(self, cluster: str, rate_per_s: float, timeout_s: float = 2.0, *, url: str = SERVICE_URL,
                   pod: str | None = None, keep_alive_max_requests: int = 0, name: str = "",
                   method: str = "GET", ok_status: int = 0) -> Path:
        """Open-loop load from `cluster`'s client pod (or `pod`: CLUSTER/NS/NAME or pod:CLUSTER/NS/NAME) to `url`; the
        records go to a JSONL file (returned). `keep_alive_max_requests` > 0 reuses connections;
        `name` tells several loads of one cluster apart (records, stop_load take it; default: the
        cluster's name). `method` and `ok_status` (the one right status, 0: any 2xx) are the load
        generator's."""
        key = name or cluster
        out = self.state_dir / "demo" / f"load-{key}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "clusters.lab.loadgen", url, "--rate", str(rate_per_s),
                "--timeout-s", str(timeout_s), "--out", str(out)]
        if keep_alive_max_requests > 0:
            argv += ["--keep-alive", "--max-requests-per-connection", str(keep_alive_max_requests)]
        if method != "GET":
            argv += ["--method", method]
        if ok_status:
            argv += ["--ok-status", str(ok_status)]
        self.runner.spawn(f"load-{key}", (pod if pod.startswith("pod:") else f"pod:{pod}") if pod else self.client_pod(cluster), argv)
        self.loads[key] = out
        return out

    def records(self, cluster: str) -> list[dict[str, Any]]:
        path = self.loads.get(cluster)
        if path is None or not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue  # a line being written right now
        return out

    def stop_load(self, cluster: str) -> list[dict[str, Any]]:
        self.runner.reap(f"load-{cluster}")
        return self.records(cluster)

    # --- faults -----------------------------------------------------------------------------------

    def fault(self, kind: str, target: str, names: Sequence[str], mode: str = "drop", *,
              label: str = "", cluster: str = "") -> dict[str, Any]:
        ev = self.note("fault_injected", fault=label or kind, target=" ".join(names), cluster=cluster)
        self.runner.fault(kind, target, names, mode)
        return ev

    def heal(self, target: str | None = None, names: Sequence[str] = (), *, label: str = "",
             cluster: str = "", fault_target: str = "") -> dict[str, Any]:
        ev = self.note("fault_healed", fault=label, target=fault_target or " ".join(names), cluster=cluster)
        self.runner.heal(target, names)
        return ev

    # --- git --------------------------------------------------------------------------------------

    def push(self, edit: Callable[[Path], str]) -> str:
        """Clone the lab's fleet repo, apply `edit(worktree)` (returns the commit message), push.
        Files the edit adds or removes are committed too. Returns the pushed commit."""
        sha = self._push(edit)
        if sha is None:
            raise DemoError("the edit changed nothing in the fleet repo; nothing was pushed")
        return sha

    def restore(self, base_sha: str, message: str) -> str | None:
        """Push a commit whose tree is `base_sha`'s (undo everything pushed since); None when the
        repo's tree already is that one (nothing pushed)."""
        def edit(wt: Path) -> str:
            _git(["-C", str(wt), "read-tree", "--reset", "-u", base_sha], self._git_env())
            return message

        return self._push(edit)

    def head(self) -> str:
        """The commit the lab's fleet repo's default branch points at."""
        url = self.lab.get("git_url")
        if not url:
            raise DemoError("the lab serves no Git repository (was it started with a fleet directory?)")
        out = _git(["ls-remote", url, "HEAD"], self._git_env()).split()
        if not out:
            raise DemoError(f"the lab's fleet repo {url} has no HEAD")
        return out[0]

    @staticmethod
    def _git_env() -> dict[str, str]:
        return {**os.environ, "GIT_AUTHOR_NAME": "meshfed demo", "GIT_AUTHOR_EMAIL": "demo@meshfed.invalid",
                "GIT_COMMITTER_NAME": "meshfed demo", "GIT_COMMITTER_EMAIL": "demo@meshfed.invalid",
                "GIT_TERMINAL_PROMPT": "0"}

    def _push(self, edit: Callable[[Path], str]) -> str | None:
        url = self.lab.get("git_url")
        if not url:
            raise DemoError("the lab serves no Git repository (was it started with a fleet directory?)")
        env = self._git_env()
        with tempfile.TemporaryDirectory(prefix="meshfed-push-") as tmp:
            wt = Path(tmp) / "fleet"
            _git(["clone", "-q", url, str(wt)], env)
            message = edit(wt)
            _git(["-C", str(wt), "add", "-A"], env)
            if not _git(["-C", str(wt), "status", "--porcelain"], env).strip():
                return None
            _git(["-C", str(wt), "commit", "-qm", message], env)
            sha = _git(["-C", str(wt), "rev-parse", "HEAD"], env).strip()
            self.note("policy_pushed", target="fleet repo", detail=f"{message} @{sha[:8]}")
            # the lab's Git server takes pushes with its credentials only (a 0600 file it wrote)
            from clusters.lab.gitserver import credential_helper_args

            creds = self.lab.get("git_credentials_file") or ""
            helper = credential_helper_args(creds) if creds else []
            _git(["-C", str(wt), *helper, "push", "-q", "origin", "HEAD"], env)
        return sha

    def wait_attempted(self, sha: str, timeout_s: float = 60.0) -> dict[str, Any]:
        """Until the controller has attempted `sha` (applied it or rejected it); its status then."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = self.status()
            if st is not None and (st.get("desired") or {}).get("revision") == sha:
                return st
            time.sleep(0.25)
        raise DemoError(f"the controller did not attempt {sha[:8]} within {timeout_s:.0f} s; see "
                        f"{self.state_dir}/logs/controller.log")

    def failover_events(self, since_s: float) -> list[dict[str, Any]]:
        """The controller's failover history (every kind of event, every service) since `since_s`."""
        data = self.api(f"/api/v1/failover-history?since_s={since_s}")
        return [dict(e) for e in data] if isinstance(data, list) else []

    def log_path(self, source: str) -> Path:
        """The log of `controller`, `ztunnel/<cluster>/<node>` or `gateway/<cluster>`."""
        name = "controller.log" if source == "controller" else source.replace("/", "-") + ".log"
        return self.state_dir / "logs" / name


def _git(args: list[str], env: Mapping[str, str]) -> str:
    r = subprocess.run(["git", *args], capture_output=True, text=True, env=dict(env), timeout=60, check=False)
    if r.returncode != 0:
        raise DemoError(f"git {' '.join(args[:3])} failed: {r.stderr.strip()}")
    return r.stdout


def replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if old not in text:
        raise DemoError(f"{path}: expected to find {old!r} to change it")
    path.write_text(text.replace(old, new, 1))


def served_summary(records: Sequence[Mapping[str, Any]]) -> str:
    """'east 120, south 3; 0 failed, 0 indeterminate' for a slice of load records."""
    by: dict[str, int] = {}
    failed = indet = 0
    for r in records:
        if r.get("outcome") == "ok":
            by[str(r.get("cluster"))] = by.get(str(r.get("cluster")), 0) + 1
        elif r.get("outcome") == "fail":
            failed += 1
        else:
            indet += 1
    served = ", ".join(f"{c} {n}" for c, n in sorted(by.items(), key=lambda kv: -kv[1])) or "nobody"
    return f"{served}; {failed} failed, {indet} indeterminate"


def between(records: Sequence[Mapping[str, Any]], t0_s: float, t1_s: float) -> list[Mapping[str, Any]]:
    return [r for r in records if t0_s <= float(r.get("start_s", 0.0)) < t1_s]


def first_served_by(records: Sequence[Mapping[str, Any]], cluster: str, after_s: float) -> float | None:
    """Start of the first ok request served by `cluster` at/after `after_s` (seconds), if any."""
    for r in sorted(records, key=lambda r: float(r.get("start_s", 0.0))):
        if float(r.get("start_s", 0.0)) >= after_s and r.get("outcome") == "ok" and r.get("cluster") == cluster:
            return float(r["start_s"])
    return None


# --- the canary split ---------------------------------------------------------------------------

CANARY_WORKLOAD = "checkout-v2"   # the canary of checkout (policies/shop/checkout-canary.yaml)
CANARY_ROUTE = "policies/shop/checkout-canary.yaml"


def backend_split(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Ok requests per serving workload (which backend service of a route answered)."""
    out: dict[str, int] = {}
    for r in records:
        if r.get("outcome") == "ok" and r.get("pod"):
            w = workload_of(str(r["pod"]))
            out[w] = out.get(w, 0) + 1
    return dict(sorted(out.items()))


def split_summary(records: Sequence[Mapping[str, Any]]) -> str:
    """'checkout 68 (91%), checkout-v2 7 (9%)' for a slice of load records."""
    split = backend_split(records)
    total = sum(split.values())
    if not total:
        return "no request served"
    return ", ".join(f"{w} {n} ({100.0 * n / total:.0f}%)" for w, n in split.items())


def without_canary(records: Sequence[Mapping[str, Any]], canary: str = CANARY_WORKLOAD) -> list[Mapping[str, Any]]:
    """The records of the failover story: requests the canary served are left out. The canary runs
    in one cluster and a fault on checkout's pods does not touch it, so its share would look like
    the faulted cluster still serving (the priority order names clusters, and the canary's answers
    carry its cluster). Failed and indeterminate requests stay: they did not reach the canary."""
    return [r for r in records if not (r.get("outcome") == "ok" and workload_of(str(r.get("pod", ""))) == canary)]


def failed_back_at(records: Sequence[Mapping[str, Any]], cluster: str, after_s: float) -> float | None:
    """When `cluster`'s own (non-canary) backends served again after `after_s`: the canary kept
    serving there through the fault, so its answers say nothing about failback."""
    return first_served_by(without_canary(records), cluster, after_s)


def set_canary_weights(worktree: Path, stable: int, canary: int) -> None:
    """Edit the HTTPRoute's two backendRef weights (checkout, checkout-v2) in a fleet worktree."""
    path = worktree / CANARY_ROUTE
    lines = path.read_text().splitlines(keepends=True)
    names = {"checkout": stable, CANARY_WORKLOAD: canary}
    current = ""
    changed: set[str] = set()
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith("- name:"):
            current = s.split(":", 1)[1].strip()
        elif s.startswith("weight:") and current in names:
            lines[i] = line[: line.index("weight:")] + f"weight: {names[current]}\n"
            changed.add(current)
    if changed != set(names):
        raise DemoError(f"{path}: expected backendRefs {sorted(names)} with weights, found {sorted(changed)}")
    path.write_text("".join(lines))
