"""The one doorway to Git (the only module that imports `git`).

GitPython keeps `git cat-file` helper processes and caches per `Repo` and is documented to leak in
long-running processes, so every function here opens the repository, does one job and closes it
(`with _repo(...)`); nothing returns a GitPython object. Callers get plain data: `TreeRead`,
`Revision`, lists of paths, booleans.

A repository is given as a local path (work tree or bare) or a URL. URLs are cloned (bare) into
a temporary directory for the duration of the call; a long-running follower should keep a local
mirror with `sync_mirror` instead and read from that.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

import git

from gitops import model as m
from gitops.codes import problem
from gitops.loader import LAYOUT_DIRS, RawFile, TreeRead, is_fleet_path
from gitops.problems import RepoAccessError, SourcePos

_MODE_SYMLINK = 0o120000
_MODE_SUBMODULE = 0o160000
_MAX_BLOB_BYTES = 4 * 1024 * 1024
GIT_TIMEOUT_S = 120


def _is_url(repo: str) -> bool:
    return "://" in repo or (repo.startswith("git@") and ":" in repo)


@contextmanager
def _repo(repo: str | os.PathLike[str]) -> Iterator[Any]:
    """Open a local repository, or clone a URL into a temporary bare repository; always close."""
    src = os.fspath(repo)
    tmp: str | None = None
    r: Any = None
    try:
        if _is_url(src):
            tmp = tempfile.mkdtemp(prefix="meshfed-clone-")
            try:
                r = git.Repo.clone_from(src, tmp, bare=True, kill_after_timeout=GIT_TIMEOUT_S)
            except git.GitCommandError as e:
                raise RepoAccessError(f"cannot clone {src}: {_git_err(e)}") from e
        else:
            try:
                r = git.Repo(src)
            except git.NoSuchPathError as e:
                raise RepoAccessError(f"{src}: no such directory") from e
            except git.InvalidGitRepositoryError as e:
                raise RepoAccessError(f"{src}: not a Git repository (use validate without --revision for a "
                                      "plain directory)") from e
        yield r
    finally:
        if r is not None:
            r.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _git_err(e: git.GitCommandError) -> str:
    text = (e.stderr or str(e)).strip()
    return text.replace("stderr: ", "").strip("'\n ")


def _commit(r: Any, revision: str) -> Any:
    try:
        return r.commit(revision)
    except (git.BadName, ValueError, git.GitCommandError) as e:
        raise RepoAccessError(f"unknown revision {revision!r}") from e


def _revision(c: Any) -> m.Revision:
    return m.Revision(sha=c.hexsha, subject=str(c.summary))


def resolve_revision(repo: str | os.PathLike[str], revision: str = "HEAD") -> m.Revision:
    with _repo(repo) as r:
        return _revision(_commit(r, revision))


def read_tree(repo: str | os.PathLike[str], revision: str = "HEAD",
              known_digests: Mapping[str, str] | None = None) -> TreeRead:
    """The fleet files of one commit. Blobs whose id is in `known_digests` (same path) are not read."""
    known = known_digests or {}
    with _repo(repo) as r:
        commit = _commit(r, revision)
        blobs: dict[str, Any] = {}
        files: dict[str, RawFile] = {}
        for item in commit.tree.traverse():
            path: str = item.path
            mode = int(item.mode)
            top = path.split("/", 1)[0]
            if mode == _MODE_SUBMODULE or item.type == "submodule":
                if top in LAYOUT_DIRS or is_fleet_path(path):
                    files[path] = RawFile(path, "", None, problem(
                        "MF0006", f"{path} is a submodule; the fleet repo must be self-contained", SourcePos(path),
                        hint="copy the files into the fleet repo instead of a submodule"))
                continue
            if item.type != "blob":
                continue
            blobs[path] = item
        for path, blob in blobs.items():
            top = path.split("/", 1)[0]
            symlink = int(blob.mode) == _MODE_SYMLINK
            if not is_fleet_path(path):
                if symlink and (top in LAYOUT_DIRS or path in LAYOUT_DIRS):
                    files[path] = RawFile(path, "", None, problem(
                        "MF0006", f"{path} is a symlink that is not a fleet file; meshfed does not follow it",
                        SourcePos(path), hint="replace the link with the files themselves"))
                continue
            if symlink:
                target = blob.data_stream.read().decode("utf-8", "replace")
                resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
                if target.startswith("/") or resolved.startswith("..") or resolved not in blobs:
                    files[path] = RawFile(path, "", None, problem(
                        "MF0006", f"{path} is a symlink to {target!r}, outside the repository (or to nothing)",
                        SourcePos(path), hint="copy the file into the repository"))
                    continue
                blob = blobs[resolved]
            digest = blob.hexsha
            if known.get(path) == digest:
                files[path] = RawFile(path, digest, None)
            elif blob.size > _MAX_BLOB_BYTES:
                files[path] = RawFile(path, digest, b"x" * (_MAX_BLOB_BYTES + 1))  # size check reports it
            else:
                files[path] = RawFile(path, digest, blob.data_stream.read())
        return TreeRead(_revision(commit), MappingProxyType(files), frozenset(blobs))


def changed_files(repo: str | os.PathLike[str], old_sha: str, new_sha: str) -> list[str]:
    """Paths that differ between two commits (added, removed, modified; renames as both paths)."""
    with _repo(repo) as r:
        a, b = _commit(r, old_sha), _commit(r, new_sha)
        try:
            out = r.git.diff("--name-only", "--no-renames", "-z", a.hexsha, b.hexsha)
        except git.GitCommandError as e:
            raise RepoAccessError(f"cannot diff {old_sha}..{new_sha}: {_git_err(e)}") from e
        return sorted(p for p in out.split("\0") if p)


def is_ancestor(repo: str | os.PathLike[str], old_sha: str, new_sha: str) -> bool:
    """True if `new_sha` contains `old_sha` (moving old -> new is a fast-forward)."""
    with _repo(repo) as r:
        return bool(r.is_ancestor(_commit(r, old_sha).hexsha, _commit(r, new_sha).hexsha))


def verify_commit(repo: str | os.PathLike[str], sha: str, gnupg_home: str | None = None,
                  allowed_signers_file: str | None = None) -> tuple[bool, str]:
    """`git verify-commit` against configured keys: a GnuPG home (OpenPGP signatures) and/or an SSH
    allowed-signers file (`gpg.ssh.allowedSignersFile`, lines `<principal> namespaces="git"
    <public key>`). Git decides; on refusal the explanation says why in words (no signature, a key
    that is not configured, a bad/expired/revoked signature) and what to do about it."""
    env = dict(os.environ)
    if gnupg_home:
        env["GNUPGHOME"] = gnupg_home
    args: list[str] = []
    if allowed_signers_file:
        args = ["-c", f"gpg.ssh.allowedSignersFile={allowed_signers_file}"]
    with _repo(repo) as r:
        c = _commit(r, sha)
        try:
            r.git.execute(["git", *args, "verify-commit", c.hexsha], env=env, with_extended_output=True,
                          kill_after_timeout=GIT_TIMEOUT_S)
            return True, "good signature"
        except git.GitCommandError as e:
            said = " ".join((e.stderr or "").replace("stderr: ", "").strip("'\n ").split())
        try:
            shown = r.git.execute(["git", *args, "show", "-s", "--format=%G?%n%GK", c.hexsha], env=env,
                                  kill_after_timeout=GIT_TIMEOUT_S)
        except git.GitCommandError:
            shown = ""
        status, _, key = str(shown).partition("\n")
        return False, _signature_problem(status.strip(), key.strip(), said, gnupg_home, allowed_signers_file)


def _signature_problem(status: str, key: str, said: str, gnupg_home: str | None,
                       allowed_signers_file: str | None) -> str:
    """Words for git's `%G?` signature status."""
    configured = " and ".join(f"{what} {where}" for what, where in (
        ("GnuPG home", gnupg_home), ("allowed-signers file", allowed_signers_file)) if where) \
        or "no keys (configure a GnuPG home or an SSH allowed-signers file)"
    untrusted = (f"it is signed by key {key or '(unknown)'}, which is not among the configured keys "
                 f"({configured}); add the key there if its owner may change the fleet")
    text = {
        "N": "it has no signature; sign it (`git commit -S`, or `git commit --amend -S` before pushing)",
        "U": untrusted,
        "E": untrusted,
        "B": "its signature is bad (the commit or the signature was altered)",
        "X": f"its signature by key {key} has expired",
        "Y": f"it is signed by key {key}, which has expired",
        "R": f"it is signed by key {key}, which has been revoked",
    }.get(status, "its signature did not verify")
    return f"{text} (git: {said})" if said and status != "N" else text


def sync_mirror(url: str, mirror_dir: str, branch: str) -> m.Revision:
    """Keep a local bare mirror of `url` and return the head of `branch` in it (clone on first use)."""
    try:
        if not os.path.isdir(mirror_dir):
            r = git.Repo.clone_from(url, mirror_dir, bare=True, kill_after_timeout=GIT_TIMEOUT_S)
            r.close()
        with _repo(mirror_dir) as r:
            r.git.fetch("--force", "--prune", url, f"+refs/heads/{branch}:refs/heads/{branch}",
                        kill_after_timeout=GIT_TIMEOUT_S)
            return _revision(_commit(r, f"refs/heads/{branch}"))
    except git.GitCommandError as e:
        raise RepoAccessError(f"cannot fetch {branch} from {url}: {_git_err(e)}") from e
