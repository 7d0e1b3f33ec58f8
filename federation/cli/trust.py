"""`meshfed trust [PATH]`: trust domains, their bundles and who trusts whom — offline.

Reads the fleet repo at PATH (working tree) for the trust domains and their `federatesWith`
edges, the public bundle files of External CAs from the repo, and — with `--state-dir` — the
managed roots the controller keeps (only their certificates are read; private keys are never
opened). Shows per trust domain: CA mode, bundle sequence, each root's SHA-256 fingerprint,
not-after and signing flag, and the trust graph, flagging what would break mTLS: one-way
federation (mutual TLS needs both sides to accept each other), edges to unknown domains,
expired or soon-expiring roots, unreadable bundles.

The data is built by `build_trust_view(trust_domains, materials, now_s)` from plain inputs so the
controller-backed mode (`--controller URL`, added with the controller) can feed it the live CAs'
material instead of files; `render_trust_view` prints it. Exit codes: 0 nothing to report,
1 problems found, 2 could not read the repo, 64 usage.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
from cryptography import x509

import gitops
from federation.cli.ops import token_file_option
from federation.cli.output import EXIT_OK, EXIT_PROBLEMS, emit_data, fail, output_option, stdout, table
from federation.core.trust_view import TrustMaterial, build_trust_view
from gitops.model import CaMode, TrustDomain
from gitops.problems import FleetError, RepoAccessError
from ztunnel.api.bundle import BundleError, parse_bundle


def materials_from_files(repo: Path, trust_domains: Mapping[str, TrustDomain],
                         state_dir: Path | None) -> dict[str, TrustMaterial]:
    """Public material from the repo (External bundles) and the CA state directory (managed roots)."""
    out: dict[str, TrustMaterial] = {}
    for n, td in trust_domains.items():
        if td.ca.mode is CaMode.EXTERNAL:
            rel = td.ca.bundle_file or ""
            try:
                bundle = parse_bundle((repo / rel).read_bytes(), n)
                out[n] = TrustMaterial(bundle=bundle, source=f"repo:{rel}")
            except (OSError, BundleError) as e:
                out[n] = TrustMaterial(source=f"repo:{rel}", error=f"bundle {rel} unreadable: {e}")
        elif state_dir is not None:
            out[n] = _managed_material(state_dir, n)
        else:
            out[n] = TrustMaterial(source="controller (pass --state-dir to read the CA state)")
    return out


def _managed_material(state_dir: Path, td: str) -> TrustMaterial:
    d = state_dir / "ca" / td
    if not d.is_dir():
        return TrustMaterial(source=f"state:{d}", error=f"no CA state at {d} (the controller has not run yet?)")
    named: dict[str, x509.Certificate] = {}
    try:
        for p in sorted(d.glob("*.cert.pem")):  # certificates only: keys are never opened here
            named[p.name[: -len(".cert.pem")]] = x509.load_pem_x509_certificate(p.read_bytes())
        bundle_path = d / "bundle.json"
        bundle = parse_bundle(bundle_path.read_bytes(), td, allow_empty=True) if bundle_path.exists() else None
    except (OSError, ValueError) as e:
        return TrustMaterial(named_roots=named, source=f"state:{d}", error=f"CA state unreadable: {e}")
    return TrustMaterial(bundle=bundle, named_roots=named, source=f"state:{d}")


def render_trust_view(view: Mapping[str, Any], output: str) -> None:
    if output in ("json", "yaml"):
        emit_data(dict(view), output)
        return
    wide = output == "wide"
    out = stdout()
    rows = [[d["name"], d["caMode"], "-" if d["bundleSequence"] is None else d["bundleSequence"],
             len(d["roots"]), ", ".join(d["trusts"][1:]) or "-", ", ".join(d["trustedBy"][1:]) or "-"]
            for d in view["trustDomains"]]
    out.print(table(["TRUST DOMAIN", "CA", "SEQUENCE", "ROOTS", "TRUSTS", "TRUSTED BY"], rows))
    root_rows = []
    for d in view["trustDomains"]:
        for r in d["roots"]:
            fp = r["fingerprint"] or "(unknown)"
            root_rows.append([d["name"], r["name"] or "(bundle)", {True: "yes", False: "no", None: "-"}[r["signing"]],
                              fp if wide or fp == "(unknown)" else fp[:23] + "…", r["notAfter"] or "-"])
    out.print()
    out.print(table(["TRUST DOMAIN", "ROOT", "SIGNING", "SHA-256", "NOT AFTER"], root_rows))
    if view["problems"]:
        out.print()
        for p in view["problems"]:
            out.print(f"! {p}", markup=False)


@click.command("trust")
@click.argument("path", default=None, required=False, type=click.Path(file_okay=False))
@click.option("--state-dir", "state_dir", default=None, type=click.Path(file_okay=False),
              help="the controller's state directory, to show managed roots (certificates only)")
@click.option("--controller", default=None, envvar="MESHFED_CONTROLLER",
              help="read the live CAs from this controller's status API (or $MESHFED_CONTROLLER) when no PATH "
                   "is given")
@token_file_option
@output_option()
def trust_cmd(path: str | None, state_dir: str | None, controller: str | None, output: str) -> None:
    """Trust domains, bundle sequences and fingerprints, not-after dates, who trusts whom.

    Offline on the fleet repo at PATH (default "."), or live with --controller and no PATH."""
    if path is None and controller:
        from federation.cli.ops import fetch

        live = fetch(controller, "/api/v1/trust-view")
        render_trust_view(live, output)
        sys.exit(EXIT_PROBLEMS if live["problems"] else EXIT_OK)
    path = path or "."
    try:
        snapshot = gitops.load_worktree(path)
    except FleetError as e:
        fail(f"the fleet repo at {path} has errors: {e}", hint="run `meshfed validate` for the full list")
    except RepoAccessError as e:
        fail(str(e), hint="check the path")
    materials = materials_from_files(Path(path), snapshot.trust_domains,
                                     Path(state_dir) if state_dir else None)
    view = build_trust_view(snapshot.trust_domains, materials, time.time())
    render_trust_view(view, output)
    sys.exit(EXIT_PROBLEMS if view["problems"] else EXIT_OK)


def register(group: click.Group) -> None:
    group.add_command(trust_cmd)
