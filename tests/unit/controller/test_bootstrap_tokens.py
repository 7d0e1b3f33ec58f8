"""Bootstrap tokens: one owner and one writer (federation.controller.bootstrap), secrets written
0600 from the start and never through a symlink, compared in constant time; per proxy id,
short-lived and single-use (before: one reusable, never-expiring token per cluster bought any
proxy identity of that cluster)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from federation.cli.main import cli
from federation.controller.bootstrap import (
    BOOTSTRAP_TOKENS_FILE,
    DEFAULT_TTL_S,
    BootstrapTokenError,
    BootstrapTokens,
)

NODE1, NODE2, GW = "ztunnel/east/node-1", "ztunnel/east/node-2", "gateway/east"


class Clock:
    def __init__(self, now_s: float = 1_800_000_000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def test_tokens_are_written_privately_and_not_through_a_planted_symlink(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere.json"
    # a planted link at the file's own name: writing through it would leak the tokens
    (state / BOOTSTRAP_TOKENS_FILE).symlink_to(elsewhere)
    with pytest.raises(BootstrapTokenError, match="symlink"):
        BootstrapTokens(state).create(NODE1)
    (state / BOOTSTRAP_TOKENS_FILE).unlink()
    (state / "bootstrap-tokens.json.tmp").symlink_to(elsewhere)   # stale temp names of older writers
    (state / "bootstrap-tokens.tmp").symlink_to(elsewhere)
    owner = BootstrapTokens(state)
    east, west = owner.create(NODE1), owner.create("gateway/west")
    assert not elsewhere.exists()
    path = state / BOOTSTRAP_TOKENS_FILE
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600 and not path.is_symlink()
    stored = path.read_text()
    assert east not in stored and west not in stored      # only digests: a copy of the file buys nothing
    assert set(json.loads(stored)["tokens"]) == {NODE1, "gateway/west"}
    assert owner.check(east, NODE1) == "" and owner.check(west, "gateway/west") == ""
    assert owner.check("", NODE1) and owner.check(east[:-1], NODE1)


def test_a_token_is_bound_to_its_proxy_id(tmp_path: Path) -> None:
    tokens = BootstrapTokens(tmp_path)
    t1 = tokens.create(NODE1)
    # another proxy of the same cluster, the gateway of the cluster: the token buys neither
    for other in (NODE2, GW, "ztunnel/west/node-1"):
        assert "not a valid bootstrap token for " + other in tokens.check(t1, other)
    assert tokens.check(t1, NODE1) == ""


def test_a_token_is_single_use(tmp_path: Path) -> None:
    tokens = BootstrapTokens(tmp_path)
    t1 = tokens.create(NODE1)
    assert tokens.consume(t1, NODE1) is True      # its first certificate uses it up
    assert tokens.check(t1, NODE1) != "" and tokens.consume(t1, NODE1) is False
    assert tokens.pending() == {}


def test_a_token_expires_and_expired_ones_are_pruned(tmp_path: Path) -> None:
    clock = Clock()
    tokens = BootstrapTokens(tmp_path, clock)
    t1 = tokens.create(NODE1)                     # 1 h by default
    short = tokens.create(NODE2, ttl_s=60)
    clock.now_s += 61
    assert "expired" in tokens.check(short, NODE2)
    assert tokens.check(t1, NODE1) == ""
    clock.now_s += DEFAULT_TTL_S
    assert "expired" in tokens.check(t1, NODE1)
    assert tokens.prune() == 2 and json.loads((tmp_path / BOOTSTRAP_TOKENS_FILE).read_text())["tokens"] == {}


def test_a_new_token_replaces_the_proxys_unused_one(tmp_path: Path) -> None:
    tokens = BootstrapTokens(tmp_path)
    first, second = tokens.create(NODE1), tokens.create(NODE1)
    assert tokens.check(first, NODE1) != "" and tokens.check(second, NODE1) == ""


def test_revoking_a_cluster_removes_the_unused_tokens_of_its_proxies_only(tmp_path: Path) -> None:
    """Two-phase cluster removal, end: the removed cluster's proxies can no longer bootstrap with a
    token made before (of any kind of proxy id); other clusters' tokens are untouched."""
    clock = Clock()
    tokens = BootstrapTokens(tmp_path, clock)
    south = ["ztunnel/south/node-1", "gateway/south", "waypoint/south/shop/waypoint"]
    made = {pid: tokens.create(pid) for pid in [*south, NODE1, "gateway/west"]}
    expired = tokens.create("ztunnel/south/node-2", ttl_s=10)
    clock.now_s += 11
    assert sorted(tokens.revoke(["south", "north"])) == sorted(south)   # the expired one is not "revoked"...
    for pid in south:
        assert "not a valid bootstrap token" in tokens.check(made[pid], pid)
    assert tokens.check(expired, "ztunnel/south/node-2")                # ...but gone with it
    assert set(json.loads((tmp_path / BOOTSTRAP_TOKENS_FILE).read_text())["tokens"]) == {NODE1, "gateway/west"}
    assert tokens.check(made[NODE1], NODE1) == "" and tokens.check(made["gateway/west"], "gateway/west") == ""
    assert tokens.revoke(["south"]) == []


