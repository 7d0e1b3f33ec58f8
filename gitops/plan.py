"""What a push would change: a pure diff of two snapshots.

`diff_snapshots(old, new)` compares objects by identity (kind, namespace, name) and, for objects
present in both, their fields as plain data (positions excluded: moving a line is not a change).
The result is plain, ordered data so that the CLI can print it as a table or JSON and later
issues can extend `PlanResult` with effects (endpoints, routes, identities, gateways) computed by
the federation core, without touching this module's callers.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from gitops import model as m
from gitops.problems import ObjectRef, Problem, SourcePos
from gitops.schema import FleetObject, ref_of

_SKIP = {"pos", "field_pos"}
# Fields derived from others (a Route's L4 reading repeats its first rule): shown once, where written.
_DERIVED: dict[type[Any], frozenset[str]] = {m.Route: frozenset({"parent_service", "backends"})}


class ChangeAction(str, enum.Enum):
    ADDED = "added"
    REMOVED = "removed"
    CHANGED = "changed"


@dataclass(frozen=True, slots=True)
class FieldChange:
    path: str       # dotted path in the internal model (snake_case, list indexes in [])
    old: Any
    new: Any

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "old": self.old, "new": self.new}


@dataclass(frozen=True, slots=True)
class ObjectChange:
    action: ChangeAction
    obj: ObjectRef
    pos: SourcePos   # where the object is (new side; old side for removals)
    fields: tuple[FieldChange, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"action": self.action.value, "kind": self.obj.kind, "namespace": self.obj.namespace,
                "name": self.obj.name, "file": self.pos.file, "fields": [f.as_dict() for f in self.fields]}


@dataclass(frozen=True, slots=True)
class PlanResult:
    old_revision: m.Revision
    new_revision: m.Revision
    changes: tuple[ObjectChange, ...]
    # Later issues add derived effects (endpoints, routes, identities, gateways) here.
    effects: tuple[Mapping[str, Any], ...] = field(default=())
    # Problems for which the controller would refuse to apply the new revision (e.g. MF0516, a
    # commit that removes too much of the fleet), computed by the federation core.
    refusals: tuple[Problem, ...] = field(default=())

    @property
    def changed(self) -> bool:
        return bool(self.changes) or bool(self.effects)

    @property
    def refused(self) -> bool:
        return bool(self.refusals)

    def as_dict(self) -> dict[str, Any]:
        return {"from": {"sha": self.old_revision.sha, "subject": self.old_revision.subject},
                "to": {"sha": self.new_revision.sha, "subject": self.new_revision.subject},
                "changes": [c.as_dict() for c in self.changes],
                "effects": [dict(e) for e in self.effects],
                "refused": self.refused, "refusals": [p.as_dict() for p in self.refusals]}


def to_plain(value: Any) -> Any:
    """Model values -> JSON-like data (dataclasses to dicts without positions, enums to values)."""
    if is_dataclass(value) and not isinstance(value, type):
        derived = _DERIVED.get(type(value), frozenset())
        return {f.name: to_plain(getattr(value, f.name)) for f in fields(value)
                if f.name not in _SKIP and f.name not in derived}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [to_plain(v) for v in value]
    return value


def _flat_diff(path: str, old: Any, new: Any, out: list[FieldChange]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            _flat_diff(f"{path}.{k}" if path else k, old.get(k), new.get(k), out)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            _flat_diff(f"{path}[{i}]", a, b, out)
    elif old != new:
        out.append(FieldChange(path, old, new))


def _index(s: m.ConfigSnapshot) -> dict[tuple[str, str, str], FleetObject]:
    objs: list[FleetObject] = [s.federation, *s.clusters.values(), *s.trust_domains.values(),
                               *s.services.values(), *s.lab_clusters.values(), *s.destination_rules.values(),
                               *s.authorization_policies, *s.routes]
    out: dict[tuple[str, str, str], FleetObject] = {}
    for o in objs:
        r = ref_of(o)
        out[(r.kind, r.namespace or "", r.name)] = o
    return out


_KIND_ORDER = ["Federation", "TrustDomain", "Cluster", "GlobalService", "DestinationRule", "AuthorizationPolicy",
               "HTTPRoute", "TCPRoute", "LabCluster"]


def _order(key: tuple[str, str, str]) -> tuple[int, str, str]:
    kind, ns, name = key
    return (_KIND_ORDER.index(kind) if kind in _KIND_ORDER else len(_KIND_ORDER), ns, name)


def diff_snapshots(old: m.ConfigSnapshot, new: m.ConfigSnapshot) -> PlanResult:
    """Objects added, removed and changed (with their changed fields) from `old` to `new`."""
    a, b = _index(old), _index(new)
    changes: list[ObjectChange] = []
    for key in sorted(set(a) | set(b), key=_order):
        before, after = a.get(key), b.get(key)
        if before is None and after is not None:
            changes.append(ObjectChange(ChangeAction.ADDED, ref_of(after), after.pos))
        elif after is None and before is not None:
            changes.append(ObjectChange(ChangeAction.REMOVED, ref_of(before), before.pos))
        elif before is not None and after is not None:
            diffs: list[FieldChange] = []
            _flat_diff("", to_plain(before), to_plain(after), diffs)
            if diffs:
                changes.append(ObjectChange(ChangeAction.CHANGED, ref_of(after), after.pos, tuple(diffs)))
    return PlanResult(old.revision, new.revision, tuple(changes))
