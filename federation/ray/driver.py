"""The driver: `meshfed controller run`. Joins a Ray cluster (`--ray-address`) or starts a local
one (the embedded default; dashboard off, few CPUs), creates the actors (`federation.ray.actors`)
and supervises them:

- the config server (the state owner) on this process's node (`federation.ray.placement`); the
  reconciler, the Git source and one agent per cluster of the applied revision wherever the
  placement puts them;
- every `status_interval_s`: the status of each actor, assembled into one document
  (`federation.controller.queries.assemble_status`) that the status API and /metrics
  (`federation.server.status_api`) serve from a cache;
- an agent per cluster of the applied revision, replaced when its spec changes, stopped when the
  cluster leaves the fleet;
- a reconciler that restarted and has no inputs gets them again (the snapshot, and a fresh LIST
  from every agent); a config server that restarted (it is not listening) is revived: the CAs of
  the applied revision, the same ports, and the reconciler's configs in full.

The driver opens nothing in the state directory either: what it reads from the store goes
through the state owner (`RemoteStore`). Before it creates any actor it looks at the state
directory's lock (`federation.controller.statelock`): held by another controller, it refuses with
that controller's pid and host, or with `standby` waits until the lock is free and then takes
over (the state owner actor takes the lock itself). It logs what `meshfed check` would say about
a state directory that was found empty, and once when the fleet looks orphaned by a lost one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from federation.controller.checks import build_checks
from federation.controller.git_feed import snapshot_for_cas
from federation.controller.queries import assemble_status
from federation.controller.queries import revisions as revision_rows
from federation.controller.sources import AgentSpec, GitPolicy, agent_specs
from federation.controller.statelock import LockHolder, StateDirLock, read_holder
from federation.controller.wire import decode_json, encode_snapshot
from federation.ray.actors import ClusterAgentActor, ConfigServerActor, GitSourceActor, ReconcilerActor
from federation.ray.placement import (
    Placement,
    agent_node,
    agents_on_departed_nodes,
    alive_node_ids,
    current_node_id,
    state_owner_options,
)
from federation.ray.remote import RemoteStore
from ztunnel.api import logsetup
from ztunnel.api.clock import CALENDAR_OFFSET_ENV, calendar_now

log = logging.getLogger(__name__)


@dataclass
class ControllerOptions:
    repo: str
    branch: str = "main"
    state_dir: str = ".meshfed"
    listen: str = "127.0.0.1:15010"
    status_listen: str = "127.0.0.1:15014"
    status_reads_need_token: bool = False   # reads need the token on loopback too (beyond it they always do)
    status_allowed_hosts: tuple[str, ...] = ()   # Host names besides localhost and the listen address
    bootstrap_listen: str | None = None    # certificate service without client auth; None: listen host, any port
    ray_address: str | None = None
    kubeconfig: str | None = None
    in_cluster: str | None = None          # the fleet cluster this controller runs in (its service account)
    insecure: bool = False                 # plaintext gRPC, proxy ids trusted: loopback tests only
    git_poll_interval_s: float | None = None
    git_policy: GitPolicy = field(default_factory=GitPolicy)   # signed commits, force pushes
    debounce_after_s: float = 0.1
    debounce_max_s: float = 10.0
    watch_timeout_s: int | None = None
    status_interval_s: float = 0.5
    num_cpus: int = 2
    placement: Placement = field(default_factory=Placement)
    standby: bool = False                  # another controller holds the state directory: wait and take over
    history_retention_s: float | None = None   # overrides the Federation's historyRetention
    extra: dict[str, Any] = field(default_factory=dict)


def setup_worker_logging() -> None:
    """Ray's worker_process_setup_hook: each worker logs like the controller that started it."""
    logsetup.configure_from_env()


