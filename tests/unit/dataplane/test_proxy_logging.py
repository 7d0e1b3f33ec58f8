"""`python -m ztunnel` logs through the one set-up (issue 15): --log-level/--log-format, the
environment as the default (how the lab and the DaemonSet hand it down); connections go to the
access log stream, or without one at DEBUG on `ztunnel.access`."""

from __future__ import annotations

import io
import json
import logging

import pytest

from ztunnel.__main__ import build_parser
from ztunnel.api import logsetup
from ztunnel.proxy.admin import Telemetry

BASE = ["--config", "/dev/null", "--cert-dir", "/nonexistent"]


def test_flags_and_their_defaults_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(logsetup.ENV_LEVEL, raising=False)
    monkeypatch.delenv(logsetup.ENV_FORMAT, raising=False)
    a = build_parser().parse_args(BASE)
    assert (a.log_level, a.log_format, a.access_log) == ("info", "text", "stderr")
    monkeypatch.setenv(logsetup.ENV_LEVEL, "debug")
    monkeypatch.setenv(logsetup.ENV_FORMAT, "json")
    a = build_parser().parse_args(BASE)
    assert (a.log_level, a.log_format) == ("debug", "json")
    a = build_parser().parse_args([*BASE, "--log-level", "WARNING", "--log-format", "text"])
    assert (a.log_level, a.log_format) == ("warning", "text")
    with pytest.raises(SystemExit):
        build_parser().parse_args([*BASE, "--log-format", "xml"])


def test_connections_are_debug_events_are_info() -> None:
    buf = io.StringIO()
    logsetup.configure("info", "json", buf)
    t = Telemetry("ztunnel/east/node-1", None)
    t.log(kind="access", direction="outbound", backend="checkout", bytes_sent=10)
    t.log(kind="drain", connections=3)
    (line,) = [json.loads(ln) for ln in buf.getvalue().splitlines()]
    assert line["logger"] == "ztunnel.proxy.admin" and line["kind"] == "drain" and line["proxy"] == "ztunnel/east/node-1"
    logsetup.configure("debug", "json", buf)
    t.log(kind="access", direction="outbound", backend="checkout", bytes_sent=10)
    last = json.loads(buf.getvalue().splitlines()[-1])
    assert last["logger"] == "ztunnel.access" and last["level"] == "DEBUG" and last["bytes_sent"] == 10


def test_the_access_log_stream_gets_every_connection_and_the_log_none_of_them() -> None:
    stream, logged = io.StringIO(), io.StringIO()
    logsetup.configure("debug", "json", logged)
    t = Telemetry("p", stream)
    t.log(kind="access", backend="b")
    t.log(kind="EndpointEjected", service="s", key="k")
    assert [json.loads(ln)["kind"] for ln in stream.getvalue().splitlines()] == ["access", "EndpointEjected"]
    assert logged.getvalue() == ""   # one stderr, one line per record: not the same record twice
    assert logging.getLogger("ztunnel.access").isEnabledFor(logging.DEBUG)
