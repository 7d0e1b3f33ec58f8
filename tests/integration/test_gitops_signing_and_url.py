"""The fleet repo's signed-commit requirement on its accepting path, and the URL clone path.

Signing: a key is generated inside the test (SSH via `ssh-keygen`, and GnuPG with a throw-away
GNUPGHOME; each variant is skipped if its tool is missing). A commit signed by the configured key
is applied; an unsigned commit on top, and one signed by a key that is not configured, are
refused with an error saying so while the last good snapshot stays in force; a trusted commit
after them applies again.

URL: the test repository is served over Git smart HTTP by dulwich's WSGI app on a loopback port,
and `load_revision(url, ...)` and a `BranchFollower` on the URL (with a local mirror kept by
`sync_mirror`, and without one) see a pushed commit become the applied revision after a trigger.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

import gitops
from gitops.problems import RepoAccessError
from gitops.watch import BranchFollower, BranchWatch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fleet"
ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid", "GIT_CONFIG_NOSYSTEM": "1",
       "HOME": "/nonexistent"}

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git binary")


def run(*cmd: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(list(cmd), check=True, capture_output=True, text=True, env=env or ENV,
                          timeout=60).stdout.strip()


def git(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    return run("git", "-C", str(repo), *args, env=env)


def edit(repo: Path, file: str, old: str, new: str) -> None:
    p = repo / file
    text = p.read_text()
    assert old in text
    p.write_text(text.replace(old, new, 1))


def fleet_repo(root: Path) -> Path:
    r = root / "fleet"
    shutil.copytree(EXAMPLE, r)
    git(r, "init", "-q", "-b", "main")
    return r


# --- signing ------------------------------------------------------------------------------------

@dataclass
class Signer:
    """How to sign a commit with the trusted key or with a stranger's key, and what the follower
    is configured with (`gnupg_home` or `allowed_signers_file`)."""

    gnupg_home: str | None
    allowed_signers_file: str | None
    trusted: tuple[list[str], dict[str, str]]     # (git -c args, extra env) for the trusted key
    stranger: tuple[list[str], dict[str, str]]    # ... for a key the follower does not know
    stranger_key: str                             # how git names that key (%GK)
    cleanup: list[str] = field(default_factory=list)

    def commit(self, repo: Path, message: str, key: str | None) -> str:
        """Commit everything; `key` is "trusted", "stranger" or None (unsigned)."""
        git(repo, "add", "-A")
        if key is None:
            git(repo, "commit", "-q", "--no-gpg-sign", "-m", message)
        else:
            args, extra = self.trusted if key == "trusted" else self.stranger
            git(repo, *args, "commit", "-q", "-S", "-m", message, env={**ENV, **extra})
        return git(repo, "rev-parse", "HEAD")


def _ssh_signer(tmp: Path) -> Signer:
    for name in ("trusted", "stranger"):
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(tmp / name))
    allowed = tmp / "allowed_signers"
    allowed.write_text(f't@example.invalid namespaces="git" {(tmp / "trusted.pub").read_text().strip()}\n')

    def args(name: str) -> list[str]:
        return ["-c", "gpg.format=ssh", "-c", f"user.signingkey={tmp / name}"]

    stranger_fpr = run("ssh-keygen", "-l", "-f", str(tmp / "stranger.pub")).split()[1]
    return Signer(None, str(allowed), (args("trusted"), {}), (args("stranger"), {}),
                  stranger_fpr)


def _gpg_signer() -> Signer:
    homes: dict[str, str] = {}
    fingerprints: dict[str, str] = {}
    for name in ("trusted", "stranger"):
        # short path under /tmp: gpg-agent's socket path must fit in sun_path
        home = tempfile.mkdtemp(prefix="mfg-")
        homes[name] = home
        genv = {**ENV, "GNUPGHOME": home}
        run("gpg", "--batch", "--passphrase", "", "--quick-gen-key", f"{name} <t@example.invalid>",
            "ed25519", "sign", "never", env=genv)
        fprs = [line.split(":")[9] for line in run("gpg", "--list-keys", "--with-colons", env=genv).splitlines()
                if line.startswith("fpr:")]
        fingerprints[name] = fprs[0]

    def how(name: str) -> tuple[list[str], dict[str, str]]:
        return (["-c", "gpg.format=openpgp", "-c", f"user.signingkey={fingerprints[name]}"],
                {"GNUPGHOME": homes[name]})

    return Signer(homes["trusted"], None, how("trusted"), how("stranger"),
                  fingerprints["stranger"][-16:], cleanup=list(homes.values()))


@pytest.fixture(params=["ssh", "gpg"])
def signer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Signer]:
    if request.param == "ssh":
        if shutil.which("ssh-keygen") is None:
            pytest.skip("ssh-keygen not installed (openssh-client); SSH commit signing cannot be tested")
        keys = tmp_path / "keys"
        keys.mkdir()
        yield _ssh_signer(keys)
        return
    if shutil.which("gpg") is None:
        pytest.skip("gpg not installed (gnupg); OpenPGP commit signing cannot be tested")
    s = _gpg_signer()
    try:
        yield s
    finally:
        for home in s.cleanup:
            if shutil.which("gpgconf"):
                subprocess.run(["gpgconf", "--kill", "gpg-agent"], env={**ENV, "GNUPGHOME": home},
                               capture_output=True, timeout=30)
            shutil.rmtree(home, ignore_errors=True)


def test_follower_applies_signed_commits_and_refuses_unsigned_or_unknown_keys(
        tmp_path: Path, signer: Signer) -> None:
    repo = fleet_repo(tmp_path)
    first = signer.commit(repo, "initial fleet, signed", "trusted")
    f = BranchFollower(repo=str(repo), branch="main", watch=BranchWatch(require_signed=True),
                       gnupg_home=signer.gnupg_home, allowed_signers_file=signer.allowed_signers_file)
    good = f.poll(now=0)
    assert good is not None, f.watch.last_error
    assert good.revision.sha == first and f.watch.last_error is None

    # valid config, but unsigned: refused for the signature, the signed snapshot stays in force
    edit(repo, "services/shop/cart.yaml", "maxEjectionPercent: 50", "maxEjectionPercent: 75")
    unsigned = signer.commit(repo, "cart ejection, unsigned", None)
    assert gitops.validate_tree(str(repo), unsigned) == []
    assert f.poll(now=100) is None
    assert f.watch.last_attempted_revision is not None and f.watch.last_attempted_revision.sha == unsigned
    assert f.watch.last_error is not None
    assert f"commit {unsigned[:8]} is not signed by a trusted key: it has no signature" in f.watch.last_error
    assert "git commit -S" in f.watch.last_error
    assert f.watch.last_applied_revision == good.revision and f.snapshot is good

    # valid config, signed by a key the follower was not given: refused the same way
    edit(repo, "clusters/east.yaml", "env: demo", "env: prod")
    stranger = signer.commit(repo, "east to prod, stranger's key", "stranger")
    assert git(repo, "cat-file", "commit", stranger).count("gpgsig") == 1  # it really is signed
    assert f.poll(now=200) is None
    assert f.watch.last_attempted_revision is not None and f.watch.last_attempted_revision.sha == stranger
    assert f.watch.last_error is not None
    assert f"commit {stranger[:8]} is not signed by a trusted key" in f.watch.last_error
    assert f"signed by key {signer.stranger_key}, which is not among the configured keys" in f.watch.last_error
    assert str(signer.gnupg_home or signer.allowed_signers_file) in f.watch.last_error
    assert f.watch.last_applied_revision == good.revision and f.snapshot is good

    # the same signed head is not retried on the next poll, but a trusted commit on top applies
    assert f.poll(now=300) is None and f.watch.last_applied_revision == good.revision
    edit(repo, "clusters/east.yaml", "env: prod", "env: staging")
    resigned = signer.commit(repo, "east to staging, signed", "trusted")
    snap = f.poll(now=400)
    assert snap is not None, f.watch.last_error
    assert snap.revision.sha == resigned and f.watch.last_error is None
    assert snap.clusters["east"].labels.get("env") == "staging"
    assert snap.services.keys() == good.services.keys()


# --- URL (smart HTTP on loopback) ---------------------------------------------------------------

class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Served:
    repo: Path
    url: str
    server: WSGIServer
    stopped: bool = False

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    from dulwich.repo import Repo
    from dulwich.server import DictBackend
    from dulwich.web import make_wsgi_chain

    # never route the loopback clone through a proxy from the environment
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    repo = fleet_repo(tmp_path)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--no-gpg-sign", "-m", "initial fleet")
    dul = Repo(str(repo))
    app = make_wsgi_chain(DictBackend({"/fleet.git": dul}))
    server = make_server("127.0.0.1", 0, app, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    s = Served(repo, f"http://127.0.0.1:{server.server_port}/fleet.git", server)
    try:
        yield s
    finally:
        s.stop()
        thread.join(timeout=5)
        dul.close()


def test_load_revision_by_url(served: Served) -> None:
    head = git(served.repo, "rev-parse", "HEAD")
    snap = gitops.load_revision(served.url, "refs/heads/main")
    assert snap.revision.sha == head and snap.revision.subject == "initial fleet"
    assert set(snap.clusters) == set(gitops.load_worktree(served.repo).clusters)
    assert gitops.load_revision(served.url, head[:10]).revision.sha == head
    with pytest.raises(RepoAccessError, match="unknown revision"):
        gitops.load_revision(served.url, "no-such-ref")


@pytest.mark.parametrize("mirror", [True, False], ids=["mirror", "clone-per-call"])
def test_follower_on_url_applies_pushed_commit(served: Served, tmp_path: Path, mirror: bool) -> None:
    mirror_dir = str(tmp_path / "state" / "fleet.git") if mirror else None
    f = BranchFollower(repo=served.url, branch="main", mirror_dir=mirror_dir,
                       watch=BranchWatch(poll_interval_s=3600))
    first = f.poll(now=0)
    assert first is not None, f.watch.last_error
    assert first.revision.sha == git(served.repo, "rev-parse", "HEAD")
    if mirror_dir:
        assert os.path.isdir(mirror_dir)

    edit(served.repo, "clusters/east.yaml", "env: demo", "env: prod")
    git(served.repo, "commit", "-q", "-a", "--no-gpg-sign", "-m", "east to prod")
    pushed = git(served.repo, "rev-parse", "HEAD")
    # not due yet (hour-long poll interval): nothing happens until a trigger
    assert f.poll(now=1) is None and f.watch.last_applied_revision == first.revision
    f.watch.trigger()
    snap = f.poll(now=2)
    assert snap is not None, f.watch.last_error
    assert snap.revision.sha == pushed and snap.revision.subject == "east to prod"
    assert f.watch.last_applied_revision == snap.revision
    assert snap.clusters["east"].labels.get("env") == "prod"
    assert snap.clusters["west"] is first.clusters["west"]  # unchanged files were not re-parsed

    # the server goes away: the fetch fails with the URL in the error, the snapshot stays
    served.stop()
    f.watch.trigger()
    assert f.poll(now=3) is None
    assert f.watch.last_error is not None and served.url in f.watch.last_error
    assert f.watch.last_applied_revision == snap.revision and f.snapshot is snap