def _logging_options() -> dict[str, Any]:
    """When this process configured meshfed logging (`meshfed controller run`), its actors log the
    same way and their lines come to this process's stderr (one log for the whole controller);
    otherwise (tests sharing one Ray) workers keep Ray's defaults and nothing is forwarded."""
    current = logsetup.current()
    if current is None:
        return {"log_to_driver": False}
    level, fmt = current
    # Ray's own lines in this process (start-up, warnings) through our handler, in our format
    ray_logger = logging.getLogger("ray")
    ray_logger.handlers.clear()
    ray_logger.propagate = True
    return {"log_to_driver": True,
            "runtime_env": {"env_vars": {logsetup.ENV_LEVEL: level, logsetup.ENV_FORMAT: fmt},
                            "worker_process_setup_hook": setup_worker_logging}}


CLAIM_GRACE_S = 10.0         # a predecessor's state owner that is still exiting
RELEASE_WAIT_S = 10.0        # stop() waits this long for the state owner to let the lock go
# every ray.get here has a timeout: an actor that hangs must not hang the driver (its supervisor
# keeps the last status, which then shows the hang: see checks.LOOP_STALL_S)
CALL_TIMEOUT_S = 10.0        # queries and triggers
START_TIMEOUT_S = 120.0      # the first calls: actor creation, the state directory's lock, new CA roots
NODE_CHECK_INTERVAL_S = 10.0  # how often the driver looks for agents whose node left the Ray cluster


def claim_state_dir(state_dir: str, standby: bool) -> None:
    """Refuse (StateDirLocked) or, as a standby, wait while another controller holds `state_dir`.
    Probes with the lock itself and lets it go again: the state owner actor takes it for good."""
    def waiting(holder: LockHolder | None) -> None:
        who = holder.describe() if holder is not None else "another process"
        log.warning("meshfed controller: standby: state directory %s is held by controller %s; taking over when "
                    "it exits", state_dir, who)

    probe = StateDirLock(state_dir)
    probe.acquire(wait=standby, on_wait=waiting, refuse_after_s=CLAIM_GRACE_S)
    probe.release()


def init_ray(address: str | None, num_cpus: int = 2) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USE_UVLOOP", "0")
    opts = _logging_options()
    offset_file = os.environ.get(CALENDAR_OFFSET_ENV)
    if offset_file:   # a simulated calendar (the lab's soak): every actor reads the same one
        runtime_env = opts.setdefault("runtime_env", {})
        runtime_env.setdefault("env_vars", {})[CALENDAR_OFFSET_ENV] = offset_file
    if address:
        ray.init(address=address, include_dashboard=False, **opts)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **opts)


