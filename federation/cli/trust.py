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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from cryptography import x509

import gitops
from federation.cli.output import EXIT_OK, EXIT_PROBLEMS, emit_data, fail, output_option, stdout, table
from gitops.model import CaMode, TrustDomain
from gitops.problems import FleetError, RepoAccessError
from ztunnel.api.bundle import BundleError, SpiffeBundle, fingerprint_sha256, parse_bundle

EXPIRY_WARNING_S = 30 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class TrustMaterial:
    """What is known about one trust domain's public keys, wherever it came from."""

    bundle: SpiffeBundle | None = None
    named_roots: Mapping[str, x509.Certificate] = field(default_factory=dict)  # root name -> certificate
    source: str = ""   # "repo:trust/x.bundle.json", "state:/var/lib/meshfed/ca/x", "controller:URL"
    error: str = ""    # why the material could not be read


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _root_row(name: str | None, signing: bool | None, cert: x509.Certificate | None, now_s: float,
              problems: list[str], td: str) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "signing": signing, "fingerprint": None, "notAfter": None,
                           "expiresIn_s": None, "subject": None}
    if cert is not None:
        na = cert.not_valid_after_utc.timestamp()
        row.update(fingerprint=fingerprint_sha256(cert), notAfter=_iso(na), expiresIn_s=round(na - now_s),
                   subject=cert.subject.rfc4514_string())
        label = name or row["subject"]
        if na <= now_s:
            problems.append(f"{td}: root {label} expired at {_iso(na)}; rotate it (publish, switch, retire)")
        elif na - now_s < EXPIRY_WARNING_S:
            problems.append(f"{td}: root {label} expires {_iso(na)} (in {(na - now_s) / 86400:.0f} days); "
                            "start a staged rotation now")
    return row


def build_trust_view(trust_domains: Mapping[str, TrustDomain], materials: Mapping[str, TrustMaterial],
                     now_s: float) -> dict[str, Any]:
    """Plain data (JSON-able) describing the trust graph; `problems` lists what would break mTLS."""
    problems: list[str] = []
    names = sorted(trust_domains)
    trusted_by: dict[str, list[str]] = {n: [] for n in names}
    for n in names:
        for peer in trust_domains[n].federates_with:
            if peer in trusted_by:
                trusted_by[peer].append(n)
    domains: list[dict[str, Any]] = []
    edges: list[dict[str, Any]] = []
    for n in names:
        td = trust_domains[n]
        mat = materials.get(n, TrustMaterial())
        roots: list[dict[str, Any]] = []
        fps_named: set[str] = set()
        if td.ca.mode is CaMode.MANAGED:
            for spec_root in td.ca.roots:
                cert = mat.named_roots.get(spec_root.name)
                roots.append(_root_row(spec_root.name, spec_root.signing, cert, now_s, problems, n))
                if cert is not None:
                    fps_named.add(fingerprint_sha256(cert))
                elif mat.named_roots:
                    problems.append(f"{n}: root {spec_root.name} is in the repo but not in the CA state yet "
                                    "(the controller creates it on its next reconcile)")
        if mat.bundle is not None:
            for cert in mat.bundle.authorities:
                if fingerprint_sha256(cert) not in fps_named:
                    roots.append(_root_row(None, None, cert, now_s, problems, n))
        if mat.error:
            problems.append(f"{n}: {mat.error}")
        for peer in td.federates_with:
            mutual = peer in trust_domains and n in trust_domains[peer].federates_with
            edges.append({"from": n, "to": peer, "mutual": mutual})
            if peer not in trust_domains:
                problems.append(f"{n} federates with {peer}, which is not a TrustDomain in this repo")
            elif not mutual:
                problems.append(
                    f"{n} trusts {peer} but {peer} does not trust {n}: mutual TLS between them fails in both "
                    f"directions; add {n} to federatesWith of {peer} (or remove the edge)")
        domains.append({
            "name": n,
            "caMode": td.ca.mode.value,
            "workloadCertTTL_s": td.ca.workload_cert_ttl_s,
            "bundleSequence": mat.bundle.sequence if mat.bundle is not None else None,
            "bundleRefreshHint_s": mat.bundle.refresh_hint_s if mat.bundle is not None else None,
            "bundleSource": mat.source or None,
            "roots": roots,
            "trusts": [n, *td.federates_with],
            "trustedBy": [n, *sorted(trusted_by[n])],
        })
    return {"trustDomains": domains, "edges": edges, "problems": problems}


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
