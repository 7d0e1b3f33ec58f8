"""`meshfed trust`: the trust view (pure) and the command on a real fleet repo on disk."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from federation.cli.main import cli
from federation.controller.ca import CaStateDir, TrustDomainCA
from federation.core.trust_view import TrustMaterial, build_trust_view
from gitops.model import CaMode, CaRoot, CaSpec, TrustDomain, TrustDomainName
from tests.unit.identity.forge import NOW_S
from ztunnel.api.bundle import emit_bundle

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "fleet"


def _td(name: str, *peers: str, ca: CaSpec = CaSpec()) -> TrustDomain:
    return TrustDomain(TrustDomainName(name), tuple(TrustDomainName(p) for p in peers), ca)


def test_view_flags_one_way_federation_unknown_peer_and_expiring_root() -> None:
    tds = {"a.mesh": _td("a.mesh", "b.mesh", "ghost.mesh"), "b.mesh": _td("b.mesh")}
    soon = TrustDomainCA.create("a.mesh", now_s=NOW_S - 86400, root_ttl_s=86400 + 5 * 86400)
    view = build_trust_view(tds, {"a.mesh": TrustMaterial(soon.bundle(3), {"root-1": soon.roots[0].cert})}, NOW_S)
    a = view["trustDomains"][0]
    assert a["bundleSequence"] == 3 and a["roots"][0]["signing"] is True
    assert a["roots"][0]["fingerprint"].count(":") == 31
    assert view["trustDomains"][1]["trustedBy"] == ["b.mesh", "a.mesh"]
    text = "\n".join(view["problems"])
    assert "but b.mesh does not federate with a.mesh" in text and "add a.mesh to spec.federatesWith" in text
    assert "ghost.mesh, which is not a TrustDomain" in text
    assert "expires" in text and "staged rotation" in text
    assert {"from": "a.mesh", "to": "b.mesh", "mutual": False} in view["edges"]


def test_view_shows_published_and_unknown_roots() -> None:
    spec = CaSpec(CaMode.MANAGED, (CaRoot("root-1", True), CaRoot("root-2", False)))
    ca = TrustDomainCA.create("a.mesh", now_s=NOW_S - 100)
    view = build_trust_view({"a.mesh": _td("a.mesh", ca=spec)},
                            {"a.mesh": TrustMaterial(ca.bundle(1), {"root-1": ca.roots[0].cert})}, NOW_S)
    roots = view["trustDomains"][0]["roots"]
    assert [r["name"] for r in roots] == ["root-1", "root-2"] and roots[1]["fingerprint"] is None
    assert any("root-2 is in the repo but not in the CA state" in p for p in view["problems"])


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    if not (EXAMPLE / "federation.yaml").exists():
        pytest.skip("examples/fleet not present")
    repo = tmp_path / "fleet"
    shutil.copytree(EXAMPLE, repo)
    return repo


def test_command_on_example_fleet_with_state_dir(fleet: Path, tmp_path: Path) -> None:
    import gitops

    snap = gitops.load_worktree(fleet)
    state = CaStateDir(tmp_path / "state")
    for td in snap.trust_domains.values():
        ca = state.load_or_create(td)
        assert ca is not None
        state.publish_bundle(ca)
    res = CliRunner().invoke(cli, ["trust", str(fleet), "--state-dir", str(tmp_path / "state"), "-o", "json"])
    assert res.exit_code == 0, res.output
    view = json.loads(res.output)
    assert {d["name"] for d in view["trustDomains"]} == set(snap.trust_domains)
    for d in view["trustDomains"]:
        assert d["bundleSequence"] == 1 and d["roots"][0]["fingerprint"]
    table = CliRunner().invoke(cli, ["trust", str(fleet), "--state-dir", str(tmp_path / "state")])
    assert "SHA-256" in table.output and "TRUSTED BY" in table.output


def test_command_reads_external_bundle_from_repo(fleet: Path) -> None:
    import gitops

    snap = gitops.load_worktree(fleet)
    name = sorted(snap.trust_domains)[0]
    path = next((fleet / "trust").glob(f"{name}.yaml"))
    ca = TrustDomainCA.create(name, now_s=time.time() - 60)
    (fleet / "trust" / "bundles").mkdir(exist_ok=True)
    (fleet / "trust" / "bundles" / f"{name}.json").write_text(emit_bundle(ca.bundle(sequence=42)))
    text = path.read_text()
    start = text.index("  ca:")
    end = text.index("workloadCertTTL")
    path.write_text(text[:start] + f"  ca:\n    mode: External\n    bundleFile: trust/bundles/{name}.json\n    "
                    + text[end:])
    res = CliRunner().invoke(cli, ["trust", str(fleet), "-o", "json"])
    assert res.exit_code in (0, 1), res.output
    view = json.loads(res.output)
    ext = next(d for d in view["trustDomains"] if d["name"] == name)
    assert ext["caMode"] == "External" and ext["bundleSequence"] == 42
    assert ext["roots"][0]["fingerprint"] == ca.bundle().fingerprints()[0]


def test_command_on_missing_repo_exits_2(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["trust", str(tmp_path / "nope")])
    assert res.exit_code == 2
