"""`meshfed lab logs`: process names from the state directory, tails read from the end, `-f` as a
follower that loses and repeats no line (clusters.lab.logs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from clusters.lab import logs
from clusters.lab.layout import LabError
from federation.cli.main import cli


def _lab(tmp_path: Path) -> Path:
    sd = tmp_path / "lab"
    (sd / "logs").mkdir(parents=True)
    (sd / "lab.json").write_text(json.dumps({"clusters": [
        {"name": "east", "nodes": [{"name": "node-1"}], "gateway": {"address": "x"},
         "pods": [{"namespace": "shop", "name": "checkout-0"}]}]}))
    (sd / "lab.log").write_text("supervisor up\n")
    (sd / "logs" / "controller.log").write_text("".join(f"controller line {i}\n" for i in range(30)))
    (sd / "logs" / "ztunnel-east-node-1.log").write_text("config applied\n")
    (sd / "logs" / "gateway-east.log").write_text("listening\n")
    (sd / "logs" / "pod-east.shop.checkout-0.log").write_text("serving\n")
    (sd / "logs" / "job-load-east.log").write_text("")
    return sd


def test_processes_are_named_like_the_supervisor_names_them(tmp_path: Path) -> None:
    files = logs.log_files(_lab(tmp_path))
    assert list(files) == ["controller", "gateway:east", "job:load-east", "pod:east/shop/checkout-0",
                           "supervisor", "ztunnel:east/node-1"]
    assert list(logs.select(files, ["ztunnel/east/node-1"])) == ["ztunnel:east/node-1"]   # the proxy id
    assert list(logs.select(files, ["pod:east/*", "gateway-east"])) == ["gateway:east", "pod:east/shop/checkout-0"]
    with pytest.raises(LabError, match=r"no log named .nosuch.*controller"):
        logs.select(files, ["nosuch"])


def test_tail_reads_the_last_lines_from_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "big.log"
    f.write_text("".join(f"line {i}\n" for i in range(5000)))
    monkeypatch.setattr(logs, "TAIL_BLOCK_BYTES", 64)   # many blocks: the seam between them is exercised
    assert logs.tail_lines(f, 3) == ["line 4997", "line 4998", "line 4999"]
    assert len(logs.tail_lines(f, -1)) == 5000 and logs.tail_lines(f, 0) == []
    assert logs.tail_lines(f, 2, end=len("line 0\nline 1\nline 2\n")) == ["line 1", "line 2"]


def test_the_follower_sees_each_complete_line_once(tmp_path: Path) -> None:
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_text("old\n")
    files = {"a": a}
    follower = logs.LogFollower(lambda: dict(files))
    assert follower.poll() == []                       # starts at the end: the tail was printed already
    with a.open("a") as w:
        w.write("one\ntw")
    assert follower.poll() == [("a", "one")]           # the partial line waits for its newline
    with a.open("a") as w:
        w.write("o\n")
    b.write_text("first of b\n")
    files["b"] = b                                     # a process that started later: read whole
    assert follower.poll() == [("a", "two"), ("b", "first of b")]
    a.write_text("rotated\n")                          # truncated: read again from the start
    assert follower.poll() == [("a", "rotated")]


def test_a_runaway_line_is_emitted_in_bounded_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "MAX_PENDING_BYTES", 10)
    f = tmp_path / "x.log"
    f.write_text("")
    follower = logs.LogFollower(lambda: {"x": f})
    follower.poll()
    f.write_text("y" * 50)
    assert follower.poll() == [("x", "y" * 50)] and follower.cursors["x"].pending == b""


def test_lab_logs_command(tmp_path: Path) -> None:
    sd = _lab(tmp_path)
    r = CliRunner().invoke(cli, ["lab", "logs", "controller", "--tail", "2", "--state-dir", str(sd)])
    assert r.exit_code == 0 and r.stdout.splitlines() == ["controller line 28", "controller line 29"]
    r = CliRunner().invoke(cli, ["lab", "logs", "--state-dir", str(sd)])
    lines = r.stdout.splitlines()
    assert r.exit_code == 0 and "ztunnel:east/node-1      | config applied" in lines
    assert "supervisor               | supervisor up" in lines     # one prefix width for every process
    assert len([ln for ln in lines if ln.startswith("controller ")]) == 10   # 10 lines of each of several
    r = CliRunner().invoke(cli, ["lab", "logs", "nosuch", "--state-dir", str(sd)])
    assert r.exit_code == 1 and "no log named 'nosuch'" in r.output   # an unknown name is a problem
    r = CliRunner().invoke(cli, ["lab", "logs", "--state-dir", str(tmp_path / "none")])
    assert r.exit_code == 2 and "meshfed lab up" in r.output
    r = CliRunner().invoke(cli, ["lab", "logs", "--list", "--state-dir", str(sd)])
    assert r.exit_code == 0 and "ztunnel-east-node-1.log" in r.stdout
