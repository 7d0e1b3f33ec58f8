"""Operator commands against a running controller: `meshfed controller run`, `status`, `clusters`,
`services`, `endpoints`, `failover history`, `check`.

Every read command fetches the controller's status API (`--controller URL`, or
$MESHFED_CONTROLLER, default http://127.0.0.1:15014) and prints the same JSON objects with
`-o json|yaml`, or a table. A controller whose status API listens on a non-loopback address
wants its bearer token: `--token-file <state-dir>/status-api-token` (or
$MESHFED_CONTROLLER_TOKEN_FILE); the file is read only when given. Exit codes: 0 ok; 1 the answer contains problems (a failed revision,
proxies not synced, a failing check); 2 the controller could not be reached; 64 usage.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import click

from federation.cli.completion import complete_clusters, complete_services
from federation.cli.output import EXIT_OK, EXIT_PROBLEMS, emit_data, fail, output_option, stdout, table

DEFAULT_CONTROLLER = "http://127.0.0.1:15014"
ENV_CONTROLLER = "MESHFED_CONTROLLER"
ENV_TOKEN_FILE = "MESHFED_CONTROLLER_TOKEN_FILE"
_TOKEN_FILE_KEY = "meshfed.token_file"


def _remember_token_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value:
        ctx.meta[_TOKEN_FILE_KEY] = value
    return value


def token_file_option(f: Any) -> Any:
    """`--token-file` for commands that talk to the controller; `fetch` sends the token it holds."""
    return click.option("--token-file", envvar=ENV_TOKEN_FILE, default=None, expose_value=False,
                        callback=_remember_token_file, type=click.Path(dir_okay=False),
                        help=f"the controller's status API token (<state-dir>/status-api-token, or "
                             f"${ENV_TOKEN_FILE}): needed when its status API is not on loopback")(f)


def controller_option(f: Any) -> Any:
    return token_file_option(click.option(
        "--controller", "controller", envvar=ENV_CONTROLLER, default=DEFAULT_CONTROLLER,
        show_default=True, help=f"status API of the controller (or ${ENV_CONTROLLER})")(f))


def _auth_headers() -> dict[str, str]:
    ctx = click.get_current_context(silent=True)
    path = ctx.meta.get(_TOKEN_FILE_KEY) if ctx is not None else None
    if not path:
        return {}
    from federation.controller.api_token import ApiTokenError, read_api_token

    try:
        return {"Authorization": f"Bearer {read_api_token(path)}"}
    except (ApiTokenError, OSError) as e:
        fail(f"cannot read the controller's token: {e}", hint="--token-file <controller state-dir>/status-api-token",
             code=64)


def fetch(controller: str, path: str, **params: Any) -> Any:
    q = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    url = controller.rstrip("/") + path + (f"?{q}" if q else "")
    req = urllib.request.Request(url, headers=_auth_headers())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code == 401:
            fail(f"the controller at {controller} wants its token: {e.read()[:200].decode('utf-8', 'replace')}",
                 hint=f"pass --token-file <controller state-dir>/status-api-token or set ${ENV_TOKEN_FILE}")
        fail(f"controller answered {e.code} for {path}: {e.read()[:200]!r}")
    except (urllib.error.URLError, OSError) as e:
        fail(f"cannot reach the controller at {controller}: {getattr(e, 'reason', e)}",
             hint=f"is `meshfed controller run` running? pass --controller URL or set ${ENV_CONTROLLER}")


def git_policy(require_signed: bool, allowed_signers: str | None, gnupg_home: str | None,
               allow_force_push: bool) -> Any:
    """`controller run`'s Git flags as a `GitPolicy`; a usage error (64) names what is missing."""
    from pathlib import Path

    from federation.controller.sources import GitPolicy

    if (allowed_signers or gnupg_home) and not require_signed:
        fail("--allowed-signers/--gnupg-home name the keys of --require-signed-commits: add that flag", code=64)
    for path, what in ((allowed_signers, "--allowed-signers file"), (gnupg_home, "--gnupg-home directory")):
        if path and not Path(path).exists():
            fail(f"{what} {path} does not exist", code=64)
    try:
        return GitPolicy(require_signed=require_signed, allow_force_push=allow_force_push,
                         gnupg_home=str(Path(gnupg_home).resolve()) if gnupg_home else None,
                         allowed_signers_file=str(Path(allowed_signers).resolve()) if allowed_signers else None)
    except ValueError as e:
        fail(str(e), code=64)


