"""Bootstrap tokens: one owner and one writer (federation.controller.bootstrap), secrets written
0600 from the start and never through a symlink, compared in constant time."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from federation.cli.main import cli
from federation.controller.bootstrap import BOOTSTRAP_TOKENS_FILE, BootstrapTokenError, BootstrapTokens


def test_tokens_are_written_privately_and_not_through_a_planted_symlink(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere.json"
    # a planted link at the file's own name: writing through it would leak the tokens
    (state / BOOTSTRAP_TOKENS_FILE).symlink_to(elsewhere)
    with pytest.raises(BootstrapTokenError, match="symlink"):
        BootstrapTokens(state).ensure(["east", "west"])
    (state / BOOTSTRAP_TOKENS_FILE).unlink()
    (state / "bootstrap-tokens.json.tmp").symlink_to(elsewhere)   # stale temp names of older writers
    (state / "bootstrap-tokens.tmp").symlink_to(elsewhere)
    owner = BootstrapTokens(state)
    tokens = owner.ensure(["east", "west"])
    assert not elsewhere.exists()
    path = state / BOOTSTRAP_TOKENS_FILE
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600 and not path.is_symlink()
    assert json.loads(path.read_text()) == tokens and set(tokens) == {"east", "west"}
    assert owner.cluster_for(tokens["east"]) == "east" and owner.cluster_for(tokens["west"]) == "west"
    assert owner.cluster_for("") is None and owner.cluster_for(tokens["east"][:-1]) is None


def test_tokens_are_kept_across_restarts_and_shared_with_the_command(tmp_path: Path) -> None:
    first = BootstrapTokens(tmp_path).ensure(["east"])
    out = CliRunner().invoke(cli, ["controller", "bootstrap-token", "--state-dir", str(tmp_path),
                                   "--proxy-id", "ztunnel/east/node-1"])
    assert out.exit_code == 0, out.output
    assert out.output.strip() == first["east"]
    # a new cluster's proxy gets a new token; the existing one is kept for the restarted controller
    out = CliRunner().invoke(cli, ["controller", "bootstrap-token", "--state-dir", str(tmp_path),
                                   "--proxy-id", "gateway/west"])
    again = BootstrapTokens(tmp_path).ensure(["east", "west"])
    assert again["east"] == first["east"] and again["west"] == out.output.strip()


def test_command_refuses_a_proxy_id_that_names_no_cluster(tmp_path: Path) -> None:
    out = CliRunner().invoke(cli, ["controller", "bootstrap-token", "--state-dir", str(tmp_path),
                                   "--proxy-id", "east"])
    assert out.exit_code == 64
    assert "ztunnel/<cluster>/<node>" in out.output


def test_loose_file_mode_is_refused_with_the_fix(tmp_path: Path) -> None:
    BootstrapTokens(tmp_path).ensure(["east"])
    os.chmod(tmp_path / BOOTSTRAP_TOKENS_FILE, 0o644)
    with pytest.raises(BootstrapTokenError, match="chmod 600"):
        BootstrapTokens(tmp_path).ensure(["east"])
