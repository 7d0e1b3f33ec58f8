"""The fleet repo through real Git: revisions, changed files, `meshfed plan`/`validate` as a
subprocess, and the branch follower keeping the last good snapshot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gitops
from gitops.model import ServiceKey
from gitops.watch import BranchFollower, BranchWatch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fleet"
MESHFED = [sys.executable, "-m", "federation.cli.main"]
ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid", "GIT_CONFIG_NOSYSTEM": "1",
       "HOME": "/nonexistent"}

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git binary")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=ENV).stdout.strip()


def commit(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def edit(repo: Path, file: str, old: str, new: str) -> None:
    p = repo / file
    text = p.read_text()
    assert old in text
    p.write_text(text.replace(old, new, 1))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "fleet"
    shutil.copytree(EXAMPLE, r)
    git(r, "init", "-q", "-b", "main")
    commit(r, "initial fleet")
    return r


def meshfed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MESHFED, *args], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])


def test_plan_shows_the_diff_between_two_commits(repo: Path) -> None:
    first = git(repo, "rev-parse", "HEAD")
    edit(repo, "policies/shop/checkout-canary.yaml", "weight: 90", "weight: 75")
    edit(repo, "policies/shop/checkout-canary.yaml", "weight: 10", "weight: 25")
    (repo / "policies/shop/checkout-allow-frontend.yaml").unlink()
    second = commit(repo, "canary to 25%")

    snap = gitops.load_revision(str(repo), second)
    assert snap.revision.sha == second and snap.revision.subject == "canary to 25%"
    assert gitops.changed_files(str(repo), first, second) == [
        "policies/shop/checkout-allow-frontend.yaml", "policies/shop/checkout-canary.yaml"]

    out = meshfed("plan", str(repo), "--from", first, "--to", second)
    assert out.returncode == 1, out.stderr
    assert "HTTPRoute shop/checkout-canary" in out.stdout
    assert "backends[0].weight" in out.stdout and "75" in out.stdout
    assert "AuthorizationPolicy shop/checkout-allow-frontend" in out.stdout
    assert "0 to add, 1 to change, 1 to remove" in out.stdout

    js = meshfed("plan", str(repo), "--from", first, "--to", second, "-o", "json")
    data = json.loads(js.stdout)
    assert data["to"]["sha"] == second
    assert {(c["action"], c["name"]) for c in data["changes"]} == {
        ("changed", "checkout-canary"), ("removed", "checkout-allow-frontend")}

    same = meshfed("plan", str(repo), "--from", second, "--to", "HEAD")
    assert same.returncode == 0 and "no changes" in same.stdout


def test_plan_and_validate_errors_exit_2_or_1(repo: Path) -> None:
    bad_rev = meshfed("plan", str(repo), "--from", "HEAD", "--to", "no-such-ref")
    assert bad_rev.returncode == 2 and "unknown revision" in bad_rev.stderr
    edit(repo, "policies/shop/checkout.yaml", "maxEjectionPercent: 100", "maxEjectionPercent: 10")
    bad = commit(repo, "too small")
    v = meshfed("validate", str(repo), "--revision", bad)
    assert v.returncode == 1
    assert "Error [MF0505] (DestinationRule shop/checkout) policies/shop/checkout.yaml:14:7" in v.stdout
    p = meshfed("plan", str(repo), "--from", "HEAD~1", "--to", bad)
    assert p.returncode == 2 and "MF0505" in p.stdout
    usage = meshfed("plan", str(repo))
    assert usage.returncode == 64


def test_load_revision_reuses_unchanged_files(repo: Path) -> None:
    first = gitops.load_revision(str(repo))
    edit(repo, "services/shop/cart.yaml", "maxEjectionPercent: 50", "maxEjectionPercent: 75")
    commit(repo, "cart ejection")
    result = gitops.load(str(repo), "HEAD", previous=first)
    assert result.snapshot is not None and result.reparsed == ("services/shop/cart.yaml",)
    assert result.snapshot.clusters["east"] is first.clusters["east"]


def test_git_symlink_out_of_repo_is_refused(repo: Path) -> None:
    os.symlink("/etc/hostname", repo / "clusters" / "evil.yaml")
    commit(repo, "symlink out")
    probs = gitops.validate_tree(str(repo), "HEAD")
    assert [(p.code, p.pos.file) for p in probs] == [("MF0006", "clusters/evil.yaml")]


def test_follower_keeps_last_good_and_refuses_rewrites(repo: Path) -> None:
    f = BranchFollower(repo=str(repo), branch="main", watch=BranchWatch(poll_interval_s=1))
    good = f.poll(now=0)
    assert good is not None and f.watch.last_applied_revision == good.revision
    # a bad commit: rejected, the good snapshot stays in force
    edit(repo, "services/shop/checkout.yaml", "    - south\n", "    - sooth\n")
    bad = commit(repo, "typo in exportFrom")
    assert f.poll(now=100) is None
    assert f.watch.last_applied_revision == good.revision
    assert f.watch.last_attempted_revision is not None and f.watch.last_attempted_revision.sha == bad
    assert f.watch.last_error and "MF0202" in f.watch.last_error
    assert f.snapshot is good
    # the fix applies
    edit(repo, "services/shop/checkout.yaml", "    - sooth\n", "    - south\n")
    fixed = commit(repo, "fix typo")
    snap = f.poll(now=200)
    assert snap is not None and snap.revision.sha == fixed
    assert ServiceKey("shop", "checkout") in snap.services
    # history rewritten (reset to the first commit + a new one): refused unless allowed
    git(repo, "reset", "-q", "--hard", good.revision.sha)
    edit(repo, "clusters/east.yaml", "env: demo", "env: prod")
    rewritten = commit(repo, "rewritten")
    assert f.poll(now=300) is None
    assert f.watch.last_error and "history was rewritten" in f.watch.last_error
    assert f.watch.last_applied_revision is not None and f.watch.last_applied_revision.sha == fixed
    f.watch.allow_non_fast_forward = True
    f.watch.trigger()
    snap = f.poll(now=301)
    assert snap is not None and snap.revision.sha == rewritten


def test_follower_requires_signed_commits(repo: Path) -> None:
    f = BranchFollower(repo=str(repo), branch="main", watch=BranchWatch(require_signed=True))
    assert f.poll(now=0) is None
    assert f.watch.last_applied_revision is None
    assert f.watch.last_error and "not signed" in f.watch.last_error
