"""From files to a `ConfigSnapshot`: layout, per-file parsing (with reuse), validation, assembly.

Two readers feed the same pure core, `build_snapshot(tree, previous)`:

- `read_worktree(path)`: a directory on disk (revision "WORKTREE", digests are sha256 of content);
- `gitops.git.read_tree(repo, revision)`: a commit (digests are Git blob ids).

Both produce a `TreeRead`: the fleet files (path -> digest and bytes) plus every path in the tree
(for references to non-YAML files such as CA bundles). A reader given the previous snapshot's
`file_digests` leaves `data=None` for files whose digest did not change, and `build_snapshot`
reuses the previous snapshot's object for them: one object per file, so an object's `pos.file`
identifies it. Only what a commit changed is parsed again; cross-object validation always runs on
the whole set (it is cheap next to YAML parsing).

Layout (MF0009/MF0010): federation.yaml; clusters/<name>.yaml; trust/<domain>.yaml;
services/<namespace>/<name>.yaml; policies/<namespace>/**/<name>.yaml (DestinationRules,
AuthorizationPolicies, routes, Gateways, InferencePools); lab/<cluster>.yaml; namespaces/<name>.yaml.
`.yml` is accepted like `.yaml`. Files outside these directories are not fleet files and are
ignored (README, CI configuration, bundles).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gitops import model as m
from gitops.codes import problem
from gitops.problems import Problem, RepoAccessError, Severity, SourcePos
from gitops.schema import FleetObject, Parsed, parse_object, ref_of
from gitops.validate import check_objects, resolve_host
from gitops.yamldoc import parse_yaml

LAYOUT_DIRS = ("clusters", "trust", "services", "policies", "lab", "namespaces")
CHAOS_KIND = "ChaosExperiment"  # gitops.experiment.KIND; lives in chaos/ or elsewhere, never in LAYOUT_DIRS
YAML_SUFFIXES = (".yaml", ".yml")
MAX_FILES = 5000
WORKTREE = "WORKTREE"

# kind -> the top-level directory it must live in
HOME_OF = {
    "Federation": "",
    "Cluster": "clusters",
    "TrustDomain": "trust",
    "GlobalService": "services",
    "LabCluster": "lab",
    "DestinationRule": "policies",
    "AuthorizationPolicy": "policies",
    "HTTPRoute": "policies",
    "TCPRoute": "policies",
    "GRPCRoute": "policies",
    "Gateway": "policies",
    "InferencePool": "policies",
    "Namespace": "namespaces",
}


@dataclass(frozen=True, slots=True)
class RawFile:
    path: str                   # repo-relative, '/'-separated
    digest: str
    data: bytes | None          # None: unchanged since the previous snapshot, not read
    error: Problem | None = None  # the file could not be used at all (symlink out, submodule, ...)


@dataclass(frozen=True, slots=True)
class TreeRead:
    revision: m.Revision
    files: Mapping[str, RawFile]
    all_paths: frozenset[str]


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What loading found: a snapshot if there were no errors, and every problem (warnings too)."""

    snapshot: m.ConfigSnapshot | None
    problems: tuple[Problem, ...]
    reparsed: tuple[str, ...] = ()  # files parsed this time (the rest were reused)

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity is Severity.ERROR)


def is_fleet_path(path: str) -> bool:
    if path == "federation.yaml":
        return True
    top = path.split("/", 1)[0]
    return top in LAYOUT_DIRS and path.endswith(YAML_SUFFIXES)


