"""Problems found in a fleet repo: a stable code, where, what went wrong, and how to fix it.

Codes are stable API (users grep for them, CI pipelines allow-list them). Never renumber; retire a
code by leaving it unused. The catalogue lives in `gitops.codes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Severity(str, Enum):
    ERROR = "Error"
    WARNING = "Warning"


@dataclass(frozen=True, slots=True)
class SourcePos:
    """A position in the fleet repo: path relative to the repo root, 1-based line and column."""

    file: str
    line: int = 0
    col: int = 0

    def __str__(self) -> str:
        if self.line <= 0:
            return self.file
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True, slots=True)
class ObjectRef:
    kind: str
    name: str
    namespace: str | None = None

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"


@dataclass(frozen=True, slots=True)
class Problem:
    code: str
    message: str
    pos: SourcePos
    hint: str = ""
    obj: ObjectRef | None = None
    severity: Severity = Severity.ERROR

    def render(self) -> str:
        """`Error [MF0102] (DestinationRule shop/checkout) policies/shop/checkout.yaml:11:9 message`."""
        who = f" ({self.obj})" if self.obj else ""
        head = f"{self.severity.value} [{self.code}]{who} {self.pos} {self.message}"
        return f"{head}\n  hint: {self.hint}" if self.hint else head

    def as_dict(self) -> dict[str, object]:
        return {
            "code": self.code,
            "severity": self.severity.value,
            "object": str(self.obj) if self.obj else None,
            "file": self.pos.file,
            "line": self.pos.line,
            "col": self.pos.col,
            "message": self.message,
            "hint": self.hint,
        }


class FleetError(Exception):
    """The fleet repo at some revision cannot be used; carries every problem found."""

    def __init__(self, problems: list[Problem] | tuple[Problem, ...]) -> None:
        self.problems = tuple(problems)
        first = self.problems[0].render() if self.problems else "no problems recorded"
        more = f" (+{len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        super().__init__(first + more)


class RepoAccessError(Exception):
    """The fleet repo could not be read at all (missing path, unknown revision, Git failure).

    Distinct from FleetError: the CLI maps this to exit 2 ("could not complete"), FleetError to 1.
    """
