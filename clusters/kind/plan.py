"""What `meshfed lab up|down|fault --provider kind` does, decided purely as a plan of commands.

Every command the kind provider runs is a `Command` in a `Plan` built here from the fleet and
the facts the runner gathered (`KindFacts`: the docker `kind` network, node addresses); one runner
(`clusters.kind.runner.CommandRunner`) executes plans. Unit tests check the plans: which clusters
with which subnets, which contexts, in which order.

`lab up --provider kind` in two plans:

  plan_clusters   kind create cluster per Cluster (its podCIDRs/serviceCIDRs, one worker per
                  LabCluster node labelled with its zone), into the state directory's kubeconfig
                  (contexts kind-<cluster>); docker network inspect kind (the facts)
  plan_install    the image (docker build, kind load docker-image per cluster); MetalLB per cluster
                  with its own pool from the kind network; the controller on this machine
                  (meshfed controller run, proxies dial it at the kind network's gateway address);
                  meshfed install and the LabCluster's workloads per cluster; rollouts; convergence

The LoadBalancer implementation is MetalLB (as Istio's multicluster kind CI), not
cloud-provider-kind: it runs inside each cluster from `kubectl apply` (no extra daemon on the
host holding the docker socket, nothing left behind when a cluster is deleted, so `lab down`
deletes exactly what `up` created), and its L2 mode answers for the gateway address on the docker
`kind` network that every cluster's nodes share, which is where east-west traffic flows. Each
cluster gets a disjoint /28 from the top /24 of that network.

Why the controller runs on the host: the fleet repo and the kubeconfig are there, and it is what
an operator does first (`--in-cluster` is the other way, see `clusters.kind.manifests`).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gitops.model import ClusterApiKind, ConfigSnapshot, LabCluster

KIND_VERSION = "v0.32.0"
NODE_IMAGE = "kindest/node:v1.36.1"          # kind v0.32.0's default node image
KUBERNETES_VERSION = "1.36.1"                # what the manifests are validated against
METALLB_VERSION = "v0.14.3"                  # the manifest Istio's multicluster kind CI applies
METALLB_MANIFEST = f"https://raw.githubusercontent.com/metallb/metallb/{METALLB_VERSION}/config/manifests/metallb-native.yaml"
KIND_NETWORK = "kind"
KIND_POD_SUBNET, KIND_SERVICE_SUBNET = "10.244.0.0/16", "10.96.0.0/16"   # kind's defaults
CONTROLLER_GRPC_PORT, CONTROLLER_BOOTSTRAP_PORT, CONTROLLER_HTTP_PORT = 15012, 15013, 15014
ZONE_LABEL, REGION_LABEL = "topology.kubernetes.io/zone", "topology.kubernetes.io/region"
LAB_NODE_LABEL = "meshfed.dev/lab-node"
MESHFED = ("-m", "federation.cli.main")      # `meshfed` as this interpreter runs it
STATE_FILE = "kind-state.json"
KUBECONFIG_FILE = "kubeconfig"
PARTITION_COMMENT = "meshfed-partition"


class KindPlanError(ValueError):
    """The fleet cannot be laid out on kind; the message says what to change."""


@dataclass(frozen=True, slots=True)
class Command:
    """One command of a plan. `creates`: what it leaves behind (recorded for `lab down`);
    `background`: started and left running (its pid is recorded); `retry_for_s`: re-run until it
    succeeds or that long has passed; `fact`: its stdout is kept under that name."""

    argv: tuple[str, ...]
    what: str
    stdin: str | None = None
    timeout_s: float = 300.0
    creates: tuple[str, str] | None = None          # ("kind-cluster", name) | ("process", name)
    background: bool = False
    log: str = ""                                   # background: log file
    retry_for_s: float = 0.0
    fact: str = ""
    env: tuple[tuple[str, str], ...] = ()

    def shell(self) -> str:
        """How it reads in a terminal (for --dry-run and errors)."""
        import shlex

        text = " ".join(shlex.quote(a) for a in self.argv)
        return f"{text} <<EOF (…{len(self.stdin)} bytes)" if self.stdin else text


@dataclass(frozen=True, slots=True)
class Plan:
    commands: tuple[Command, ...]

    def argvs(self) -> list[tuple[str, ...]]:
        return [c.argv for c in self.commands]


@dataclass(frozen=True, slots=True)
class KindOptions:
    state_dir: Path
    fleet_dir: Path
    repo_dir: Path                                  # where the Dockerfile is (this checkout)
    python: tuple[str, ...] = ("python3",)
    image: str = "meshfed/meshfed:0.1.0"
    node_image: str = NODE_IMAGE
    build_image: bool = True
    metallb_manifest: str = METALLB_MANIFEST
    wait_s: float = 300.0

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / KUBECONFIG_FILE


@dataclass(frozen=True, slots=True)
class KindFacts:
    """What the runner learned from docker after the clusters exist."""

    network: str                                    # the kind network's IPv4 subnet, e.g. 172.18.0.0/16
    gateway: str                                    # its gateway (this machine on that network)
    node_addresses: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # cluster -> node -> IP


def context(cluster: str) -> str:
    return f"kind-{cluster}"


def check_fleet(snapshot: ConfigSnapshot) -> list[str]:
    """What in the fleet keeps it from running on kind, each with the fix (empty: fine)."""
    problems = []
    for name, c in sorted(snapshot.clusters.items()):
        want = context(name)
        if c.api.kind is not ClusterApiKind.KUBECONFIG or c.api.context != want:
            problems.append(f"cluster {name}: spec.api is {c.api.kind.value}/{c.api.context}; kind writes the context "
                            f"{want}: set `api: {{kind: Kubeconfig, context: {want}}}` in clusters/{name}.yaml "
                            f"(examples/fleet-kind is such a fleet)")
        if c.east_west_gateway is not None and c.east_west_gateway.address is not None:
            problems.append(f"cluster {name}: eastWestGateway.address {c.east_west_gateway.address} is fixed, but on "
                            f"kind MetalLB gives the address: remove `address:` from clusters/{name}.yaml (the "
                            f"controller then reads it from the gateway Service)")
        if len(name) > 40:
            problems.append(f"cluster {name}: the name is too long for kind's node containers (40 characters at most)")
    if not snapshot.clusters:
        problems.append("the fleet has no Cluster objects: add clusters/<name>.yaml")
    return problems


def kind_config(snapshot: ConfigSnapshot, cluster: str, node_image: str = NODE_IMAGE) -> dict[str, object]:
    """The kind Cluster config (v1alpha4): the fleet's subnets, one worker per LabCluster node."""
    c = snapshot.clusters[cluster]  # type: ignore[index]
    lab: LabCluster | None = snapshot.lab_clusters.get(c.name)
    networking: dict[str, object] = {
        "podSubnet": c.pod_cidrs[0] if c.pod_cidrs else KIND_POD_SUBNET,
        "serviceSubnet": c.service_cidrs[0] if c.service_cidrs else KIND_SERVICE_SUBNET,
    }
    for what in ("podSubnet", "serviceSubnet"):
        net = ipaddress.ip_network(str(networking[what]))
        if net.overlaps(ipaddress.ip_network("10.255.0.0/16")):
            raise KindPlanError(f"cluster {cluster}: {what} {net} overlaps 10.255.0.0/16, which must stay unused")
    nodes: list[dict[str, object]] = [{"role": "control-plane", "image": node_image}]
    for n in (lab.nodes if lab is not None else ()):
        nodes.append({"role": "worker", "image": node_image, "labels": {
            ZONE_LABEL: n.zone or c.zone, REGION_LABEL: c.region, LAB_NODE_LABEL: n.name}})
    return {"kind": "Cluster", "apiVersion": "kind.x-k8s.io/v1alpha4", "name": cluster, "networking": networking,
            "nodes": nodes}


