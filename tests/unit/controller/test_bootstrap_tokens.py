"""Bootstrap tokens are secrets: written 0600 from the start and never through a symlink."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

from federation.ray.actors import BOOTSTRAP_TOKENS_FILE, CONTROLLER_ROOTS_FILE, ConfigServerHost


def test_tokens_are_written_privately_and_not_through_a_planted_temp_symlink(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere.json"
    # a stale temp name pointing out of the state directory: writing through it would leak the tokens
    (state / "bootstrap-tokens.tmp").symlink_to(elsewhere)
    (state / "bootstrap-tokens.json.tmp").symlink_to(elsewhere)
    host = SimpleNamespace(state_dir=str(state), server=SimpleNamespace(bootstrap_tokens={}),
                           _roots_pem=lambda: b"roots")
    ConfigServerHost._ensure_bootstrap(host, ["east", "west"])  # type: ignore[arg-type]
    assert not elsewhere.exists()
    path = state / BOOTSTRAP_TOKENS_FILE
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600 and not path.is_symlink()
    tokens = json.loads(path.read_text())
    assert set(tokens) == {"east", "west"}
    assert host.server.bootstrap_tokens == {tokens["east"]: "east", tokens["west"]: "west"}
    assert (state / CONTROLLER_ROOTS_FILE).read_bytes() == b"roots"
