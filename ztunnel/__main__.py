"""Run a ztunnel (node mode), an east-west gateway, a waypoint or an ingress gateway standalone.

    python -m ztunnel --config proxy.json --cert-dir certs/ --state-dir /var/lib/meshfed/ztunnel \\
        --hbone 0.0.0.0:15008 --socks 127.0.0.1:15080 --admin 127.0.0.1:15021

- The mode (node, gateway, waypoint, ingress) comes from the config. `--config` is optional when `--state-dir` holds a
  persisted last good config: a restart with the controller (or the file) absent serves from it.
- `--cert-dir` holds one SVID per local identity: `<td>_ns_<ns>_sa_<sa>.crt.pem` (chain) and
  `.key.pem` (0600).
- `--capture` (node mode): the proxy programs the node's capture rules itself and keeps them equal
  to its enrolled pods (`ztunnel.proxy.capture_rules`): the lab's nodes and the kind DaemonSet run
  the same code.
- SIGTERM/SIGINT: drain (stop accepting, GOAWAY, let connections finish until `--drain-timeout-s`,
  then close). SIGHUP: reload `--config`.
- Health and outcome reports go to an injectable sink (`HealthSink`); standalone it is the log.
  The controller client replaces it.
- Logging (`ztunnel.api.logsetup`, the same set-up as `meshfed`): `--log-level` (default info:
  config applied, controller connected/lost, certificates, ejections), `--log-format text|json`,
  or $MESHFED_LOG_LEVEL / $MESHFED_LOG_FORMAT. Connections and ejections go to the access log
  (`--access-log stderr`, the default: JSON lines whatever the level); with `off`, connections are
  logged at debug (logger `ztunnel.access`) and ejections at info.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ztunnel.allocator import release_free_heap_periodically, release_startup_heap, tune_allocator
from ztunnel.api import logsetup
from ztunnel.api.config import ProxyMode, proxy_config_to_dict
from ztunnel.api.identity import ProxyId
from ztunnel.proxy.admin import AdminServer, Telemetry
from ztunnel.proxy.base import MAX_SETUPS_IN_FLIGHT, Credentials, HealthSink, ProxyBase, ProxyOptions
from ztunnel.proxy.gateway import GatewayProxy
from ztunnel.proxy.node import NodeProxy
from ztunnel.xds.state import ApplyResult, ProxyState, load_config_file, parse_host_port

if TYPE_CHECKING:  # controller mode only: gRPC/protobuf cost ~5 MB RSS, standalone proxies skip them
    from ztunnel.dns.answer import DnsTable  # with --dns only: dnspython costs ~1.5 MB RSS
    from ztunnel.dns.server import DnsServer
    from ztunnel.proxy.capture_rules import CaptureSync
    from ztunnel.xds.controlplane import ControllerLink

DNS_UNANSWERED = ("servfail", "nxdomain")  # ztunnel.dns.answer.Unanswered (pinned by a unit test)
DNS_TTL_S = 30                             # ztunnel.dns.answer.DEFAULT_TTL_S (pinned by a unit test)

log = logging.getLogger(__name__)
emit = logsetup.event_log(log)   # the proxy's own events: `<kind>: k=v ...` (fields in JSON)


def cert_file_names(identity: str) -> tuple[str, str]:
    slug = identity.removeprefix("spiffe://").replace("/", "_")
    return f"{slug}.crt.pem", f"{slug}.key.pem"


def load_cert_dir(cert_dir: Path, identities: tuple[str, ...]) -> dict[str, tuple[bytes, bytes]]:
    out: dict[str, tuple[bytes, bytes]] = {}
    for identity in identities:
        crt, key = cert_file_names(identity)
        if (cert_dir / crt).exists() and (cert_dir / key).exists():
            mode = (cert_dir / key).stat().st_mode & 0o077
            if mode:
                raise SystemExit(f"{cert_dir / key} is readable by group/others (mode {oct(mode)}); chmod 600 it")
            out[identity] = ((cert_dir / crt).read_bytes(), (cert_dir / key).read_bytes())
    return out


def _proxy_id(s: str) -> str:
    """--proxy-id, checked by the one parser of proxy ids (so a typo fails here, not at the controller)."""
    if not s:
        return s   # the default: not in controller mode
    try:
        return str(ProxyId.parse(s))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ztunnel", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, help="ProxyConfig file (JSON or YAML)")
    p.add_argument("--cert-dir", type=Path, required=True)
    p.add_argument("--state-dir", type=Path, help="where the last good config is persisted")
    p.add_argument("--hbone", default="0.0.0.0:15008")
    p.add_argument("--socks", default="127.0.0.1:15080", help="SOCKS5 outbound listener ('' disables)")
    p.add_argument("--transparent", default="", help="outbound capture listener for iptables REDIRECT")
    p.add_argument("--capture", action="store_true",
                   help="node mode: program the capture rules in this network namespace (iptables nat: this "
                        "node's enrolled pods -> --transparent) and keep them in line with the config's "
                        "workloads (ztunnel.proxy.capture_rules); needs CAP_NET_ADMIN")
    p.add_argument("--admin", default="127.0.0.1:15021")
    p.add_argument("--drain-timeout-s", type=float, default=10.0)
    p.add_argument("--handshake-timeout-s", type=float, default=5.0)
    p.add_argument("--max-setups-in-flight", type=int, default=MAX_SETUPS_IN_FLIGHT, metavar="N",
                   help="connection setups in flight (per peer and in total) past which new ones are shed at "
                        "once with an explicit overload refusal (default %(default)s)")
    p.add_argument("--shed-at-loop-lag-ms", type=float, default=0.0, metavar="MS",
                   help="shed new connection setups while the event loop runs this late: saturation, measured "
                        "(default 0: off)")
    p.add_argument("--no-tls-resumption", dest="tls_resumption", action="store_false",
                   help="full TLS handshake for every inner end-to-end session (no session tickets)")
    p.add_argument("--access-log", choices=("stderr", "off"), default="stderr",
                   help="one JSON line per connection (and per ejection) on stderr, Envoy's access log; off: "
                        "connections go to the log at --log-level debug")
    p.add_argument("--ready-file", type=Path, help="created once the proxy serves, removed when it drains "
                   "(what a pod's readiness probe reads where the admin port is out of reach)")
    env_level = os.environ.get(logsetup.ENV_LEVEL, "").lower()
    env_format = os.environ.get(logsetup.ENV_FORMAT, "").lower()
    p.add_argument("--log-level", choices=logsetup.LEVELS, type=str.lower,
                   default=env_level if env_level in logsetup.LEVELS else "info",
                   help=f"default info, or ${logsetup.ENV_LEVEL}")
    p.add_argument("--event-loop", choices=EVENT_LOOPS, default="auto",
                   help="uvloop (libuv: fewer syscalls and cheaper callbacks per hop), asyncio (the standard "
                        "library's), or auto: uvloop when it is installed (default)")
    p.add_argument("--allocator", choices=("tuned", "default"), default="tuned",
                   help="tuned (default): glibc's mmap and trim thresholds raised for the bulk path's buffers, "
                        "free heap pages returned every 30 s (ztunnel.allocator); default: glibc's own behaviour. "
                        "Thresholds an operator set in MALLOC_*_THRESHOLD_ or GLIBC_TUNABLES are kept either way")
    p.add_argument("--log-format", choices=logsetup.FORMATS, type=str.lower,
                   default=env_format if env_format in logsetup.FORMATS else "text",
                   help=f"text or json (one object per line); default text, or ${logsetup.ENV_FORMAT}")
    d = p.add_argument_group("DNS for global names (node mode; pods' udp/tcp 53 redirected here by iptables)")
    d.add_argument("--dns", default="", help="HOST:PORT of the DNS responder, e.g. the pod bridge address :15053 "
                   "('' disables)")
    d.add_argument("--dns-upstream", action="append", metavar="IP[:PORT]|resolv.conf|none",
                   help="where names the mesh does not know are forwarded (repeatable; default: the nameservers "
                        "of /etc/resolv.conf)")
    d.add_argument("--dns-unanswered", choices=DNS_UNANSWERED, default=DNS_UNANSWERED[0],
                   help="the answer for a name the mesh does not know when there is no upstream")
    d.add_argument("--dns-ttl-s", type=int, default=DNS_TTL_S, help="TTL of the answers for global names")
    d.add_argument("--dns-allow-from", action="append", metavar="CIDR", default=[],
                   help="a network whose clients the responder answers besides the node's captured pods and "
                        "loopback (repeatable; e.g. the cluster's pod CIDR); anyone else gets no answer")
    c = p.add_argument_group("controller mode (config, certificates and health through the controller)")
    c.add_argument("--controller", default="", help="HOST:PORT of the controller's gRPC services")
    c.add_argument("--bootstrap", default="", help="HOST:PORT of the controller's bootstrap port (first certificate)")
    c.add_argument("--proxy-id", default="", type=_proxy_id, help="ztunnel/<cluster>/<node>, gateway/<cluster>, "
                   "waypoint/<cluster>/<ns>/<name> or ingress/<cluster>/<ns>/<name>")
    c.add_argument("--trust-domain", default="", help="trust domain of this proxy's cluster")
    c.add_argument("--sa-token-file", type=Path,
                   help="the pod's projected ServiceAccount token (audience meshfed-controller), re-read at every "
                        "bootstrap: how a proxy on Kubernetes gets its first certificate")
    c.add_argument("--bootstrap-token-file", type=Path,
                   help="a single-use token for this proxy id (`meshfed controller bootstrap-token`), for proxies "
                        "provisioned by hand")
    c.add_argument("--controller-roots", type=Path,
                   help="PEM roots of this proxy's trust domain, to verify the controller with until it sends "
                        "newer ones (the controller writes roots/<trust-domain>.pem in its state directory)")
    return p


# Modes whose proxy parses HTTP (`ztunnel.proxy.waypoint`).
L7_MODES = frozenset({ProxyMode.WAYPOINT, ProxyMode.INGRESS})


def proxy_class(mode: ProxyMode) -> type[ProxyBase]:
    """The proxy that runs `mode`. The L7 stack (HTTP/1.1 and HTTP/2 parsers, routes, the inference
    picker) is imported by waypoints and ingress gateways only: node proxies and east-west gateways
    never parse HTTP, and those imports cost every one of them ~2.7 MB of RSS (measured)."""
    if mode in L7_MODES:
        from ztunnel.proxy.waypoint import L7Proxy
        return L7Proxy
    return GatewayProxy if mode is ProxyMode.GATEWAY else NodeProxy


async def run(args: argparse.Namespace, health: HealthSink | None = None) -> int:
    if args.ready_file is not None:
        args.ready_file.unlink(missing_ok=True)  # a previous run's: not ready until this one serves
    state = ProxyState(args.state_dir / "last-good-config.json" if args.state_dir else None)
    source = "file"
    if args.config is not None and args.config.exists():
        result = state.apply_dict(load_config_file(args.config))
    else:
        result = state.load_persisted()  # type: ignore[assignment]
        source = "persisted"
    link: ControllerLink | None = None
    link_tasks: list[asyncio.Task[Any]] = []
    link_creds = Credentials({})
    if args.controller:
        link, link_tasks = await _join(args, state, link_creds)
        result, source = ApplyResult(True, "from the controller"), "controller"
    if result is None or state.config is None:
        why = result.reason if result is not None else "no --config and nothing persisted"
        log.error("no usable config (%s); pass --config FILE", why)
        return 2
    cfg = state.config
    telemetry = Telemetry(cfg.proxy_id, sys.stderr if args.access_log == "stderr" else None)
    emit(kind="config", source=source, applied=result.applied, reason=result.reason,
         rejected=[str(e) for e in result.rejected])
    try:
        node = ProxyId.parse(cfg.proxy_id).node
    except ValueError as e:
        print(f"ztunnel: the config's proxy_id is not a proxy id: {e}", file=sys.stderr)
        return 2
    identities = cfg.local_identities or tuple(sorted({w.identity for w in cfg.workloads if w.node == node}))
    creds = link_creds if link is not None else Credentials(load_cert_dir(args.cert_dir, identities))
    if link is not None:
        link.health.counter = telemetry.outcomes
        health = health or link.health
    if not creds.identities:
        log.error("no certificate in %s for any of %s", args.cert_dir, ", ".join(identities) or "no identities")
        return 2
    hb_host, hb_port = parse_host_port(args.hbone)
    socks_host, socks_port = parse_host_port(args.socks) if args.socks else (None, 0)
    tr_host, tr_port = parse_host_port(args.transparent) if args.transparent else (None, 0)
    opts = ProxyOptions(hbone_host=hb_host, hbone_port=hb_port, socks_host=socks_host, socks_port=socks_port,
                        transparent_host=tr_host, transparent_port=tr_port,
                        handshake_timeout_s=args.handshake_timeout_s, drain_timeout_s=args.drain_timeout_s,
                        max_setups_in_flight=args.max_setups_in_flight, tls_resumption=args.tls_resumption,
                        shed_at_loop_lag_ms=args.shed_at_loop_lag_ms)
    proxy = proxy_class(cfg.mode)(state, creds, opts, telemetry, health)
    if link is not None:
        link.sink.target = proxy
    await proxy.start()  # type: ignore[attr-defined]
    dns_server = await _start_dns(args, state, telemetry) if cfg.mode is ProxyMode.NODE and args.dns else None
    if args.dns and dns_server is None:
        emit(kind="dns", ignored=f"--dns {args.dns}: a gateway serves no DNS (node proxies answer their pods)")
    # Capture last: its REDIRECT rules send pods' TCP and DNS to listeners that must already be bound,
    # else a pod's first lookups and connections meet a closed port while the proxy starts.
    capture = _start_capture(args, cfg.mode, proxy, telemetry) if args.capture else None
    admin_host, admin_port = parse_host_port(args.admin)
    admin = AdminServer(admin_host, admin_port, telemetry=telemetry,
                        ready=lambda: (proxy.ready.is_set(), "ready" if proxy.ready.is_set() else "not ready"),
                        config_dump=lambda: {
                            "config": proxy_config_to_dict(state.config) if state.config else None,
                            "rejected": [str(e) for e in state.last_rejected],
                            "ejected": {s: sorted(proxy.ejected(s)) for s in proxy.detectors},
                            "sessions": {"pooled": proxy.pool.count(), "inbound": len(proxy.inbound_sessions)},
                            **({"l7": proxy.status()} if cfg.mode in L7_MODES else {}),  # type: ignore[attr-defined]
                            "capture": capture.as_dict() if capture is not None else None,
                            **({"dns": {"port": dns_server.port, "upstreams": [f"{h}:{p}" for h, p in
                                                                               dns_server.options.upstreams],
                                        "stats": dict(dns_server.stats)}} if dns_server is not None else {}),
                        })
    await admin.start()
    if args.ready_file is not None:
        args.ready_file.parent.mkdir(parents=True, exist_ok=True)
        args.ready_file.write_text(f"{os.getpid()}\n")
    release_startup_heap()
    trimming = asyncio.ensure_future(release_free_heap_periodically()) if args.allocator == "tuned" else None
    emit(kind="listening", proxy=cfg.proxy_id, hbone=f"{hb_host}:{proxy.opts.hbone_port}",
         socks=f"{socks_host}:{proxy.opts.socks_port}" if socks_host else "",
         admin=f"{admin_host}:{admin.port}", pid=os.getpid())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def reload() -> None:
        if args.config is not None and args.config.exists():
            r = state.apply_dict(load_config_file(args.config))
            proxy.on_config_applied()
            emit(kind="config", source="file", applied=r.applied, reason=r.reason,
                 rejected=[str(e) for e in r.rejected])

    loop.add_signal_handler(signal.SIGHUP, reload)
    await stop.wait()
    emit(kind="draining", timeout_s=args.drain_timeout_s)
    if args.ready_file is not None:
        args.ready_file.unlink(missing_ok=True)
    for t in link_tasks:
        t.cancel()
    if trimming is not None:
        trimming.cancel()
    if link is not None:
        await link.close()
    if dns_server is not None:
        await dns_server.close()
    await proxy.drain(args.drain_timeout_s)
    if capture is not None:
        capture.stop()  # the rules stay: captured pods are refused until a proxy serves them again
    await admin.close()
    emit(kind="stopped")
    return 0


async def _start_dns(args: argparse.Namespace, state: ProxyState, telemetry: Telemetry) -> DnsServer:
    """The DNS responder for global names, answering from whatever config `state` holds now."""
    from ztunnel.dns.answer import Unanswered
    from ztunnel.dns.clients import DnsClients, parse_networks
    from ztunnel.dns.server import DnsConfigError, DnsOptions, DnsServer, upstreams_from_flags

    try:
        opts = DnsOptions(upstreams=upstreams_from_flags(args.dns_upstream), unanswered=Unanswered(args.dns_unanswered),
                          ttl_s=args.dns_ttl_s, allow_from=DnsClients(parse_networks(args.dns_allow_from)))
        host, port = parse_host_port(args.dns)
    except (DnsConfigError, ValueError) as e:
        raise SystemExit(f"ztunnel: --dns: {e}") from None
    server = DnsServer(table_of(state), opts, count=telemetry.dns_query, enrolled=enrolled_of(state))
    await server.start(host, port)
    emit(kind="dns", listening=f"{host}:{server.port}", upstreams=[f"{h}:{p}" for h, p in opts.upstreams],
         unanswered=opts.unanswered.value, allow_from=[str(n) for n in opts.allow_from.allowed])
    return server


def enrolled_of(state: ProxyState) -> Callable[[], frozenset[str]]:
    """The captured pods of the config `state` holds (the DNS responder's clients): the same set the
    capture rules redirect (`capture_rules.enrolled_addresses`), recomputed only when the config
    object changes."""
    from ztunnel.proxy.capture_rules import enrolled_addresses

    built: list[Any] = [None, frozenset()]

    def current() -> frozenset[str]:
        cfg = state.config
        if cfg is not built[0]:
            built[:] = [cfg, enrolled_addresses(cfg) if cfg is not None else frozenset()]
        return built[1]  # type: ignore[no-any-return]
    return current


def table_of(state: ProxyState) -> Callable[[], DnsTable]:
    """The DNS table of the config `state` holds: looked at again only when that config object
    changes, and the same table object while the names and VIPs are the same (most deltas move
    endpoints only), so the DNS reply cache survives them."""
    from ztunnel.dns.answer import EMPTY_TABLE, DnsTable

    built: list[Any] = [None, EMPTY_TABLE]

    def current() -> DnsTable:
        cfg = state.config
        if cfg is not built[0]:
            table = DnsTable.from_services(cfg.services) if cfg is not None else EMPTY_TABLE
            built[:] = [cfg, built[1] if table == built[1] else table]
        return built[1]  # type: ignore[no-any-return]
    return current


async def _join(args: argparse.Namespace, state: ProxyState,
                creds: Credentials) -> tuple[ControllerLink, list[asyncio.Task[Any]]]:
    """Controller mode: bootstrap, subscribe, wait for a config and its certificates (ztunnel.xds.controlplane)."""
    from ztunnel.xds.controlplane import LinkOptions, join_controller
    if not (args.proxy_id and args.trust_domain and args.controller_roots and args.bootstrap):
        raise SystemExit("--controller needs --bootstrap, --proxy-id, --trust-domain and --controller-roots")
    if not (args.sa_token_file or args.bootstrap_token_file):
        raise SystemExit("--controller needs a bootstrap credential: --sa-token-file (the pod's projected "
                         "ServiceAccount token) or --bootstrap-token-file (`meshfed controller bootstrap-token`)")
    # keys and certificates survive a restart in the state directory (see ztunnel.xds.controlplane)
    credentials = args.state_dir / "credentials.json" if args.state_dir else None
    opts = LinkOptions(args.controller, args.bootstrap, args.proxy_id, args.trust_domain, args.bootstrap_token_file,
                       args.controller_roots, sa_token_file=args.sa_token_file, credentials_file=credentials)
    return await join_controller(opts, state, creds)


def _start_capture(args: argparse.Namespace, mode: ProxyMode, proxy: ProxyBase, telemetry: Telemetry) -> CaptureSync:
    """--capture: install the chains, then let every applied config set which pods are captured."""
    from ztunnel.proxy.capture_rules import CaptureError, CaptureSync, IptablesCapture, enrolled_addresses

    if mode is not ProxyMode.NODE or not args.transparent:
        raise SystemExit("--capture is for node proxies with a --transparent listener (the REDIRECT target)")
    dns_port = parse_host_port(args.dns)[1] if args.dns else None  # pods' DNS to our responder
    capture = IptablesCapture(parse_host_port(args.transparent)[1], dns_port=dns_port)
    try:
        capture.install()
    except CaptureError as e:
        raise SystemExit(f"ztunnel: {e}") from None
    sync = CaptureSync(capture)
    proxy.add_config_listener(lambda cfg: sync.update(enrolled_addresses(cfg)))
    return sync


EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def resolve_event_loop(choice: str) -> str:
    """The loop `--event-loop choice` runs: auto is uvloop when it is installed, else asyncio's
    (the benchmarks ask this too, to say which loop their proxies ran)."""
    if choice != "auto":
        return choice
    import importlib.util

    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logsetup.configure(args.log_level, args.log_format)
    # before the first buffer of the bulk path
    log.info("allocator: %s", tune_allocator(os.environ) if args.allocator == "tuned"
             else "glibc's own behaviour (--allocator default)")
    if resolve_event_loop(args.event_loop) == "uvloop":
        try:
            import uvloop  # type: ignore[import-not-found,unused-ignore]  # a dependency; optional for auto
        except ImportError:
            if args.event_loop == "uvloop":
                raise SystemExit("--event-loop uvloop: uvloop is not installed in this Python "
                                 "(pip install uvloop, or --event-loop asyncio)") from None
        else:
            return uvloop.run(run(args))  # type: ignore[no-any-return]
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
