"""The status API token file: created 0600 once, the same across restarts, refused when unsafe."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from federation.controller.api_token import (
    STATUS_API_TOKEN_FILE,
    ApiTokenError,
    ensure_api_token,
    read_api_token,
    token_matches,
)


def test_created_private_once_and_kept(tmp_path: Path) -> None:
    first = ensure_api_token(tmp_path / "state")
    path = tmp_path / "state" / STATUS_API_TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(first) >= 32
    assert ensure_api_token(tmp_path / "state") == first == read_api_token(path)   # a restart keeps it
    assert ensure_api_token(tmp_path / "other") != first


def test_unsafe_or_empty_token_files_are_refused_with_the_fix(tmp_path: Path) -> None:
    ensure_api_token(tmp_path)
    path = tmp_path / STATUS_API_TOKEN_FILE
    os.chmod(path, 0o644)
    with pytest.raises(ApiTokenError, match="chmod 600"):
        read_api_token(path)
    path.write_text("short\n")
    os.chmod(path, 0o600)
    with pytest.raises(ApiTokenError, match="delete it and restart"):
        read_api_token(path)
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(ApiTokenError, match="symlink"):
        read_api_token(link)
    with pytest.raises(ApiTokenError, match="no status API token"):
        read_api_token(tmp_path / "missing")


def test_comparison() -> None:
    assert token_matches("a" * 20, "a" * 20)
    assert not token_matches("a" * 20, "a" * 19) and not token_matches("a" * 20, "")
