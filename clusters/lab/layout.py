"""The lab's shared vocabulary: what lives where in a state directory, the fixed ports and addresses
the lab's processes agree on, the error both sides raise, and `exec` targets.

Both halves of the lab read this module: the host side (`clusters.lab.runner`, `clusters.lab.nsexec`)
and the sandbox side (`clusters.lab.supervisor` and the modules it composes). Keeping the names in
one place is what lets them agree without talking.

Targets (`meshfed lab exec WHERE`, `spawn`): `pod:C/NS/NAME`, `node:C/NODE`, `gateway:C`, `root`
(the sandbox's own namespace, where the bridges and the controller live). `exec_targets()` turns
the plan into the table the supervisor publishes in `lab.json`; `resolve_target()` looks a target
up in it (pure), so the host can enter a namespace without asking the supervisor anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from clusters.lab.topology import ROOT_NS, LabPlan, NetnsName
from ztunnel.api.identity import IdentityError, ProxyId

# --- the state directory ------------------------------------------------------------------------

PLAN_FILE = "plan.pickle"           # the plan, written by `up` before the sandbox starts
REQUEST_FILE = "request.json"       # options of this `up` (fleet dir, contexts, what to start)
KUBECONFIG_FILE = "kubeconfig"      # one context per lab cluster (0600: it carries credentials)
LOG_DIR = "logs"
PROXIES_DIR = "proxies"             # proxies/<id>/{config.json,certs/,state/,sa-token}
CONTROLLER_DIR = "controller"       # the controller's --state-dir (it owns what is inside)
TRUST_ANCHORS_DIR = "roots"         # there: roots/<trust-domain>.pem, written by the controller at start
SA_TOKEN_FILE = "sa-token"          # in a proxy's directory, 0600: its pod's projected ServiceAccount token
STATUS_API_TOKEN_FILE = "status-api-token"      # there too, 0600: the status API's bearer token
GIT_DIR = "git"                     # the fleet repo the lab serves (fleet.git) and ...
GIT_CREDENTIALS_FILE = "credentials"  # ... in it, 0600: who may push (git credential-store format)
MAX_SOCKET_PATH = 100               # sun_path is 108 bytes; leave room

# --- inside the sandbox -------------------------------------------------------------------------

RUN_DIR = "/run/meshfed"            # sandbox-private tmpfs: pod control sockets
CONTROLLER_GRPC_PORT = 15012
CONTROLLER_BOOTSTRAP_PORT = 15013   # certificate service without client auth: a proxy's first SVID
CONTROLLER_HTTP_PORT = 15014        # status API and /metrics

TARGET_KINDS = ("pod", "node", "gateway", "root")
TARGET_USAGE = "use pod:CLUSTER/NAMESPACE/POD, node:CLUSTER/NODE, gateway:CLUSTER or root"


class LabError(RuntimeError):
    """The lab could not do what was asked; the message says why and what to do."""


def proxy_dir(state_dir: Path, proxy_id: str) -> Path:
    """`ztunnel/east/node-1` -> <state>/proxies/ztunnel_east_node-1."""
    return state_dir / PROXIES_DIR / proxy_id.replace("/", "_")


def proxy_pod_name(proxy_id: str) -> str:
    """The Pod a lab proxy runs as in its cluster's API (namespace meshfed-system), the way the
    DaemonSet and the gateway Deployment would run it: `ztunnel/east/node-1` -> `ztunnel-node-1`,
    `gateway/east` -> `eastwest-gateway`. Its projected token is bound to that pod."""
    try:
        pid = ProxyId.parse(proxy_id)
    except IdentityError as e:
        raise LabError(str(e)) from None
    return f"ztunnel-{pid.node}" if pid.is_node else "eastwest-gateway"


# --- exec targets -------------------------------------------------------------------------------


def exec_targets(plan: LabPlan) -> dict[str, NetnsName]:
    """Every target of the lab and the namespace it names (`root` is the sandbox's own)."""
    out: dict[str, NetnsName] = {"root": ROOT_NS}
    for c in plan.clusters:
        out.update({f"node:{c.name}/{n.name}": n.netns for n in c.nodes})
        if c.gateway is not None:
            out[f"gateway:{c.name}"] = c.gateway.netns
        out.update({f"pod:{p.cluster}/{p.namespace}/{p.name}": p.netns for p in c.pods})
    return out


def resolve_target(targets: Mapping[str, str], where: str) -> NetnsName:
    """The namespace `where` names, or a LabError that says what exists."""
    kind, sep, rest = where.partition(":")
    if kind == "root" and not sep:
        return ROOT_NS
    shape = {"pod": 3, "node": 2, "gateway": 1}.get(kind)
    if shape is None or not sep or len(rest.split("/")) != shape or not all(rest.split("/")):
        raise LabError(f"target {where!r}: {TARGET_USAGE}")
    if where in targets:
        return NetnsName(targets[where])
    same_kind = sorted(t for t in targets if t.startswith(kind + ":"))
    raise LabError(f"no {kind} {rest!r} in this lab; {kind} targets: {', '.join(same_kind) or 'none'}")
