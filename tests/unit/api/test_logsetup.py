"""The one logging set-up (`ztunnel.api.logsetup`): formats, structured fields, secrets masked,
one handler however often it is configured, the environment as the parents' channel."""

from __future__ import annotations

import io
import json
import logging

import pytest

from ztunnel.api import logsetup

KEY_PEM = ("-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n"
           "-----END PRIVATE KEY-----\n")


def lines(buf: io.StringIO) -> list[str]:
    return [ln for ln in buf.getvalue().splitlines() if ln]


def test_json_lines_carry_the_envelope_and_the_fields() -> None:
    buf = io.StringIO()
    logsetup.configure("info", "json", buf)
    logging.getLogger("federation.controller.reconciler").info(
        "commit %s applied", "646acd03", extra={"fields": {"event": "CommitApplied", "revision": "646acd03" * 5,
                                                           "msg": "not the message", "proxies": 9}})
    (line,) = lines(buf)
    doc = json.loads(line)
    assert doc["level"] == "INFO" and doc["logger"] == "federation.controller.reconciler"
    assert doc["msg"] == "commit 646acd03 applied"           # the envelope wins over a field of that name
    assert doc["event"] == "CommitApplied" and doc["proxies"] == 9
    assert doc["ts"].endswith("Z") and "T" in doc["ts"]
    assert '"event":"CommitApplied"' in line                 # compact: greppable as `"key":"value"`


def test_text_lines_are_time_level_logger_message() -> None:
    buf = io.StringIO()
    logsetup.configure("warning", "text", buf)
    log = logging.getLogger("ztunnel.xds.client")
    log.info("not shown at warning")
    log.warning("config stream lost")
    (line,) = lines(buf)
    ts, level, name, *rest = line.split()
    assert ts.endswith("Z") and level == "WARNING" and name == "ztunnel.xds.client:"
    assert " ".join(rest) == "config stream lost"


def test_a_traceback_is_part_of_the_record() -> None:
    buf = io.StringIO()
    logsetup.configure("info", "json", buf)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("x").exception("step failed")
    doc = json.loads(lines(buf)[0])
    assert "RuntimeError: boom" in doc["exc"]


@pytest.mark.parametrize("fmt", logsetup.FORMATS)
def test_secrets_never_reach_a_line(fmt: str) -> None:
    buf = io.StringIO()
    logsetup.configure("debug", fmt, buf)
    log = logging.getLogger("federation.server.status_api")
    log.info("key %s", KEY_PEM)
    log.info("Authorization: Bearer abc.def-123 from 10.0.0.1")
    log.info("bootstrap token=s3cr3tvalue; password: hunter2", extra={"fields": {
        "bootstrap_token": "s3cr3tvalue", "nested": {"api_key": "k", "ok": "fine"}, "pem": KEY_PEM}})
    out = buf.getvalue()
    for secret in ("MIGHAgEAMBMG", "abc.def-123", "s3cr3tvalue", "hunter2"):
        assert secret not in out, (secret, out)
    assert "[REDACTED PRIVATE KEY]" in out
    if fmt == "json":  # fields are rendered in JSON only: the harmless one survives, the secret keys do not
        assert '"ok":"fine"' in out and '"bootstrap_token":"[REDACTED]"' in out


def test_configuring_again_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    logsetup.configure("info", "text", first)
    logsetup.configure("info", "json", second)
    logging.getLogger("a").info("once")
    assert lines(first) == [] and len(lines(second)) == 1
    ours = [h for h in logging.getLogger().handlers if type(h).__name__ == "_MeshfedHandler"]
    assert len(ours) == 1
    assert logsetup.current() == ("info", "json")


def test_without_a_stream_it_follows_the_current_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    logsetup.configure("info", "text")
    swapped = io.StringIO()
    monkeypatch.setattr("sys.stderr", swapped)
    logging.getLogger("a").info("to the stderr of now")
    assert "to the stderr of now" in swapped.getvalue()


def test_chatty_libraries_stay_at_warning_and_retries_at_error_even_at_debug() -> None:
    buf = io.StringIO()
    logsetup.configure("debug", "text", buf)
    logging.getLogger("h2.connection").debug("frame")
    logging.getLogger("urllib3.connectionpool").warning("Retrying (Retry(total=2)) after connection broken")
    logging.getLogger("federation.x").debug("ours")
    assert [ln.split()[-1] for ln in lines(buf)] == ["ours"]


