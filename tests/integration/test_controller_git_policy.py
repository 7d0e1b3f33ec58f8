"""`meshfed controller run --require-signed-commits --allowed-signers F` and `--allow-force-push`,
through the CLI path: the command line is parsed by the real `controller run` command, and the
options it hands the driver drive the same Git feed the controller's Git actor runs
(`GitFeed.following(..., policy)`) and the CA loading at start (`snapshot_for_cas`). SSH keys are
generated inside the test (`ssh-keygen`); skipped without it."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from federation.cli.main import cli
from federation.controller.git_feed import GitFeed, snapshot_for_cas
from federation.ray.driver import ControllerOptions
from gitops.model import ConfigSnapshot
from tests.integration.test_gitops_signing_and_url import Signer, _ssh_signer, edit, fleet_repo, git

pytestmark = pytest.mark.skipif(shutil.which("git") is None or shutil.which("ssh-keygen") is None,
                                reason="needs git and ssh-keygen")


class NoRecords:
    def last_applied(self) -> Any:
        return None

    def applied_ca_specs(self) -> dict[str, Any] | None:
        return None

    def leaf_not_after(self, trust_domain: str) -> dict[str, float]:
        return {}


class Sink:
    def __init__(self) -> None:
        self.snapshots: list[ConfigSnapshot] = []
        self.errors: list[tuple[str, str]] = []

    def on_snapshot(self, snap: ConfigSnapshot) -> None:
        self.snapshots.append(snap)

    def on_fallback_snapshot(self, snap: ConfigSnapshot) -> None:
        self.snapshots.append(snap)

    def on_fleet_error(self, sha: str, subject: str, problems: Sequence[dict[str, Any]]) -> None:
        self.errors.append((sha, " ".join(str(p.get("message", "")) for p in problems)))


def options_from_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, ControllerOptions | None]:
    """Run `meshfed controller run ARGS` up to the point where it starts the driver."""
    got: list[ControllerOptions] = []
    monkeypatch.setattr("federation.ray.driver.run", got.append)
    res = CliRunner().invoke(cli, ["controller", "run", *args])
    return res.exit_code, res.output, (got[0] if got else None)


def feed_for(opts: ControllerOptions, sink: Sink) -> GitFeed:
    return GitFeed.following(opts.repo, opts.branch, NoRecords(), sink, poll_interval_s=3600,
                             policy=opts.git_policy)


def test_require_signed_commits_from_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    signer: Signer = _ssh_signer(keys)
    repo = fleet_repo(tmp_path)
    signed = signer.commit(repo, "initial fleet, signed", "trusted")
    code, out, opts = options_from_cli(monkeypatch, "--repo", str(repo), "--state-dir", str(tmp_path / "state"),
                                       "--require-signed-commits", "--allowed-signers",
                                       str(signer.allowed_signers_file))
    assert code == 0 and opts is not None, out
    assert opts.git_policy.require_signed and opts.git_policy.allowed_signers_file == signer.allowed_signers_file
    sink = Sink()
    feed = feed_for(opts, sink)
    feed.poll_once()
    assert [s.revision.sha for s in sink.snapshots] == [signed] and sink.errors == []

    edit(repo, "services/shop/cart.yaml", "maxEjectionPercent: 50", "maxEjectionPercent: 75")
    unsigned = signer.commit(repo, "cart ejection, unsigned", None)
    feed.trigger()
    feed.poll_once()
    assert len(sink.snapshots) == 1                                  # not applied
    assert sink.errors and sink.errors[-1][0] == unsigned and "not signed by a trusted key" in sink.errors[-1][1]
    assert feed.status()["require_signed_commits"] is True
    # a restarting controller does not load its CAs from the unsigned head either
    assert snapshot_for_cas(opts.repo, opts.branch, NoRecords(), 0.0, opts.git_policy) is None

    # without the flag the same head is applied: the flag is what refuses it
    code, out, plain = options_from_cli(monkeypatch, "--repo", str(repo), "--state-dir", str(tmp_path / "s2"))
    assert code == 0 and plain is not None and not plain.git_policy.require_signed
    sink2 = Sink()
    feed_for(plain, sink2).poll_once()
    assert [s.revision.sha for s in sink2.snapshots] == [unsigned]


def test_force_pushes_are_refused_unless_allowed_from_the_command_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = fleet_repo(tmp_path)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "initial fleet")
    first = git(repo, "rev-parse", "HEAD")
    edit(repo, "clusters/east.yaml", "env: demo", "env: prod")
    git(repo, "commit", "-q", "-am", "east to prod")
    second = git(repo, "rev-parse", "HEAD")
    results = {}
    for allow in (False, True):
        code, out, opts = options_from_cli(monkeypatch, "--repo", str(repo), "--state-dir",
                                           str(tmp_path / f"state-{allow}"), *(["--allow-force-push"] if allow else []))
        assert code == 0 and opts is not None, out
        sink = Sink()
        feed = feed_for(opts, sink)
        git(repo, "reset", "-q", "--hard", second)
        feed.poll_once()
        assert [s.revision.sha for s in sink.snapshots] == [second]
        # history rewritten: back to the first commit and a different change on top of it
        git(repo, "reset", "-q", "--hard", first)
        edit(repo, "clusters/east.yaml", "env: demo", "env: staging")
        git(repo, "commit", "-q", "-am", "east to staging (rewritten)")
        rewritten = git(repo, "rev-parse", "HEAD")
        feed.trigger()
        feed.poll_once()
        results[allow] = (sink.snapshots[-1].revision.sha, sink.errors)
        if allow:
            assert sink.snapshots[-1].revision.sha == rewritten and sink.errors == []
        else:
            assert sink.snapshots[-1].revision.sha == second
            assert sink.errors and "history was rewritten" in sink.errors[-1][1]
    assert results[False][0] != results[True][0]


@pytest.mark.parametrize(("args", "message"), [
    (["--require-signed-commits"], "no trusted keys are named"),
    (["--allowed-signers", "/etc/hostname"], "add that flag"),
    (["--require-signed-commits", "--allowed-signers", "/nonexistent/allowed"], "does not exist"),
])
def test_incomplete_signing_flags_are_usage_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   args: list[str], message: str) -> None:
    code, out, opts = options_from_cli(monkeypatch, "--repo", str(tmp_path), *args)
    assert code == 64 and opts is None and message in out, out