def _stem(name: str) -> str:
    for s in YAML_SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def layout_problems(path: str, parsed: Parsed) -> list[Problem]:
    """Does the object live where the layout convention says it must?"""
    ref = ref_of(parsed.obj)
    pos = parsed.obj.pos
    home = HOME_OF[parsed.kind]
    parts = path.split("/")
    expected = _expected_path(parsed)
    if home == "":
        if path != "federation.yaml":
            return [problem("MF0009", f"{parsed.kind} must be in federation.yaml at the repository root", pos,
                            obj=ref, hint="move it to federation.yaml")]
        return []
    if parts[0] != home:
        return [problem("MF0009", f"{parsed.kind} does not belong in {parts[0]}/", pos, obj=ref,
                        hint=f"move it to {expected}")]
    shape_ok = {
        "clusters": len(parts) == 2, "trust": len(parts) == 2, "lab": len(parts) == 2, "namespaces": len(parts) == 2,
        "services": len(parts) == 3, "policies": len(parts) >= 3,
    }[home]
    if not shape_ok:
        return [problem("MF0009", f"{path} is not where a {parsed.kind} lives", pos, obj=ref,
                        hint=f"move it to {expected}")]
    name_ok = _stem(parts[-1]) == parsed.name
    ns_ok = home not in ("services", "policies") or parts[1] == parsed.namespace
    if not (name_ok and ns_ok):
        what = "name" if not name_ok else "namespace"
        return [problem("MF0010", f"path {path} disagrees with the object's {what} "
                        f"({ref})", pos, obj=ref, hint=f"rename the file to {expected} or fix metadata.{what}")]
    return []


def _expected_path(p: Parsed) -> str:
    home = HOME_OF[p.kind]
    if home == "":
        return "federation.yaml"
    if home in ("services", "policies"):
        return f"{home}/{p.namespace}/{p.name}.yaml"
    return f"{home}/{p.name}.yaml"


def parse_file(path: str, data: bytes) -> tuple[FleetObject | None, list[Problem], tuple[str, str, str] | None]:
    """One file -> (object or None, problems, identity written in the file if the object failed).

    A misplaced object is still returned (with its MF0009/MF0010 problem) so that its references
    are checked and others' references to it resolve; for an object that failed to parse, its
    written (kind, namespace, name) is returned so that references to it are not reported as
    unknown on top of the real error."""
    doc, probs = parse_yaml(path, data)
    if doc is None:
        return None, probs, _identity_from_path(path)
    if isinstance(doc.data, dict) and doc.data.get("kind") == CHAOS_KIND:
        # an experiment is not mesh configuration: the controller must not read it with the fleet
        return None, [problem("MF0009", f"{path} is a {CHAOS_KIND}, which is not mesh configuration",
                              SourcePos(path, 1, 1), hint=f"move it to chaos/{path.rsplit('/', 1)[-1]} (the "
                              "fleet loader does not read chaos/) or to a directory of its own")], None
    parsed, probs = parse_object(doc)
    if parsed is None:
        d: dict[str, Any] = doc.data if isinstance(doc.data, dict) else {}
        meta_raw = d.get("metadata")
        meta: dict[str, Any] = meta_raw if isinstance(meta_raw, dict) else {}
        if d.get("kind") not in HOME_OF:
            return None, probs, _identity_from_path(path)
        ident = (str(d.get("kind")), str(meta.get("namespace") or ""), str(meta.get("name")))
        return None, probs, ident
    return parsed.obj, probs + layout_problems(path, parsed), None


ParseOutcome = tuple[FleetObject | None, list[Problem], tuple[str, str, str] | None]
_PARSE_CACHE: OrderedDict[tuple[str, str], ParseOutcome] = OrderedDict()
PARSE_CACHE_SIZE = 2048


def _parse_cached(path: str, digest: str, data: bytes) -> ParseOutcome:
    """parse_file memoised on (path, content digest): the outcome is immutable, and a process that
    loads many revisions (the controller, `meshfed plan`) parses each file version once."""
    key = (path, digest)
    hit = _PARSE_CACHE.get(key)
    if hit is not None:
        _PARSE_CACHE.move_to_end(key)
        return hit[0], list(hit[1]), hit[2]
    outcome = parse_file(path, data)
    _PARSE_CACHE[key] = (outcome[0], list(outcome[1]), outcome[2])
    if len(_PARSE_CACHE) > PARSE_CACHE_SIZE:
        _PARSE_CACHE.popitem(last=False)
    return outcome


def _identity_from_path(path: str) -> tuple[str, str, str] | None:
    """What the layout says a file holds, for a file too broken to tell us itself."""
    parts = path.split("/")
    stem = _stem(parts[-1])
    kind = {"clusters": "Cluster", "trust": "TrustDomain", "lab": "LabCluster", "namespaces": "Namespace"}.get(parts[0])
    if kind and len(parts) == 2:
        return (kind, "", stem)
    if parts[0] == "services" and len(parts) == 3:
        return ("GlobalService", parts[1], stem)
    return None