def parse_duration_s(text: str) -> float:
    """`90s`, `15m`, `2h`, `1d`, `1h30m` -> seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise click.BadParameter(f"{text!r} is not a duration; use e.g. 90s, 15m, 2h, 1d")
    return sum(float(n) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[u] for n, u in parts)


def _short(sha: str | None) -> str:
    return (sha or "")[:8]


def _age(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0.0, time.time() - float(ts))
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.0f}h"


def is_loopback_listen(listen: str) -> bool:
    """`host:port` names a loopback address literally (no name resolution: `localhost.evil.com` is not)."""
    import ipaddress

    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def register(group: click.Group) -> None:
    @group.group("controller")
    def controller() -> None:
        """Run the federation controller."""

    @controller.command("run")
    @click.option("--repo", required=True, help="fleet repo: a path or a Git URL")
    @click.option("--branch", default="main", show_default=True)
    @click.option("--state-dir", default=".meshfed", show_default=True, help="sqlite records and CA keys (0600)")
    @click.option("--listen", default="127.0.0.1:15010", show_default=True, help="gRPC config/CA/health")
    @click.option("--status-listen", default="127.0.0.1:15014", show_default=True, help="status API and /metrics")
    @click.option("--status-reads-need-token", "status_reads_need_token", is_flag=True,
                  help="the status API wants its token for reads on loopback too (beyond loopback it always "
                       "does): for a machine other users share; the console takes it as /console/#token=...")
    @click.option("--status-allowed-host", "status_allowed_hosts", multiple=True, metavar="NAME[:PORT]",
                  help="a name the status API answers to in Host, besides localhost and its listen address "
                       "(repeatable; e.g. the Service name behind which it runs); other names get 421")
    @click.option("--bootstrap-listen", default=None,
                  help="certificate service for proxies' first certificate (bootstrap credential, no client "
                       "certificate); default: the --listen host, any free port (shown in status)")
    @click.option("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    @click.option("--kubeconfig", default=None, help="kubeconfig for the clusters' contexts (default $KUBECONFIG)")
    @click.option("--in-cluster", "in_cluster", default=None, metavar="CLUSTER",
                  help="running in a pod of this fleet cluster: reach it through the pod's service account "
                       "(the others through --kubeconfig contexts)")
    @click.option("--insecure", is_flag=True, help="plaintext gRPC trusting proxy ids: loopback tests only")
    @click.option("--git-poll-interval", "git_poll_s", type=float, default=None,
                  help="seconds; default: the Federation's gitPollInterval")
    @click.option("--require-signed-commits", is_flag=True,
                  help="apply only branch heads signed by a trusted key (--allowed-signers and/or --gnupg-home)")
    @click.option("--allowed-signers", "allowed_signers", default=None, type=click.Path(dir_okay=False),
                  help="SSH allowed-signers file of the trusted keys (gpg.ssh.allowedSignersFile format)")
    @click.option("--gnupg-home", "gnupg_home", default=None, type=click.Path(file_okay=False),
                  help="GnuPG home holding the trusted OpenPGP keys")
    @click.option("--allow-force-push", is_flag=True,
                  help="accept a head that does not descend from the applied revision (history rewritten)")
    @click.option("--standby", is_flag=True,
                  help="if another controller holds --state-dir, wait and take over when it exits (default: refuse)")
    @click.option("--history-retention", "retention", default=None, metavar="DURATION",
                  help="keep revisions and failover events this long (e.g. 30d); default: the Federation's "
                       "historyRetention (30d)")
    def run(repo: str, branch: str, state_dir: str, listen: str, status_listen: str, bootstrap_listen: str | None,
            ray_address: str | None, kubeconfig: str | None, in_cluster: str | None, insecure: bool,
            git_poll_s: float | None, require_signed_commits: bool, allowed_signers: str | None,
            gnupg_home: str | None, allow_force_push: bool, standby: bool, retention: str | None,
            status_reads_need_token: bool, status_allowed_hosts: tuple[str, ...]) -> None:
        """Follow the fleet repo, watch every cluster, push config to every proxy."""
        from federation.server.status_api import admitted_host_names

        try:
            admitted_host_names(status_listen.rpartition(":")[0], status_allowed_hosts)
        except ValueError as e:
            fail(f"--status-allowed-host: {e}", code=64)
        if insecure and not is_loopback_listen(listen):
            fail("--insecure serves plaintext gRPC: only on a loopback --listen address (127.0.0.0/8 or [::1])",
                 code=64)
        retention_s = parse_duration_s(retention) if retention else None
        if retention_s is not None and retention_s < 3600:
            fail(f"--history-retention {retention} is less than an hour: the controller needs its recent "
                 "revisions and active failovers", hint="e.g. --history-retention 7d", code=64)
        from federation.controller.statelock import StateDirLocked
        from federation.ray.driver import ControllerOptions
        from federation.ray.driver import run as run_controller

        try:
            run_controller(ControllerOptions(repo=repo, branch=branch, state_dir=state_dir, listen=listen,
                                             status_listen=status_listen, bootstrap_listen=bootstrap_listen,
                                             ray_address=ray_address, kubeconfig=kubeconfig, in_cluster=in_cluster,
                                             insecure=insecure,
                                             git_poll_interval_s=git_poll_s, standby=standby,
                                             history_retention_s=retention_s,
                                             status_reads_need_token=status_reads_need_token,
                                             status_allowed_hosts=status_allowed_hosts,
                                             git_policy=git_policy(require_signed_commits, allowed_signers,
                                                                   gnupg_home, allow_force_push)))
        except StateDirLocked as e:
            fail(str(e))

    @controller.command("backup")
    @click.option("--state-dir", default=".meshfed", show_default=True, help="the controller's state directory")
    @click.option("--out", "out", default=None, metavar="FILE",
                  help="archive to write (0600); default: meshfed-backup-<time>.tar.gz in the current directory")
    @output_option(formats=("table", "json", "yaml"))
    def backup(state_dir: str, out: str | None, output: str) -> None:
        """Archive the CA keys, the store and the credentials of a state directory (works while the
        controller runs). Keep it safe: it holds the CA private keys."""
        from federation.controller.backup import BackupError, create_backup

        path = out or time.strftime("meshfed-backup-%Y%m%d-%H%M%S.tar.gz")
        try:
            summary = create_backup(state_dir, path)
        except (BackupError, OSError) as e:
            fail(str(e))
        if output in ("json", "yaml"):
            emit_data(summary.as_dict(), output)
            return
        click.echo(f"wrote {summary.path} (0600): {summary.files} files, {summary.bytes} bytes, trust domains "
                   f"{', '.join(summary.trust_domains) or '-'}, epoch {summary.epoch}")
        click.echo("it holds the CA private keys: store it like them; restore with "
                   f"`meshfed controller restore --state-dir DIR {summary.path}`")

    @controller.command("restore")
    @click.argument("archive", type=click.Path(exists=True, dir_okay=False))
    @click.option("--state-dir", default=".meshfed", show_default=True, help="the state directory to restore into")
    @click.option("--force", is_flag=True,
                  help="replace a non-empty state directory (it is kept next to it as <dir>.replaced-<time>)")
    @output_option(formats=("table", "json", "yaml"))
    def restore(archive: str, state_dir: str, force: bool, output: str) -> None:
        """Restore a state directory from `meshfed controller backup` (refuses one a controller uses)."""
        from federation.controller.backup import BackupError, restore_backup

        try:
            done = restore_backup(archive, state_dir, force=force)
        except (BackupError, OSError) as e:
            fail(str(e))
        if output in ("json", "yaml"):
            emit_data(done, output)
            return
        click.echo(f"restored {done['files']} files into {done['state_dir']} (trust domains "
                   f"{', '.join(done['trust_domains']) or '-'}; backup taken "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(done['backup_created_at_s']))})")
        if done["moved_aside"]:
            click.echo(f"the previous contents are in {done['moved_aside']}")
        click.echo("start the controller on it: its proxies re-sync with the same CA roots and credentials")

    @controller.command("bootstrap-token")
    @click.option("--state-dir", default=".meshfed", show_default=True, help="the controller's state directory")
    @click.option("--proxy-id", required=True, help="ztunnel/<cluster>/<node>, gateway/<cluster>, "
                  "waypoint/<cluster>/<ns>/<name> or ingress/<cluster>/<ns>/<name>")
    @click.option("--ttl", "ttl", default="1h", show_default=True,
                  help="how long the token may wait for its first use (e.g. 30m, 2h; at most 168h)")
    def bootstrap_token(state_dir: str, proxy_id: str, ttl: str) -> None:
        """Print a new bootstrap token for one hand-provisioned proxy (replacing an unused one).

        Like `kubeadm token create`: give the token to the proxy (its --bootstrap-token-file, 0600).
        It buys that proxy's own identity only, once: the first certificate uses it up, and it
        expires after --ttl if unused. Proxies on Kubernetes (and in the lab) need none: they
        bootstrap with their pod's ServiceAccount token."""
        from federation.controller.bootstrap import BootstrapTokenError, BootstrapTokens
        from gitops.schema import parse_duration_s

        try:
            ttl_s = parse_duration_s(ttl)
        except ValueError as e:
            fail(f"--ttl {ttl!r}: {e}", "e.g. --ttl 30m or --ttl 2h", code=64)
        try:
            click.echo(BootstrapTokens(state_dir).create(proxy_id, ttl_s))
        except ValueError as e:
            fail(str(e), "e.g. --proxy-id ztunnel/east/node-1 --ttl 1h", code=64)
        except (BootstrapTokenError, OSError) as e:
            fail(str(e))

    @group.command("status")
    @controller_option
    @output_option()
    def status(controller: str, output: str) -> None:
        """Desired and applied revision, clusters, per-proxy sync, active failovers, problems."""
        st = fetch(controller, "/api/v1/status")
        problems = bool(st.get("problems")) or any(p.get("sync") != "SYNCED" for p in st.get("proxies", []))
        if output in ("json", "yaml"):
            emit_data(st, output)
            raise SystemExit(EXIT_PROBLEMS if problems else EXIT_OK)
        out = stdout()
        d, a = st.get("desired") or {}, st.get("applied") or {}
        out.print(f"desired revision: {_short(d.get('revision'))} {d.get('subject', '')}"
                  f"{'' if d.get('ok', True) else '  (FAILED)'}", markup=False)
        out.print(f"applied revision: {_short(a.get('revision'))} {a.get('subject', '')}", markup=False)
        ctl = st.get("controller") or {}
        lock = ctl.get("lock") or {}
        out.print(f"controller epoch: {ctl.get('epoch')}"
                  + (f" (state directory locked by pid {lock.get('pid')} on {lock.get('host')})" if lock else ""),
                  markup=False)
        applying = st.get("applying") or {}
        if applying:
            out.print(f"applying revision: {_short(applying.get('revision'))} {applying.get('subject', '')} "
                      f"(pending: {', '.join(applying.get('pending') or []) or '-'}; NACKed: "
                      f"{', '.join(applying.get('nacked') or []) or '-'})", markup=False)
        for d in st.get("draining") or []:
            out.print(f"draining cluster: {d['cluster']} (removed by {_short(d.get('revision'))}; "
                      f"{'withdrawn' if d.get('withdrawn_at_s') is not None else 'withdrawing'})", markup=False)
        rows = [(n, "up" if c.get("up") else "DOWN", _short(c.get("applied_revision")), c.get("endpoints", 0),
                 f"{c.get('lease_remaining_s', 0)}s") for n, c in sorted((st.get("clusters") or {}).items())]
        out.print(table(["CLUSTER", "LEASE", "APPLIED", "ENDPOINTS", "LEASE LEFT"], rows))
        width = None if output == "wide" else 60
        prow = [(p["proxy"], p["sync"], _short(p.get("acked_revision")), p.get("acked_version", ""),
                 str(p.get("last_nack") or p.get("last_failure") or "")[:width]) for p in st.get("proxies", [])]
        out.print(table(["PROXY", "SYNC", "REVISION", "VERSION", "LAST NACK / FAILURE"], prow))
        active = st.get("active_failovers") or []
        if active:
            out.print(table(["ACTIVE FAILOVER", "FROM", "TO", "SINCE", "TRIGGER", "POLICY", "COMMIT"], [
                (f["service"], f["from_cluster"], f["to_cluster"],
                 time.strftime("%H:%M:%S", time.localtime(f["at_s"])), f["trigger"], f["policy_file"],
                 _short(f["revision"])) for f in active]))
        else:
            out.print("active failovers: none", markup=False)
        if st.get("unhealthy_endpoints"):
            out.print("globally ejected: " + ", ".join(st["unhealthy_endpoints"]), markup=False)
        for p in st.get("problems", []):
            out.print(f"[{p.get('code')}] {p.get('file', '')}:{p.get('line', '')} {p.get('message')}", markup=False)
            if p.get("hint"):
                out.print(f"  hint: {p['hint']}", markup=False)
        raise SystemExit(EXIT_PROBLEMS if problems else EXIT_OK)

    @group.command("clusters")
    @controller_option
    @output_option()
    def clusters(controller: str, output: str) -> None:
        """Clusters: API, lease, discovered endpoints."""
        data = fetch(controller, "/api/v1/clusters")
        if output in ("json", "yaml"):
            emit_data(data, output)
        else:
            cols = ["CLUSTER", "UP", "API", "CONTEXT", "NODES", "SERVICES", "ENDPOINTS", "READY", "LEASE LEFT"]
            rows: list[tuple[Any, ...]] = [
                (n, "yes" if c.get("up") else "NO", c.get("api"), c.get("context"), c.get("nodes"), c.get("services"),
                 c.get("endpoints"), c.get("ready_endpoints"), f"{c.get('lease_remaining_s')}s")
                for n, c in sorted(data.items())]
            if output == "wide":
                cols.append("LAST ERROR")
                rows = [(*r, data[r[0]].get("last_error") or "") for r in rows]
            stdout().print(table(cols, rows))
        raise SystemExit(EXIT_PROBLEMS if any(not c.get("up") for c in data.values()) else EXIT_OK)

    @group.command("services")
    @controller_option
    @output_option()
    def services(controller: str, output: str) -> None:
        """Global services and their endpoints per cluster."""
        data = fetch(controller, "/api/v1/services")
        if output in ("json", "yaml"):
            emit_data(data, output)
            return
        rows = [(s["service"], s["hostname"], ",".join(s["export_from"]),
                 " ".join(f"{c}={v['ready']}/{v['endpoints']}" for c, v in sorted(s["clusters"].items())),
                 s.get("policy_source", "")) for s in data]
        stdout().print(table(["SERVICE", "HOSTNAME", "EXPORTED FROM", "READY/ENDPOINTS", "POLICY"], rows))

    @group.command("endpoints")
    @click.argument("service", shell_complete=complete_services)
    @click.option("--from", "from_cluster", default=None, help="as seen by proxies in this cluster",
                  shell_complete=complete_clusters)
    @controller_option
    @output_option()
    def endpoints(service: str, from_cluster: str | None, controller: str, output: str) -> None:
        """A service's endpoints (tier, weight, health) as a cluster's proxies see them."""
        data = fetch(controller, "/api/v1/endpoints", service=service, **{"from": from_cluster})
        if "error" in data:
            fail(data["error"], hint="`meshfed services` lists the services; `meshfed clusters` the clusters",
                 code=EXIT_PROBLEMS)
        if output in ("json", "yaml"):
            emit_data(data, output)
            return
        stdout().print(f"{data['service']} from {data['from']} (as {data['viewer']}, revision "
                       f"{_short(data['revision'])})", markup=False)
        rows = [(e["workload"], e["cluster"], e["tier"], e["weight"], "yes" if e["healthy"] else "NO", e["via"])
                for e in data["endpoints"]]
        stdout().print(table(["WORKLOAD", "CLUSTER", "TIER", "WEIGHT", "HEALTHY", "VIA"], rows))

    @group.group("failover")
    def failover() -> None:
        """Failover events recorded by the controller."""

    @failover.command("history")
    @click.argument("service", required=False, shell_complete=complete_services)
    @click.option("--since", "since", default=None, help="only events newer than this (e.g. 15m, 2h, 1d)")
    @controller_option
    @output_option()
    def history(service: str | None, since: str | None, controller: str, output: str) -> None:
        """Each event with its trigger, the policy file and the commit that set it."""
        since_s = time.time() - parse_duration_s(since) if since else None
        data = fetch(controller, "/api/v1/failover-history", service=service, since_s=since_s)
        if output in ("json", "yaml"):
            emit_data(data, output)
            return
        rows = [(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at_s"])), e["service"], e["kind"],
                 e["from_cluster"], e["to_cluster"], e["trigger"], e["policy_file"], _short(e["revision"]))
                for e in data]
        stdout().print(table(["TIME", "SERVICE", "EVENT", "FROM", "TO", "TRIGGER", "POLICY", "COMMIT"], rows))

    @group.command("check")
    @controller_option
    @click.option("--pre", is_flag=True, help="before anything exists: what this machine lacks for --provider")
    @click.option("--provider", type=click.Choice(["kind"]), default="kind", show_default=True,
                  help="--pre: the provider to check for")
    @click.option("--fleet", default=None, type=click.Path(file_okay=False),
                  help="--pre: also check this fleet (contexts, subnets free on this machine)")
    @output_option()
    def check(controller: str, pre: bool, provider: str, fleet: str | None, output: str) -> None:
        """Grouped pass/fail checks; each failure with a cause and a hint (--pre: this machine, for kind)."""
        if pre:
            _preflight(fleet, output)
        data = fetch(controller, "/api/v1/check")
        failed = [c for c in data if not c["ok"]]
        if output in ("json", "yaml"):
            emit_data(data, output)
        else:
            out = stdout()
            group_name = None
            for c in data:
                if c["group"] != group_name:
                    group_name = c["group"]
                    out.print(f"{group_name}:", markup=False)
                out.print(f"  {'PASS' if c['ok'] else 'FAIL'}  {c['check']}", markup=False)
                if not c["ok"]:
                    out.print(f"        cause: {c['cause']}", markup=False)
                    out.print(f"        hint:  {c['hint']}", markup=False)
            out.print(f"{len(data) - len(failed)} passed, {len(failed)} failed", markup=False)
        raise SystemExit(EXIT_PROBLEMS if failed else EXIT_OK)


def _preflight(fleet: str | None, output: str) -> None:
    """`meshfed check --pre --provider kind`: exit 0 when kind can run here, 1 with the fixes otherwise."""
    from clusters.kind import preflight
    from federation.cli.kind import load_fleet

    checks = preflight.evaluate(preflight.probe(), load_fleet(fleet) if fleet else None)
    bad = preflight.failed(checks)
    if output in ("json", "yaml"):
        emit_data([c.as_dict() for c in checks], output)
    else:
        click.echo("kind preflight (nothing is created):")
        click.echo(preflight.report(checks))
        click.echo(f"{len(checks) - len(bad)} passed, {len(bad)} failed")
    raise SystemExit(EXIT_PROBLEMS if bad else EXIT_OK)
