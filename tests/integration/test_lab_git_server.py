"""The lab's Git server on loopback (no sandbox needed): anonymous clone, pushes only with the
credentials the lab writes (HTTP basic auth, a 0600 file in git's credential-store format), the
push callback only for an accepted push."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from clusters.lab.gitserver import (
    GitServer,
    credential_helper_args,
    init_fleet_repo,
    new_credentials,
    write_credentials,
)

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git binary")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fleet"


def git(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t", GIT_ASKPASS="/bin/false")
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=60, check=False)


def test_pushes_need_the_credentials_clones_do_not(tmp_path: Path) -> None:
    bare = tmp_path / "git" / "fleet.git"
    init_fleet_repo(EXAMPLE, bare)
    pushes: list[dict[str, str]] = []
    creds = new_credentials()
    srv = GitServer(bare, "127.0.0.1", 0, on_push=lambda refs: pushes.append(dict(refs)), credentials=creds).start()
    cred_file = tmp_path / "git" / "credentials"
    write_credentials(cred_file, srv.url, creds)
    try:
        assert stat.S_IMODE(cred_file.stat().st_mode) == 0o600
        work = tmp_path / "w"
        assert git("clone", "-q", srv.url, str(work)).returncode == 0        # anonymous read
        (work / "NOTE.md").write_text("push test\n")
        assert git("add", "-A", cwd=work).returncode == 0
        assert git("commit", "-qm", "note", cwd=work).returncode == 0
        head = git("rev-parse", "HEAD", cwd=work).stdout.strip()

        anonymous = git("push", "-q", "origin", "HEAD", cwd=work)
        # challenged (401): git asks for a username it has no way to give
        assert anonymous.returncode != 0 and "could not read Username" in anonymous.stderr, anonymous.stderr
        other = tmp_path / "other-credentials"
        write_credentials(other, srv.url, ("lab", "not-the-password-at-all"))
        wrong = git(*credential_helper_args(other), "push", "-q", "origin", "HEAD", cwd=work)
        assert wrong.returncode != 0
        assert pushes == [] and srv.pushes == 0 and srv.refused_pushes >= 2

        ok = git(*credential_helper_args(cred_file), "push", "-q", "origin", "HEAD", cwd=work)
        assert ok.returncode == 0, ok.stderr
        assert pushes and head in pushes[-1].values() and srv.pushes == 1
    finally:
        srv.stop()


def test_a_git_server_without_credentials_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="credentials"):
        GitServer(tmp_path, "127.0.0.1", 0)
