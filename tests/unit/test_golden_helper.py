"""The golden-file helper cannot pass by writing the file it compares with."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.golden import assert_golden


def test_a_missing_golden_file_fails_and_is_not_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UPDATE_GOLDEN", raising=False)
    with pytest.raises(pytest.fail.Exception, match="missing"):
        assert_golden(tmp_path / "x.json", {"a": 1})
    assert not (tmp_path / "x.json").exists()


def test_a_different_golden_fails_and_update_rewrites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UPDATE_GOLDEN", raising=False)
    (tmp_path / "x.json").write_text('{"a": 2}\n')
    with pytest.raises(AssertionError, match="differs"):
        assert_golden(tmp_path / "x.json", {"a": 1})
    monkeypatch.setenv("UPDATE_GOLDEN", "1")
    assert_golden(tmp_path / "x.json", {"a": 1})
    monkeypatch.delenv("UPDATE_GOLDEN")
    assert_golden(tmp_path / "x.json", {"a": 1})
