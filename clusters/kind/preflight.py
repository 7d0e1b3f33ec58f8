"""`meshfed check --pre --provider kind`: what this machine lacks for kind, each with its fix,
before anything is created. `lab up --provider kind` runs the same checks first and stops there.

Pure `evaluate(facts, snapshot)` decides; `probe()` gathers the facts (which commands exist, does
the Docker engine answer, the docker networks and host routes, the inotify limits, existing kind
clusters). Tests feed facts directly.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clusters.kind.plan import KIND_POD_SUBNET, KIND_SERVICE_SUBNET, KIND_VERSION, check_fleet
from gitops.model import ConfigSnapshot

# kind's known issue "Pod errors due to too many open files": what its docs ask for
MIN_INOTIFY_WATCHES = 524288
MIN_INOTIFY_INSTANCES = 512
FORBIDDEN = ipaddress.ip_network("10.255.0.0/16")


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True, slots=True)
class HostFacts:
    commands: Mapping[str, str | None]                     # docker, kind, kubectl -> path or None
    docker_engine: str | None = None                       # server version, None: no engine answered
    docker_error: str = ""
    kind_version: str = ""
    networks: Mapping[str, Sequence[str]] = field(default_factory=dict)   # docker network -> subnets
    routes: Sequence[str] = ()                             # host routes' destinations (CIDRs)
    inotify_watches: int | None = None
    inotify_instances: int | None = None
    kind_clusters: Sequence[str] = ()


INSTALL_HINTS = {
    "docker": "install Docker Engine (https://docs.docker.com/engine/install/) or Docker Desktop",
    "kind": f"install kind {KIND_VERSION}: `go install sigs.k8s.io/kind@{KIND_VERSION}` or the release binary "
            f"(https://kind.sigs.k8s.io/docs/user/quick-start/#installation)",
    "kubectl": "install kubectl (https://kubernetes.io/docs/tasks/tools/; Debian: apt install kubectl)",
}


def _cluster_subnets(snapshot: ConfigSnapshot) -> list[tuple[str, str, ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    out = []
    for name, c in sorted(snapshot.clusters.items()):
        for what, cidrs, default in (("podCIDRs", c.pod_cidrs, KIND_POD_SUBNET),
                                     ("serviceCIDRs", c.service_cidrs, KIND_SERVICE_SUBNET)):
            out.append((name, what, ipaddress.ip_network(cidrs[0] if cidrs else default)))
    return out


def evaluate(facts: HostFacts, snapshot: ConfigSnapshot | None) -> list[Check]:
    checks: list[Check] = []
    for cmd in ("docker", "kind", "kubectl"):
        path = facts.commands.get(cmd)
        checks.append(Check(f"{cmd} on PATH", path is not None, path or f"{cmd} not found", "" if path else INSTALL_HINTS[cmd]))
    if facts.commands.get("docker") is not None:
        ok = facts.docker_engine is not None
        checks.append(Check("Docker engine answers", ok,
                            f"server {facts.docker_engine}" if ok else (facts.docker_error or "no engine"),
                            "" if ok else "start the Docker engine (`sudo systemctl start docker`, or Docker Desktop), "
                                          "or point DOCKER_HOST at one; `docker info` must work without sudo"))
    for what, value, minimum, key in (("inotify watches", facts.inotify_watches, MIN_INOTIFY_WATCHES,
                                       "fs.inotify.max_user_watches"),
                                      ("inotify instances", facts.inotify_instances, MIN_INOTIFY_INSTANCES,
                                       "fs.inotify.max_user_instances")):
        if value is None:
            checks.append(Check(f"{what} >= {minimum}", True, f"{key} unreadable here: not checked"))
            continue
        checks.append(Check(f"{what} >= {minimum}", value >= minimum, f"{key} = {value}",
                            "" if value >= minimum else f"sudo sysctl -w {key}={minimum} (and add it to /etc/sysctl.d/ "
                                                        f"to keep it): kind nodes run many kubelet watchers"))
    if snapshot is None:
        return checks
    problems = check_fleet(snapshot)
    checks.append(Check("the fleet runs on kind", not problems, "\n          ".join(problems) or
                        f"{len(snapshot.clusters)} clusters with kind-<cluster> contexts, gateway addresses from MetalLB",
                        "edit the fleet as said (examples/fleet-kind is a fleet for kind)" if problems else ""))
    taken: list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]] = []
    for net_name, subnets in sorted(facts.networks.items()):
        if net_name == "kind":
            continue  # kind's own network: nodes live there, pods and services do not
        taken += [(f"docker network {net_name}", ipaddress.ip_network(s, strict=False)) for s in subnets]
    for r in facts.routes:
        if r != "default":
            try:
                taken.append((f"host route {r}", ipaddress.ip_network(r, strict=False)))
            except ValueError:
                continue
    clashes = []
    for cluster, what, net in _cluster_subnets(snapshot):
        if net.overlaps(FORBIDDEN):
            clashes.append(f"{cluster} {what} {net} overlaps 10.255.0.0/16 (reserved on these machines)")
        for owner, other in taken:
            if net.version == other.version and net.overlaps(other) and other.prefixlen > 0:
                clashes.append(f"{cluster} {what} {net} overlaps {owner} ({other})")
        for kind_net in facts.networks.get("kind", ()):
            if net.overlaps(ipaddress.ip_network(kind_net, strict=False)):
                clashes.append(f"{cluster} {what} {net} overlaps the docker kind network ({kind_net})")
    checks.append(Check("cluster subnets are free on this machine", not clashes,
                        "; ".join(clashes) or "no pod or service range collides with a docker network or host route",
                        "pick other podCIDRs/serviceCIDRs in clusters/<name>.yaml (never 10.255.0.0/16)" if clashes else ""))
    existing = sorted(set(facts.kind_clusters) & set(snapshot.clusters))
    checks.append(Check("no kind cluster of that name exists", not existing,
                        f"already there: {', '.join(existing)}" if existing else "none of the fleet's names is taken",
                        f"`meshfed lab down --provider kind` (if this tool made them) or `kind delete cluster --name "
                        f"{existing[0]}`" if existing else ""))
    return checks


def failed(checks: Sequence[Check]) -> list[Check]:
    return [c for c in checks if not c.ok]


def report(checks: Sequence[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"  {'PASS' if c.ok else 'FAIL'}  {c.name}: {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"        fix: {c.fix}")
    return "\n".join(lines)


# --- probing ----------------------------------------------------------------------------------------


def _run(argv: Sequence[str], timeout_s: float = 10.0) -> tuple[int, str, str]:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        return 127, "", str(e)
    return r.returncode, r.stdout, r.stderr


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def probe() -> HostFacts:
    commands = {c: shutil.which(c) for c in ("docker", "kind", "kubectl")}
    engine, error = None, ""
    networks: dict[str, list[str]] = {}
    if commands["docker"]:
        rc, out, err = _run(["docker", "info", "--format", "{{.ServerVersion}}"])
        if rc == 0 and out.strip():
            engine = out.strip()
            rc, out, _ = _run(["docker", "network", "ls", "--format", "{{.Name}}"])
            for name in out.split() if rc == 0 else []:
                rc2, cfg, _ = _run(["docker", "network", "inspect", name, "--format", "{{json .IPAM.Config}}"])
                if rc2 == 0:
                    try:
                        networks[name] = [str(e["Subnet"]) for e in json.loads(cfg) or [] if e.get("Subnet")]
                    except (ValueError, TypeError, KeyError):
                        continue
        else:
            error = (err.strip() or out.strip() or f"docker info exited {rc}").splitlines()[-1][:300]
    kind_version, kind_clusters = "", []
    if commands["kind"]:
        kind_version = _run(["kind", "version"])[1].strip()
        if engine:
            kind_clusters = _run(["kind", "get", "clusters"])[1].split()
    routes = []
    rc, out, _ = _run(["ip", "-4", "route", "show"])
    if rc == 0:
        routes = [line.split()[0] for line in out.splitlines() if line.strip()]
    return HostFacts(commands, engine, error, kind_version, networks, routes,
                     _read_int("/proc/sys/fs/inotify/max_user_watches"),
                     _read_int("/proc/sys/fs/inotify/max_user_instances"), kind_clusters)