def test_bad_names_are_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="debug, info, warning, error"):
        logsetup.configure("verbose", "text")
    with pytest.raises(ValueError, match="text, json"):
        logsetup.configure("info", "xml")


def test_from_the_environment_with_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(logsetup.ENV_LEVEL, "DEBUG")
    monkeypatch.setenv(logsetup.ENV_FORMAT, "json")
    logsetup.configure_from_env(stream=io.StringIO())
    assert logsetup.current() == ("debug", "json")
    monkeypatch.setenv(logsetup.ENV_LEVEL, "chatty")      # a bad value never stops a worker from starting
    monkeypatch.delenv(logsetup.ENV_FORMAT)
    logsetup.configure_from_env(default_level="warning", stream=io.StringIO())
    assert logsetup.current() == ("warning", "text")


def test_event_log_turns_kind_and_fields_into_a_line() -> None:
    buf = io.StringIO()
    logsetup.configure("info", "json", buf)
    emit = logsetup.event_log(logging.getLogger("ztunnel.__main__"),
                              lambda f: logging.WARNING if f.get("applied") is False else logging.INFO)
    emit(kind="config", source="controller", applied=True, revision="abc")
    emit(kind="capture", applied=False, error="iptables: Permission denied")
    a, b = (json.loads(ln) for ln in lines(buf))
    assert a["msg"] == "config: source=controller applied=true revision=abc" and a["kind"] == "config"
    assert b["level"] == "WARNING" and b["msg"] == 'capture: applied=false error="iptables: Permission denied"'


def test_printable_escapes_what_a_peer_could_forge_a_line_or_a_terminal_with() -> None:
    """Review finding 6: a peer-chosen string (a proxy id, a request path) must not start a new log
    record, move a terminal's cursor, or flip the text's direction; a backslash is doubled so the
    escape is unambiguous, and a huge value is cut (one request cannot write megabytes)."""
    p = logsetup.printable
    assert p("ztunnel/east/node-1") == "ztunnel/east/node-1"
    assert p("a\nb\r\nc") == "a\\nb\\r\\nc"
    assert p("/x\x1b[2K\x1b[1Gfake") == "/x\\x1b[2K\\x1b[1Gfake"
    assert p("line\u2028sep\u202egnp.exe") == "line\\u2028sep\\u202egnp.exe"
    assert p("a\\nb") == "a\\\\nb"            # a literal backslash-n stays distinguishable from a newline
    assert p("\x00\x7f\x85") == "\\x00\\x7f\\x85"
    long = p("x" * 10_000)
    assert long.startswith("x" * logsetup.PRINTABLE_MAX_CHARS) and long.endswith(
        f"...({10_000 - logsetup.PRINTABLE_MAX_CHARS} more characters)")
    assert "\n" not in p("é ünïcode ok\n") and p("é ünïcode ok") == "é ünïcode ok"


def test_text_lines_never_carry_a_raw_cr_or_escape_sequence() -> None:
    """The formatter's net under `printable`: whatever a call site forgot, CR and ESC are escaped
    (a newline is kept: tracebacks and our own multi-line messages need it)."""
    buf = io.StringIO()
    logsetup.configure("info", "text", buf)
    logging.getLogger("federation.server.status_api.access").info("GET %s 404", "/x\r\x1b[2Kfake-line")
    out = buf.getvalue()
    assert "\r" not in out and "\x1b" not in out and "/x\\r\\x1b[2Kfake-line" in out


def test_an_events_text_rendering_escapes_its_string_fields() -> None:
    """The proxies' events (`event_log`) carry peers' strings (an SNI, a client address): their
    text rendering goes through `printable`, so a field cannot end the line."""
    buf = io.StringIO()
    logsetup.configure("info", "text", buf)
    emit = logsetup.event_log(logging.getLogger("ztunnel.proxy.node"))
    emit(kind="connection", sni="a.example\n2026-12-03T00:00:00.000Z INFO fake", port=15008)
    (line,) = lines(buf)
    assert 'sni="a.example\\n2026-12-03T00:00:00.000Z INFO fake"' in line and "port=15008" in line