class Controller:
    """The `meshfed controller run` process: creates and supervises the actors, serves status."""

    def __init__(self, opts: ControllerOptions) -> None:
        self.opts = opts
        self.state_dir = str(Path(opts.state_dir).resolve())
        self.kubeconfig = opts.kubeconfig or os.environ.get("KUBECONFIG")
        self.agents: dict[str, Any] = {}
        self.agent_specs: dict[str, AgentSpec] = {}
        self.agent_nodes: dict[str, str | None] = {}   # the node each agent is pinned to
        self._nodes_checked_at = float("-inf")
        self._cache: dict[str, Any] = {}
        self._cache_lock = threading.Lock()
        self._stop = threading.Event()
        self.status_server: Any = None
        self.port = 0
        self.bootstrap_port = 0
        self.config_server_restarts = 0
        self.state_node = ""
        self._revive_lock = threading.Lock()
        self._store: RemoteStore | None = None
        self._logged: set[str] = set()

    def start(self) -> Controller:
        claim_state_dir(self.state_dir, self.opts.standby)
        init_ray(self.opts.ray_address, self.opts.num_cpus)
        place = self.opts.placement
        self.state_node = current_node_id()
        self.config_server = ConfigServerActor.options(**state_owner_options(self.state_node)).remote(
            self.state_dir, self.opts.insecure, self.opts.history_retention_s, self.kubeconfig)
        self._store = RemoteStore(self.config_server)
        self.reconciler = ReconcilerActor.options(**place.options("reconciler")).remote(
            self.opts.debounce_after_s, self.opts.debounce_max_s, self.config_server)
        if not self.opts.insecure:
            # TLS needs the CAs before the server starts: load the fleet once here, synchronously
            snap = snapshot_for_cas(str(self.opts.repo), self.opts.branch, self._store, calendar_now(),
                                    self.opts.git_policy)
            if snap is not None:
                ray.get(self.config_server.ensure_cas.remote(encode_snapshot(snap)), timeout=START_TIMEOUT_S)
        self.port, self.bootstrap_port = (int(p) for p in ray.get(self.config_server.start.remote(
            self.opts.listen, self.reconciler, self.opts.bootstrap_listen), timeout=START_TIMEOUT_S))
        state = decode_json(ray.get(self.config_server.status.remote(), timeout=30)).get("state") or {}
        if state.get("created_now"):  # the state owner found the directory empty: say what that means
            log.warning("meshfed controller: %s", state.get("message", ""))
        self.git = GitSourceActor.options(**place.options("git")).remote(
            str(self.opts.repo), self.opts.branch, self.reconciler, self.config_server,
            self.opts.git_poll_interval_s, self.opts.git_policy)
        from federation.server.status_api import StatusServer

        # the state owner writes the token file (the driver opens nothing in the state directory)
        token = str(ray.get(self.config_server.status_api_token.remote(), timeout=30))
        self.status_server = StatusServer(self, self.opts.status_listen, token=token,
                                          reads_need_token=True if self.opts.status_reads_need_token else None,
                                          allowed_hosts=self.opts.status_allowed_hosts).start()
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._supervisor.start()
        return self

    # -- supervision -------------------------------------------------------------------------------

    def _supervise(self) -> None:
        failing = ""
        while not self._stop.is_set():
            try:
                self.refresh()
                if failing:
                    log.info("status refresh works again")
                    failing = ""
            except Exception as e:  # actors restarting: try again next round
                with self._cache_lock:
                    self._cache["supervisor_error"] = f"{type(e).__name__}: {e}"
                if f"{type(e).__name__}: {e}" != failing:
                    failing = f"{type(e).__name__}: {e}"
                    log.warning("status refresh failed (an actor restarting?), retrying every %.1f s: %s",
                                self.opts.status_interval_s, failing)
            self._stop.wait(self.opts.status_interval_s)

    def refresh(self) -> dict[str, Any]:
        rec = decode_json(ray.get(self.reconciler.status.remote(), timeout=10))
        cs = decode_json(ray.get(self.config_server.status.remote(), timeout=10))
        if not cs.get("port") and self.port:
            with self._revive_lock:
                cs = self._revive_config_server()
        self._ensure_agents(rec.get("fleet_clusters", {}))
        if ray.get(self.reconciler.missing_inputs.remote(), timeout=CALL_TIMEOUT_S):
            self.git.resend.remote()
            for a in self.agents.values():
                a.resend.remote()
        agent_st = {}
        for name, a in list(self.agents.items()):
            try:
                agent_st[name] = ray.get(a.status.remote(), timeout=5)
            except Exception as e:
                agent_st[name] = {"cluster": name, "up": False, "last_error": str(e)}
        git = ray.get(self.git.status.remote(), timeout=10)
        assert self._store is not None
        st = assemble_status(rec, cs, agent_st, git, state_dir=self.state_dir,
                             failover_events=self._store.failover_count(), trust=self._store.ca_roots(),
                             now_s=time.time(), state_node=self.state_node)
        with self._cache_lock:
            self._cache = st
        self._log_checks(st)
        return st

    def _log_checks(self, st: dict[str, Any]) -> None:
        """Log, once each, the checks that mean the operator must act on the controller's state."""
        for c in build_checks(st, calendar_now(), time.time()):
            if c["group"] == "state" and not c["ok"] and c["check"] not in self._logged:
                self._logged.add(c["check"])
                log.error("meshfed controller: %s: %s; what to do: %s", c["check"], c["cause"], c["hint"],
                          extra={"fields": {"event": "StateCheckFailed", "check": c["check"]}})

    def _revive_config_server(self) -> dict[str, Any]:
        """Ray restarted the config server actor (its __init__ ran again: a new epoch from the
        store, no CAs loaded, not listening). Give it the CAs of the applied revision (keys come
        back from the state directory), the same ports, and the reconciler's configs in full."""
        cs = dict(decode_json(ray.get(self.config_server.status.remote(), timeout=10)))
        if cs.get("port"):
            return cs  # revived by the other caller while we waited for the lock
        log.warning("the config server restarted (not listening): reviving it on ports %d/%d with the applied "
                    "revision's CAs and every config in full", self.port, self.bootstrap_port,
                    extra={"fields": {"event": "ConfigServerRevived"}})
        blob = ray.get(self.reconciler.snapshot_blob.remote(), timeout=30)
        if blob:
            ray.get(self.config_server.ensure_cas.remote(blob), timeout=30)
        host = self.opts.listen.rsplit(":", 1)[0]
        boot = f"{host}:{self.bootstrap_port}" if self.bootstrap_port else self.opts.bootstrap_listen
        ray.get(self.config_server.start.remote(f"{host}:{self.port}", self.reconciler, boot), timeout=30)
        ray.get(self.reconciler.resync.remote(), timeout=30)
        self.config_server_restarts += 1
        return dict(decode_json(ray.get(self.config_server.status.remote(), timeout=10)))

    def _ensure_agents(self, fleet_clusters: dict[str, Any]) -> None:
        wanted = agent_specs(fleet_clusters, self.kubeconfig, self.opts.watch_timeout_s, self.opts.in_cluster)
        changed = any(self.agent_specs.get(n) != s for n, s in wanted.items())
        nodes: list[str] = []
        departed: set[str] = set()
        # the node list is a GCS call: asked when agents are placed, else every NODE_CHECK_INTERVAL_S,
        # and a GCS that does not answer skips the check rather than the rest of the status refresh
        now = time.monotonic()
        if changed or now - self._nodes_checked_at >= NODE_CHECK_INTERVAL_S:
            try:
                nodes = alive_node_ids()
                self._nodes_checked_at = now
                departed = set(agents_on_departed_nodes(self.agent_nodes, nodes))
            except Exception as e:   # the GCS restarting: agents placed now are spread by Ray
                log.warning("the Ray node list is unavailable (%s): agents are not re-placed this round", e)
        for name, spec in wanted.items():
            if self.agent_specs.get(name) != spec or name in departed:
                old = self.agents.pop(name, None)
                if old is not None:
                    old.stop.remote()
                    ray.kill(old)
                why = ("starting its" if old is None else
                       "replacing its (its node left the Ray cluster)" if name in departed else
                       "replacing its (spec changed)")
                log.info("cluster %s: %s discovery agent (context %s)", name, why, spec.context)
                prefer = None if self.opts.placement.by_resource("agent") else agent_node(name, list(wanted), nodes)
                self.agents[name] = ClusterAgentActor.options(**self.opts.placement.options("agent", prefer)).remote(
                    *spec.args(), self.reconciler)
                self.agent_specs[name] = spec
                self.agent_nodes[name] = prefer
        for name in set(self.agents) - set(wanted):
            log.info("cluster %s left the fleet: stopping its discovery agent", name)
            a = self.agents.pop(name)
            self.agent_specs.pop(name, None)
            self.agent_nodes.pop(name, None)
            a.stop.remote()
            ray.kill(a)

    def lock_holder(self) -> LockHolder | None:
        return read_holder(self.state_dir)

    def placement(self) -> dict[str, dict[str, Any]]:
        """Role (or `agent/<cluster>`) -> the pid and node id of its actor, asked of each actor."""
        handles = {"config_server": self.config_server, "reconciler": self.reconciler, "git": self.git,
                   **{f"agent/{name}": a for name, a in self.agents.items()}}
        return {role: dict(ray.get(h.where.remote(), timeout=10)) for role, h in handles.items()}

    # -- StatusSource ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._cache_lock:
            if self._cache:
                return dict(self._cache)
        return self.refresh()

    def services(self) -> list[dict[str, Any]]:
        return list(decode_json(ray.get(self.reconciler.services.remote(), timeout=10)))

    def endpoints(self, service: str, from_cluster: str | None) -> dict[str, Any]:
        return dict(decode_json(ray.get(self.reconciler.endpoints.remote(service, from_cluster), timeout=10)))

    def failover_history(self, service: str | None, since_s: float | None) -> list[dict[str, Any]]:
        assert self._store is not None
        return [r.as_dict() for r in self._store.failover_history(service, since_s)]

    def trust(self) -> list[dict[str, Any]]:
        assert self._store is not None
        return self._store.ca_roots()

    def trust_view(self) -> dict[str, Any]:
        return dict(decode_json(ray.get(self.config_server.trust_view.remote(), timeout=10)))

    def explain(self, service: str, from_cluster: str, zone: str | None) -> dict[str, Any]:
        return dict(decode_json(ray.get(self.reconciler.explain.remote(service, from_cluster, zone), timeout=10)))

    def checks(self) -> list[dict[str, Any]]:
        return build_checks(self.status(), calendar_now(), time.time())

    def graph(self) -> dict[str, Any]:
        return dict(decode_json(ray.get(self.reconciler.graph.remote(), timeout=10)))

    def revisions(self, sha: str | None, limit: int) -> list[dict[str, Any]]:
        assert self._store is not None
        return revision_rows(self._store.revisions(limit, sha))

    # -- control -------------------------------------------------------------------------------------

    def trigger_git(self) -> None:
        ray.get(self.git.trigger.remote(), timeout=CALL_TIMEOUT_S)

    def trigger_to_ack(self, clear: bool = False) -> list[float]:
        return list(ray.get(self.config_server.trigger_to_ack.remote(clear), timeout=CALL_TIMEOUT_S))

    def stop(self) -> None:
        self._stop.set()
        if self.status_server is not None:
            self.status_server.stop()
        for a in self.agents.values():
            try:
                ray.get(a.stop.remote(), timeout=2)
            except Exception:
                pass
            ray.kill(a)
        ours = read_holder(self.state_dir)
        for h in (self.git, self.reconciler, self.config_server):
            ray.kill(h)
        self.agents.clear()
        # the state owner's process lets the lock go when it exits: wait for that, so that a
        # controller started next on this state directory finds it free
        deadline = time.monotonic() + RELEASE_WAIT_S
        while ours is not None and time.monotonic() < deadline:
            now_held = read_holder(self.state_dir)
            if now_held is None or now_held.pid != ours.pid:
                break
            time.sleep(0.05)


def run(opts: ControllerOptions) -> None:  # pragma: no cover - the CLI entry point
    import signal

    from federation.controller.api_token import STATUS_API_TOKEN_FILE

    # the status API's request log is `federation.server.status_api.access`, set up with every other
    # logger by `logsetup` (the command's --log-level/--log-format)
    ctl = Controller(opts).start()
    grpc_at = f"{opts.listen.rsplit(':', 1)[0]}:{ctl.port}"
    console_url = f"{ctl.status_server.url}/console/"
    token_file = str(Path(ctl.state_dir) / STATUS_API_TOKEN_FILE)
    log.info("meshfed controller: config gRPC on %s (bootstrap port %s), status on %s (web console %s; token: %s), "
             "state in %s (node %s)", grpc_at, ctl.bootstrap_port or "-", ctl.status_server.url, console_url,
             token_file, ctl.state_dir, ctl.state_node[:12],
             extra={"fields": {"event": "ControllerStarted", "grpc": grpc_at, "bootstrap_port": ctl.bootstrap_port,
                               "status_url": ctl.status_server.url, "console_url": console_url,
                               "token_file": token_file, "state_dir": ctl.state_dir}})
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    log.info("meshfed controller: stopping")
    ctl.stop()
