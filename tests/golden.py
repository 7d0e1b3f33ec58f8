"""Golden files: rendered output compared with a reviewed copy in the repository.

A missing golden file is a failure, not a pass: deleting a golden file must turn its test red.
`UPDATE_GOLDEN=1 pytest ...` (re)writes the files; review the diff and commit them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

UPDATE_ENV = "UPDATE_GOLDEN"


def assert_golden(path: Path, data: object) -> None:
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    if os.environ.get(UPDATE_ENV) == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    if not path.exists():
        pytest.fail(f"golden file {path} is missing; run with {UPDATE_ENV}=1 to write it, review it and commit it")
    assert json.loads(path.read_text()) == json.loads(text), f"{path.name} differs; {UPDATE_ENV}=1 to accept"