@pytest.mark.parametrize("ttl_s", [0, -1, 8 * 86400, float("nan")])
def test_a_token_lives_at_most_a_week(tmp_path: Path, ttl_s: float) -> None:
    with pytest.raises(ValueError, match="between 1 s and 7 days"):
        BootstrapTokens(tmp_path).create(NODE1, ttl_s)


def test_per_cluster_tokens_of_the_earlier_format_are_not_honoured(tmp_path: Path) -> None:
    from ztunnel.api.secret_files import write_secret

    write_secret(tmp_path / BOOTSTRAP_TOKENS_FILE, json.dumps({"east": "old-cluster-token"}).encode())
    tokens = BootstrapTokens(tmp_path)
    assert tokens.check("old-cluster-token", NODE1) != ""
    tokens.prune()  # the controller's start rewrites the file in the current format, without them
    assert json.loads((tmp_path / BOOTSTRAP_TOKENS_FILE).read_text()) == {"format": 2, "tokens": {}}


def test_the_command_prints_a_new_token_for_one_proxy(tmp_path: Path) -> None:
    out = CliRunner().invoke(cli, ["controller", "bootstrap-token", "--state-dir", str(tmp_path),
                                   "--proxy-id", NODE1, "--ttl", "30m"])
    assert out.exit_code == 0, out.output
    token = out.output.strip()
    tokens = BootstrapTokens(tmp_path)
    assert tokens.check(token, NODE1) == "" and tokens.check(token, NODE2) != ""
    exp = tokens.pending()[NODE1]
    created = json.loads((tmp_path / BOOTSTRAP_TOKENS_FILE).read_text())["tokens"][NODE1]["created_at_s"]
    assert exp - created == pytest.approx(1800)
    again = CliRunner().invoke(cli, ["controller", "bootstrap-token", "--state-dir", str(tmp_path),
                                     "--proxy-id", NODE1])
    assert again.output.strip() != token and tokens.check(token, NODE1) != ""   # replaced


@pytest.mark.parametrize(("args", "needle"), [
    (["--proxy-id", "east"], "ztunnel/<cluster>/<node>"),
    (["--proxy-id", "ztunnel/east"], "ztunnel/<cluster>/<node>"),
    (["--proxy-id", "ztunnel/east/Node-1"], "ztunnel/<cluster>/<node>"),   # one spelling per proxy
    (["--proxy-id", "ztunnel/east/node_1"], "Kubernetes node name"),
    (["--proxy-id", NODE1, "--ttl", "forever"], "--ttl"),
    (["--proxy-id", NODE1, "--ttl", "200h"], "7 days"),
])
def test_command_refuses_bad_input_with_the_fix(tmp_path: Path, args: list[str], needle: str) -> None:
    out = CliRunner().invoke(cli, ["controller", "bootstrap-token", "--state-dir", str(tmp_path), *args])
    assert out.exit_code == 64
    assert needle in out.output


def test_loose_file_mode_is_refused_with_the_fix(tmp_path: Path) -> None:
    BootstrapTokens(tmp_path).create(NODE1)
    os.chmod(tmp_path / BOOTSTRAP_TOKENS_FILE, 0o644)
    with pytest.raises(BootstrapTokenError, match="chmod 600"):
        BootstrapTokens(tmp_path).create(NODE1)