def objects_by_file(snapshot: m.ConfigSnapshot) -> dict[str, FleetObject]:
    """Every object of a snapshot under the file it came from (one object per file)."""
    objs: list[FleetObject] = [snapshot.federation, *snapshot.clusters.values(), *snapshot.trust_domains.values(),
                               *snapshot.services.values(), *snapshot.lab_clusters.values(),
                               *snapshot.destination_rules.values(), *snapshot.authorization_policies,
                               *snapshot.routes, *snapshot.namespaces.values(), *snapshot.gateways.values(),
                               *snapshot.inference_pools.values()]
    return {o.pos.file: o for o in objs}


def build_snapshot(tree: TreeRead, previous: m.ConfigSnapshot | None = None) -> LoadResult:
    """Parse (or reuse), validate and assemble. Pure: no I/O."""
    problems: list[Problem] = []
    if len(tree.files) > MAX_FILES:
        return LoadResult(None, (problem("MF0013", f"{len(tree.files)} fleet files, more than the limit of "
                                         f"{MAX_FILES}", SourcePos(""),
                                         hint="split the fleet into several repositories or raise the limit"),))
    prev = objects_by_file(previous) if previous is not None else {}
    prev_digests = previous.file_digests if previous is not None else {}
    objects: list[FleetObject] = []
    reparsed: list[str] = []
    broken: set[tuple[str, str, str]] = set()
    for path in sorted(tree.files):
        f = tree.files[path]
        if f.error is not None:
            problems.append(f.error)
            continue
        reuse = prev.get(path) if prev_digests.get(path) == f.digest else None
        if reuse is not None:
            objects.append(reuse)
            continue
        if f.data is None:
            raise ValueError(f"{path}: reader skipped a file the previous snapshot does not hold")
        obj, probs, ident = _parse_cached(path, f.digest, f.data)
        reparsed.append(path)
        problems += probs
        if obj is not None:
            objects.append(obj)
        if ident is not None:
            broken.add(ident)
    if "federation.yaml" not in tree.files:
        problems.append(problem("MF0011", "the fleet repo has no federation.yaml", SourcePos("federation.yaml"),
                                hint="add federation.yaml with kind: Federation at the repository root"))
    file_errors = [p for p in problems if p.severity is Severity.ERROR]
    semantic = [p for p in check_objects(objects, tree.all_paths, frozenset(broken))
                if not (p.code == "MF0011" and "federation.yaml" not in tree.files)]
    problems += semantic
    if file_errors or any(p.severity is Severity.ERROR for p in semantic):
        return LoadResult(None, tuple(problems), tuple(reparsed))
    return LoadResult(_assemble(tree, objects), tuple(problems), tuple(reparsed))


def _assemble(tree: TreeRead, objects: list[FleetObject]) -> m.ConfigSnapshot:
    fed = next(o for o in objects if isinstance(o, m.Federation))
    domain = fed.clusterset_domain
    services: dict[m.ServiceKey, m.GlobalService] = {}
    for o in objects:
        if isinstance(o, m.GlobalService):
            if "spec.hostname" not in o.field_pos:
                o = replace(o, hostname=f"{o.name}.{o.namespace}.svc.{domain}")
            services[o.key] = o
    drs: dict[m.ServiceKey, m.DestinationRule] = {}
    for o in objects:
        if isinstance(o, m.DestinationRule):
            key = resolve_host(o.host, o.namespace, domain)
            assert key is not None  # validated
            drs[key] = o
    def ordered(kind: type[m.AuthorizationPolicy] | type[m.Route]) -> list[FleetObject]:
        return sorted((o for o in objects if isinstance(o, kind)), key=lambda x: (ref_of(x).namespace or "",
                                                                                   ref_of(x).name, ref_of(x).kind))
    return m.ConfigSnapshot(
        revision=tree.revision,
        federation=fed,
        clusters=MappingProxyType({o.name: o for o in objects if isinstance(o, m.Cluster)}),
        trust_domains=MappingProxyType({o.name: o for o in objects if isinstance(o, m.TrustDomain)}),
        services=MappingProxyType(services),
        lab_clusters=MappingProxyType({o.cluster: o for o in objects if isinstance(o, m.LabCluster)}),
        destination_rules=MappingProxyType(drs),
        authorization_policies=tuple(o for o in ordered(m.AuthorizationPolicy) if isinstance(o, m.AuthorizationPolicy)),
        routes=tuple(o for o in ordered(m.Route) if isinstance(o, m.Route)),
        file_digests=MappingProxyType({p: f.digest for p, f in tree.files.items()}),
        namespaces=MappingProxyType({o.name: o for o in objects if isinstance(o, m.Namespace)}),
        gateways=MappingProxyType({o.key: o for o in sorted((o for o in objects if isinstance(o, m.Gateway)),
                                                               key=lambda g: (g.namespace, g.name))}),
        inference_pools=MappingProxyType({o.key: o for o in sorted(
            (o for o in objects if isinstance(o, m.InferencePool)), key=lambda g: (g.namespace, g.name))}),
    )


