"""gitops: the fleet repo as a strictly validated, immutable `ConfigSnapshot`.

Public API (stable names; the controller, the lab and the CLI import these):

- `load_worktree(path, previous=None) -> ConfigSnapshot` — a directory on disk, revision "WORKTREE";
- `load_revision(repo, revision="HEAD", previous=None) -> ConfigSnapshot` — a commit of a local
  repository or a URL, stamped with the commit SHA and subject;
- `validate_tree(path, revision=None) -> list[Problem]` — errors and warnings, never FleetError;
- `load(path, revision=None, previous=None) -> LoadResult` — snapshot-or-None plus all problems;
- `changed_files(repo, old_sha, new_sha) -> list[str]`.

Passing `previous` (the last good snapshot) re-parses only the files whose digest changed.
The loaders raise `FleetError` (the repo has errors; `.problems` lists them) or `RepoAccessError`
(it could not be read at all). Git is reached only through `gitops.git`, imported on first use so
that importing `gitops` stays cheap.
"""

from __future__ import annotations

import os

from gitops.loader import LoadResult, build_snapshot, read_worktree
from gitops.model import ConfigSnapshot
from gitops.problems import FleetError, Problem, RepoAccessError, Severity, SourcePos

__all__ = [
    "ConfigSnapshot",
    "FleetError",
    "LoadResult",
    "Problem",
    "RepoAccessError",
    "Severity",
    "SourcePos",
    "changed_files",
    "load",
    "load_revision",
    "load_worktree",
    "validate_tree",
]


def load(path: str | os.PathLike[str], revision: str | None = None,
         previous: ConfigSnapshot | None = None) -> LoadResult:
    """Read and validate; never raises FleetError (only RepoAccessError)."""
    known = previous.file_digests if previous is not None else None
    if revision is None:
        tree = read_worktree(path, known)
    else:
        from gitops import git as _git
        tree = _git.read_tree(path, revision, known)
    return build_snapshot(tree, previous)


def _snapshot_or_raise(result: LoadResult) -> ConfigSnapshot:
    if result.snapshot is None:
        raise FleetError(list(result.errors))
    return result.snapshot


def load_worktree(path: str | os.PathLike[str], previous: ConfigSnapshot | None = None) -> ConfigSnapshot:
    return _snapshot_or_raise(load(path, None, previous))


def load_revision(repo: str | os.PathLike[str], revision: str = "HEAD",
                  previous: ConfigSnapshot | None = None) -> ConfigSnapshot:
    return _snapshot_or_raise(load(repo, revision, previous))


def validate_tree(path: str | os.PathLike[str], revision: str | None = None) -> list[Problem]:
    return list(load(path, revision).problems)


def changed_files(repo: str | os.PathLike[str], old_sha: str, new_sha: str) -> list[str]:
    from gitops import git as _git
    return _git.changed_files(repo, old_sha, new_sha)