def metallb_pool(network: str, cluster_index: int) -> str:
    """Cluster `cluster_index` (1-based, clusters sorted by name)'s MetalLB range: the i-th /28 of
    the kind network's top /24, so pools never overlap and stay clear of the nodes (docker hands
    node addresses out from the bottom)."""
    net = ipaddress.ip_network(network)
    if not isinstance(net, ipaddress.IPv4Network) or net.prefixlen > 24:
        raise KindPlanError(f"the docker network {KIND_NETWORK!r} is {network}; an IPv4 /24 or larger is needed "
                            f"for MetalLB pools (docker network rm kind; kind recreates it)")
    top = list(net.subnets(new_prefix=24))[-1]
    blocks = list(top.subnets(new_prefix=28))
    if not 1 <= cluster_index < len(blocks):
        raise KindPlanError(f"at most {len(blocks) - 1} clusters fit the MetalLB ranges of {top}")
    return str(blocks[cluster_index])


def metallb_objects(pool: str) -> list[dict[str, object]]:
    return [
        {"apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool",
         "metadata": {"name": "meshfed", "namespace": "metallb-system"}, "spec": {"addresses": [pool]}},
        {"apiVersion": "metallb.io/v1beta1", "kind": "L2Advertisement",
         "metadata": {"name": "meshfed", "namespace": "metallb-system"}, "spec": {"ipAddressPools": ["meshfed"]}},
    ]


