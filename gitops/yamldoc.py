"""Strict YAML 1.2 reading with a position for every key and value.

We compose ruamel.yaml's node graph (never its constructors) and build plain Python values
ourselves, so that:

- scalars resolve by the YAML 1.2 core schema only (`no`, `on`, `1.10` stay what 1.2 says);
- duplicate keys, anchors, aliases, merge keys and explicit tags are rejected with a position
  instead of being resolved one way or another;
- size and depth are bounded before and during the walk;
- every value and every mapping key gets a `SourcePos` under its path (a tuple of keys and list
  indexes), which the schema layer uses to point at the exact line of a bad field.

Positions are 1-based (ruamel's marks are 0-based).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from io import StringIO
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gitops.codes import problem
from gitops.problems import Problem, SourcePos

MAX_FILE_BYTES = 256 * 1024
MAX_DEPTH = 32

Path = tuple[str | int, ...]

_CORE = "tag:yaml.org,2002:"


@dataclass(slots=True)
class Doc:
    """One YAML document as plain data plus the positions of its values and keys."""

    file: str
    data: Any
    value_pos: dict[Path, SourcePos] = field(default_factory=dict)
    key_pos: dict[Path, SourcePos] = field(default_factory=dict)

    def pos(self, path: Path) -> SourcePos:
        """Position of the key at `path` if it is a mapping key, else of the value; falls back
        to the nearest enclosing path so a problem always has a line."""
        p = tuple(path)
        while p:
            if p in self.key_pos:
                return self.key_pos[p]
            if p in self.value_pos:
                return self.value_pos[p]
            p = p[:-1]
        return self.value_pos.get((), SourcePos(self.file, 1, 1))

    def value_at(self, path: Path) -> SourcePos:
        """Position of the value at `path` (or of the nearest enclosing one)."""
        p = tuple(path)
        while p and p not in self.value_pos:
            p = p[:-1]
        return self.value_pos.get(p, SourcePos(self.file, 1, 1))


class _Reject(Exception):
    def __init__(self, prob: Problem) -> None:
        super().__init__(prob.message)
        self.problem = prob


def _tag(node: Node) -> str:
    t = node.tag
    return str(getattr(t, "value", t) or "")


def _mark_pos(file: str, mark: Any) -> SourcePos:
    return SourcePos(file, int(mark.line) + 1, int(mark.column) + 1)


def _scalar(node: ScalarNode) -> Any:
    tag = _tag(node)
    v: str = node.value
    if tag == _CORE + "str":
        return v
    if tag == _CORE + "null":
        return None
    if tag == _CORE + "bool":
        return v.lower() == "true"
    if tag == _CORE + "int":
        s = v.replace("_", "")
        if s.lower().startswith(("0x", "+0x", "-0x")):
            return int(s, 16)
        if s.lower().startswith(("0o", "+0o", "-0o")):
            return int(s.replace("o", "").replace("O", ""), 8)
        if s.lstrip("+-").lower().startswith("0b"):
            return v  # binary is YAML 1.1 only; ruamel still tags it int
        return int(s)  # ValueError past sys.get_int_max_str_digits(): _walk reports it
    if tag == _CORE + "float":
        s = v.lower().replace("_", "")
        if s in (".nan",):
            return math.nan
        if s in (".inf", "+.inf"):
            return math.inf
        if s == "-.inf":
            return -math.inf
        return float(s)
    return v  # timestamps etc. are not part of the 1.2 core schema: keep the text


def _scalar_at(file: str, node: ScalarNode) -> Any:
    """`_scalar`, with a number Python refuses to convert (more digits than
    `sys.get_int_max_str_digits()`) reported at its position instead of raised."""
    try:
        return _scalar(node)
    except ValueError as e:
        raise _Reject(problem("MF0004", f"number {node.value[:20]!r}… cannot be read: {e}",
                              _mark_pos(file, node.start_mark),
                              hint="a fleet value is never this long; quote it if it is meant as text")) from e


def parse_yaml(file: str, raw: bytes) -> tuple[Doc | None, list[Problem]]:
    """Parse one file. Returns (doc, []) or (None, problems)."""
    start = SourcePos(file, 1, 1)
    if len(raw) > MAX_FILE_BYTES:
        return None, [problem("MF0004", f"file is {len(raw)} bytes, more than the limit of {MAX_FILE_BYTES}",
                              start, hint="split the object or move data out of the fleet repo")]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        return None, [problem("MF0005", f"byte 0x{raw[e.start]:02x} at offset {e.start} is not valid UTF-8",
                              SourcePos(file, line, col), hint="save the file as UTF-8")]
    text = text.removeprefix("\ufeff")
    yaml = YAML(typ="safe", pure=True)
    yaml.version = (1, 2)
    try:
        nodes = list(yaml.compose_all(StringIO(text)))
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        pos = _mark_pos(file, mark) if mark is not None else start
        what = " ".join(x for x in (e.context, e.problem) if x)
        if "found undefined alias" in (e.problem or "") or "anchor" in (e.problem or ""):
            return None, [problem("MF0003", f"YAML alias/anchor error: {what}", pos,
                                  hint="write the values out instead of using anchors and aliases")]
        return None, [problem("MF0001", f"YAML syntax error: {what}", pos,
                              hint="check indentation and quoting around this position")]
    except YAMLError as e:
        return None, [problem("MF0001", f"YAML error: {e}", start, hint="fix the YAML syntax")]
    except RecursionError:
        return None, [problem("MF0004", f"nesting is deeper than the limit of {MAX_DEPTH}", start,
                              hint="flatten the structure; fleet objects need only a few levels")]
    nodes = [n for n in nodes if n is not None]
    if len(nodes) != 1:
        pos = _mark_pos(file, nodes[1].start_mark) if len(nodes) > 1 else start
        return None, [problem("MF0007", f"the file holds {len(nodes)} YAML documents; exactly one object per file",
                              pos, hint="put each object in its own file (no '---' separators)")]
    doc = Doc(file=file, data=None)
    try:
        doc.data = _walk(doc, nodes[0], (), 0, set())
    except _Reject as r:
        return None, [r.problem]
    return doc, []


def _walk(doc: Doc, node: Node, path: Path, depth: int, seen: set[int]) -> Any:
    pos = _mark_pos(doc.file, node.start_mark)
    if depth > MAX_DEPTH:
        raise _Reject(problem("MF0004", f"nesting is deeper than the limit of {MAX_DEPTH}", pos,
                              hint="flatten the structure; fleet objects need only a few levels"))
    if id(node) in seen or getattr(node, "anchor", None):
        raise _Reject(problem("MF0003", "anchors and aliases are not allowed in the fleet repo", pos,
                              hint="write the values out instead of using &anchor / *alias"))
    seen.add(id(node))
    tag = _tag(node)
    if tag and not tag.startswith(_CORE):
        raise _Reject(problem("MF0003", f"explicit YAML tag {tag!r} is not allowed", pos,
                              hint="remove the tag; quote the value if it should be a string"))
    doc.value_pos[path] = pos
    if isinstance(node, ScalarNode):
        return _scalar_at(doc.file, node)
    if isinstance(node, SequenceNode):
        return [_walk(doc, item, (*path, i), depth + 1, seen) for i, item in enumerate(node.value)]
    if isinstance(node, MappingNode):
        out: dict[str, Any] = {}
        for knode, vnode in node.value:
            kpos = _mark_pos(doc.file, knode.start_mark)
            if not isinstance(knode, ScalarNode):
                raise _Reject(problem("MF0102", "mapping keys must be plain strings", kpos,
                                      hint="write keys as plain words (no lists or mappings as keys)"))
            if _tag(knode) == _CORE + "merge" or (knode.value == "<<" and not knode.style):
                raise _Reject(problem("MF0003", "merge keys ('<<') are not allowed", kpos,
                                      hint="write the merged fields out"))
            key = str(_scalar_at(doc.file, knode)) if _tag(knode) != _CORE + "str" else knode.value
            if key in out:
                first = doc.key_pos[(*path, key)]
                raise _Reject(problem("MF0002", f"duplicate key {key!r} (first at line {first.line})", kpos,
                                      hint=f"remove one of the two {key!r} entries"))
            doc.key_pos[(*path, key)] = kpos
            out[key] = _walk(doc, vnode, (*path, key), depth + 1, seen)
        return out
    raise _Reject(problem("MF0001", f"unsupported YAML node {type(node).__name__}", pos))  # pragma: no cover