# ------------------------------------------------------------------------------------------------
# the worktree reader


def _confined(root: Path, target: Path) -> bool:
    try:
        target.relative_to(root)
        return True
    except ValueError:
        return False


def read_worktree(path: str | os.PathLike[str], known_digests: Mapping[str, str] | None = None) -> TreeRead:
    """Read a fleet repo directory. Symlinks are followed only if they stay inside the repo;
    nested Git repositories (submodules) and special files are refused."""
    root = Path(path)
    if not root.is_dir():
        raise RepoAccessError(f"{path}: not a directory (give the fleet repo's root directory)")
    root = root.resolve()
    files: dict[str, RawFile] = {}
    all_paths: set[str] = set()
    known = known_digests or {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root)
        in_layout = bool(rel_dir.parts) and rel_dir.parts[0] in LAYOUT_DIRS
        for d in list(dirnames):
            full = Path(dirpath) / d
            rel = (rel_dir / d).as_posix()
            if rel == ".git" or full.is_symlink():
                dirnames.remove(d)
            inside = in_layout or (not rel_dir.parts and d in LAYOUT_DIRS)
            if not inside:
                continue
            if full.is_symlink():
                files[rel] = RawFile(rel, "", None, problem(
                    "MF0006", f"{rel} is a symlinked directory; meshfed does not follow them", SourcePos(rel),
                    hint="replace the link with the files themselves"))
            elif (full / ".git").exists():
                dirnames.remove(d)
                files[rel] = RawFile(rel, "", None, problem(
                    "MF0006", f"{rel} is a nested Git repository (submodule); the fleet repo must be self-contained",
                    SourcePos(rel), hint="copy the files into the fleet repo instead of a submodule"))
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            all_paths.add(rel)
            if is_fleet_path(rel):
                files[rel] = _read_one(root, Path(dirpath) / name, rel, known)
    return TreeRead(m.Revision(WORKTREE, "uncommitted working tree"), MappingProxyType(files), frozenset(all_paths))


def _read_one(root: Path, full: Path, rel: str, known: Mapping[str, str]) -> RawFile:
    pos = SourcePos(rel)
    if full.is_symlink():
        target = full.resolve()
        if not _confined(root, target):
            return RawFile(rel, "", None, problem("MF0006", f"{rel} is a symlink to {os.readlink(full)!r}, outside the "
                                                  "repository", pos, hint="copy the file into the repository"))
    try:
        st = full.stat()
        if not stat.S_ISREG(st.st_mode):
            return RawFile(rel, "", None, problem("MF0006", f"{rel} is not a regular file", pos,
                                                  hint="replace it with a regular file"))
        with open(full, "rb") as fh:
            data = fh.read(4 * 1024 * 1024 + 1)
    except OSError as e:
        raise RepoAccessError(f"{rel}: cannot read: {e.strerror}") from e
    digest = hashlib.sha256(data).hexdigest()
    return RawFile(rel, digest, None if known.get(rel) == digest else data)