def _kubectl(opts: KindOptions, cluster: str, *args: str) -> tuple[str, ...]:
    return ("kubectl", "--kubeconfig", str(opts.kubeconfig), "--context", context(cluster), *args)


def plan_clusters(snapshot: ConfigSnapshot, opts: KindOptions) -> Plan:
    problems = check_fleet(snapshot)
    if problems:
        raise KindPlanError("; ".join(problems))
    cmds: list[Command] = []
    for name in sorted(snapshot.clusters):
        cfg = kind_config(snapshot, name, opts.node_image)
        cmds.append(Command(("kind", "create", "cluster", "--name", name, "--image", opts.node_image,
                             "--kubeconfig", str(opts.kubeconfig), "--wait", "180s", "--config", "-"),
                            f"create kind cluster {name} (pods {cfg['networking']['podSubnet']}, "  # type: ignore[index]
                            f"services {cfg['networking']['serviceSubnet']})",  # type: ignore[index]
                            stdin=json.dumps(cfg, indent=1), timeout_s=600, creates=("kind-cluster", name)))
    cmds.append(Command(("docker", "network", "inspect", KIND_NETWORK, "--format", "{{json .IPAM.Config}}"),
                        "read the kind network's subnet and gateway", timeout_s=30, fact="kind-network"))
    for name in sorted(snapshot.clusters):
        cmds.append(Command(("kind", "get", "nodes", "--name", name), f"list {name}'s nodes", timeout_s=30,
                            fact=f"nodes/{name}"))
    return Plan(tuple(cmds))


def parse_network(ipam_json: str) -> tuple[str, str]:
    """(IPv4 subnet, gateway) from `docker network inspect kind --format '{{json .IPAM.Config}}'`."""
    try:
        entries = json.loads(ipam_json)
    except ValueError as e:
        raise KindPlanError(f"cannot read the kind network's IPAM config ({e}): {ipam_json[:200]!r}") from None
    for entry in entries or []:
        subnet = str(entry.get("Subnet") or "")
        if subnet and ipaddress.ip_network(subnet).version == 4:
            gateway = str(entry.get("Gateway") or ipaddress.ip_network(subnet).network_address + 1)
            return subnet, gateway
    raise KindPlanError(f"the docker network {KIND_NETWORK!r} has no IPv4 subnet: {ipam_json[:200]!r}")


