"""Helpers for the gitops unit tests: a private copy of examples/fleet with edits applied."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "fleet"

# An edit: ("replace", file, old, new) | ("write", file, text) | ("bytes", file, data)
#        | ("delete", file) | ("move", src, dst) | ("symlink", file, target) | ("mkdir", dir)
Edit = tuple[object, ...]


def apply_edits(root: Path, edits: Sequence[Edit]) -> None:
    for e in edits:
        op = e[0]
        if op == "replace":
            _, f, old, new = e
            p = root / str(f)
            text = p.read_text()
            assert str(old) in text, f"edit does not apply: {old!r} not in {f}"
            p.write_text(text.replace(str(old), str(new), 1))
        elif op == "write":
            _, f, text = e
            (root / str(f)).parent.mkdir(parents=True, exist_ok=True)
            (root / str(f)).write_text(str(text))
        elif op == "bytes":
            _, f, data = e
            assert isinstance(data, bytes)
            (root / str(f)).write_bytes(data)
        elif op == "delete":
            (root / str(e[1])).unlink()
        elif op == "move":
            (root / str(e[2])).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(root / str(e[1])), str(root / str(e[2])))
        elif op == "symlink":
            os.symlink(str(e[2]), root / str(e[1]))
        elif op == "mkdir":
            (root / str(e[1])).mkdir(parents=True, exist_ok=True)
        else:  # pragma: no cover
            raise ValueError(op)


@pytest.fixture
def fleet_copy(tmp_path: Path) -> Callable[..., Path]:
    def make(*edits: Edit) -> Path:
        root = tmp_path / "fleet"
        shutil.copytree(EXAMPLE, root, symlinks=True)
        apply_edits(root, edits)
        return root
    return make