def plan_install(snapshot: ConfigSnapshot, opts: KindOptions, facts: KindFacts) -> Plan:
    names = sorted(snapshot.clusters)
    meshfed = (*opts.python, *MESHFED)
    cmds: list[Command] = []
    if opts.build_image:
        cmds.append(Command(("docker", "build", "-t", opts.image, "-f", str(opts.repo_dir / "Dockerfile"),
                             str(opts.repo_dir)), f"build the image {opts.image}", timeout_s=1800))
    cmds += [Command(("kind", "load", "docker-image", opts.image, "--name", n), f"load {opts.image} into {n}",
                     timeout_s=600) for n in names]
    for i, n in enumerate(names, start=1):
        cmds += [
            Command(_kubectl(opts, n, "apply", "-f", opts.metallb_manifest), f"install MetalLB {METALLB_VERSION} in {n}"),
            Command(_kubectl(opts, n, "-n", "metallb-system", "wait", "--for=condition=Available",
                             "deployment/controller", f"--timeout={int(opts.wait_s)}s"), f"wait for MetalLB in {n}",
                    timeout_s=opts.wait_s + 30),
            # the webhook answers a little after the deployment is Available: retry the pool
            Command(_kubectl(opts, n, "apply", "-f", "-"), f"MetalLB pool {metallb_pool(facts.network, i)} for {n}",
                    stdin="".join(f"---\n{json.dumps(o)}\n" for o in metallb_objects(metallb_pool(facts.network, i))),
                    retry_for_s=120),
        ]
    controller_dir = opts.state_dir / "controller"
    cmds.append(Command(
        (*meshfed, "controller", "run", "--repo", str(opts.fleet_dir), "--state-dir", str(controller_dir),
         # the kind network's gateway (this machine on that network) is where the proxies dial it:
         # not 0.0.0.0, which would offer the unauthenticated bootstrap port to the whole LAN
         "--kubeconfig", str(opts.kubeconfig), "--listen", f"{facts.gateway}:{CONTROLLER_GRPC_PORT}",
         "--bootstrap-listen", f"{facts.gateway}:{CONTROLLER_BOOTSTRAP_PORT}",
         "--status-listen", f"127.0.0.1:{CONTROLLER_HTTP_PORT}"),
        "start the controller on this machine", background=True, log=str(opts.state_dir / "controller.log"),
        creates=("process", "controller")))
    # each cluster's proxies verify the controller against their own trust domain's roots only
    roots = {n: controller_dir / "roots" / f"{snapshot.clusters[n].trust_domain}.pem" for n in names}  # type: ignore[index]
    for path in sorted(set(roots.values())):
        cmds.append(Command(("test", "-s", str(path)), f"wait for the controller's serving roots ({path.stem})",
                            retry_for_s=120))
    for n in names:
        common = ("--fleet", str(opts.fleet_dir), "--context", context(n), "--kubeconfig", str(opts.kubeconfig),
                  "--image", opts.image)
        cmds += [
            Command((*meshfed, "install", *common, "--controller", f"{facts.gateway}:{CONTROLLER_GRPC_PORT}",
                     "--bootstrap", f"{facts.gateway}:{CONTROLLER_BOOTSTRAP_PORT}", "--controller-roots", str(roots[n])),
                    f"install meshfed in {n}"),
            Command((*meshfed, "install", *common, "--workloads"), f"deploy {n}'s LabCluster workloads"),
        ]
    for n in names:
        cmds += [
            Command(_kubectl(opts, n, "-n", "meshfed-system", "rollout", "status", "daemonset/ztunnel",
                             f"--timeout={int(opts.wait_s)}s"), f"wait for the node proxies in {n}",
                    timeout_s=opts.wait_s + 30),
            Command(_kubectl(opts, n, "wait", "--for=condition=Available", "deployment", "--all", "--all-namespaces",
                             f"--timeout={int(opts.wait_s)}s"), f"wait for every deployment in {n}",
                    timeout_s=opts.wait_s + 30),
        ]
    cmds.append(Command((*meshfed, "status", "--controller", f"http://127.0.0.1:{CONTROLLER_HTTP_PORT}", "-o", "json"),
                        "wait until every proxy is SYNCED at the fleet's revision", retry_for_s=opts.wait_s))
    return Plan(tuple(cmds))


def plan_down(created: Sequence[tuple[str, str]], opts: KindOptions) -> Plan:
    """Undo exactly what `up` recorded, newest first (the controller before the clusters)."""
    cmds: list[Command] = []
    for what, name in reversed(list(created)):
        if what == "kind-cluster":
            cmds.append(Command(("kind", "delete", "cluster", "--name", name, "--kubeconfig", str(opts.kubeconfig)),
                                f"delete kind cluster {name}", timeout_s=300))
        elif what == "process":
            cmds.append(Command(("meshfed-internal", "stop-process", name), f"stop the {name} process"))
    return Plan(tuple(cmds))


# --- faults ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KindFault:
    """A fault as commands, and the commands that heal it (recorded by the runner)."""

    apply: tuple[Command, ...]
    heal: tuple[Command, ...]


def _workloads_matching(snapshot: ConfigSnapshot, pattern: str) -> list[tuple[str, str, str, int]]:
    """`east/shop/checkout-[0-9]*` (the lab's pod names: <workload>-<i>) or `east/shop/checkout` ->
    [(cluster, namespace, workload, replicas)]."""
    parts = pattern.split("/")
    if len(parts) != 3:
        raise KindPlanError(f"pod target {pattern!r}: write CLUSTER/NAMESPACE/POD (a glob over the lab's pod names "
                            f"<workload>-<i>, or a workload name)")
    cluster, ns, glob = parts
    lab = snapshot.lab_clusters.get(cluster)  # type: ignore[call-overload]
    if lab is None:
        raise KindPlanError(f"no LabCluster {cluster!r}; clusters with workloads: {', '.join(sorted(snapshot.lab_clusters))}")
    out = []
    for w in lab.workloads:
        pods = [f"{w.name}-{i}" for i in range(w.replicas)]
        if w.namespace == ns and (fnmatch.fnmatchcase(w.name, glob) or any(fnmatch.fnmatchcase(p, glob) for p in pods)):
            out.append((cluster, ns, w.name, w.replicas))
    if not out:
        raise KindPlanError(f"no workload in {cluster}/{ns} matches {glob!r}")
    return out


def node_container(cluster: str, node: str, facts: KindFacts) -> str:
    """A LabCluster node name (node-1) or a kind node name (east-worker) -> its docker container."""
    nodes = facts.node_addresses.get(cluster, {})
    if node in nodes:
        return node
    workers = sorted(n for n in nodes if "worker" in n)
    if node.startswith("node-") and node[5:].isdigit() and 1 <= int(node[5:]) <= len(workers):
        return workers[int(node[5:]) - 1]   # kind names workers east-worker, east-worker2, … in LabCluster order
    raise KindPlanError(f"cluster {cluster} has no node {node!r}; nodes: {', '.join(sorted(nodes)) or 'none known'}")


def plan_fault(snapshot: ConfigSnapshot, opts: KindOptions, facts: KindFacts, kind: str, target: str,
               names: Sequence[str]) -> KindFault:
    """The lab's faults that map onto kind. pod kill -> delete the pods (the Deployment brings new
    ones: a crash); pod stop -> scale to 0 (gone until heal); gateway kill/stop -> scale the
    gateway to 0; node stop -> docker pause (cont/heal: unpause); node kill -> docker stop;
    partition wan A B -> iptables DROP between A's and B's node containers (both ways)."""
    apply: list[Command] = []
    heal: list[Command] = []
    if target == "pod" and kind in ("kill", "stop"):
        for pattern in names or ("",):
            for cluster, ns, workload, replicas in _workloads_matching(snapshot, pattern):
                if kind == "kill":
                    apply.append(Command(_kubectl(opts, cluster, "-n", ns, "delete", "pod", "-l", f"app={workload}",
                                                  "--wait=false"), f"delete {cluster}/{ns} {workload} pods"))
                else:
                    apply.append(Command(_kubectl(opts, cluster, "-n", ns, "scale", f"deployment/{workload}",
                                                  "--replicas=0"), f"scale {cluster}/{ns}/{workload} to 0"))
                    heal.append(Command(_kubectl(opts, cluster, "-n", ns, "scale", f"deployment/{workload}",
                                                 f"--replicas={replicas}"), f"scale {cluster}/{ns}/{workload} back"))
    elif target == "gateway" and kind in ("kill", "stop"):
        for cluster in names:
            if cluster not in snapshot.clusters:
                raise KindPlanError(f"no cluster {cluster!r}")
            apply.append(Command(_kubectl(opts, cluster, "-n", "meshfed-system", "scale", "deployment/eastwest-gateway",
                                          "--replicas=0"), f"stop {cluster}'s gateway"))
            heal.append(Command(_kubectl(opts, cluster, "-n", "meshfed-system", "scale", "deployment/eastwest-gateway",
                                         "--replicas=1"), f"start {cluster}'s gateway"))
    elif target == "node" and kind in ("kill", "stop", "cont"):
        for spec in names:
            cluster, _, node = spec.partition("/")
            container = node_container(cluster, node, facts)
            if kind == "stop":
                apply.append(Command(("docker", "pause", container), f"pause node {container}"))
                heal.append(Command(("docker", "unpause", container), f"unpause node {container}"))
            elif kind == "cont":
                apply.append(Command(("docker", "unpause", container), f"unpause node {container}"))
            else:
                apply.append(Command(("docker", "stop", container), f"stop node {container}"))
                heal.append(Command(("docker", "start", container), f"start node {container}"))
    elif target == "wan" and kind == "partition":
        if len(names) != 2:
            raise KindPlanError("partition wan takes two clusters: meshfed lab fault partition wan east west")
        a, b = names
        for src, dst in ((a, b), (b, a)):
            dst_ips = sorted(facts.node_addresses.get(dst, {}).values())
            pool = metallb_pool(facts.network, sorted(snapshot.clusters).index(dst) + 1)
            for container in sorted(facts.node_addresses.get(src, {})):
                for chain in ("OUTPUT", "FORWARD"):
                    for ip in [*dst_ips, pool]:
                        rule = (chain, "-d", ip, "-m", "comment", "--comment", PARTITION_COMMENT, "-j", "DROP")
                        apply.append(Command(("docker", "exec", container, "iptables", "-w", "-I", *rule),
                                             f"drop {src}->{dst} ({ip}) in {container}"))
                        heal.append(Command(("docker", "exec", container, "iptables", "-w", "-D", *rule),
                                            f"undo {src}->{dst} ({ip}) in {container}"))
    elif target == "controller" and kind in ("kill", "stop"):
        apply.append(Command(("meshfed-internal", "stop-process", "controller"), "stop the controller"))
        heal.append(Command(("meshfed-internal", "start-process", "controller"), "start the controller again"))
    else:
        raise KindPlanError(f"`{kind} {target}` has no kind equivalent; on kind: kill|stop pod, kill|stop gateway, "
                            f"kill|stop|cont node, partition wan A B, kill controller, heal")
    return KindFault(tuple(apply), tuple(heal))
