"""One logging configuration for every meshfed process: `meshfed` (the CLI and the controller, and
through it the controller's Ray workers), `python -m ztunnel`, and the lab's processes.

    configure(level="info", fmt="text")      # --log-level, --log-format
    configure_from_env(default_level="info")  # $MESHFED_LOG_LEVEL, $MESHFED_LOG_FORMAT

Library modules only ever do `log = logging.getLogger(__name__)` and log; nothing below an entry
point configures handlers. This module installs exactly one handler on the root logger (calling
`configure` again replaces it, so a CLI option given twice does not double every line).

Formats:
- `text`: `2026-11-26T08:19:35.123Z INFO  federation.controller.reconciler: commit 646acd03 applied ...`
- `json`: one compact object per line, `{"ts":"2026-11-26T08:19:35.123Z","level":"INFO",
  "logger":"federation.controller.reconciler","msg":"commit 646acd03 applied ...","event":"CommitApplied",...}`.
  The structured fields a call passes as `extra={"fields": {...}}` are merged in at the top level
  (`event` names the state change, in the past tense like the core's events), so a log shipper can
  filter on them without parsing the message. Keys of the envelope (ts, level, logger, msg) win.

Secrets never reach a log line: every rendered line (message, fields, traceback) goes through
`redact`, which masks PEM private keys, bearer tokens, and values of `token=`/`password=`-style
pairs. It is a safety net, not a licence: code must not pass secrets to the logger at all.

Peers never write our log lines: every string a peer chose (a proxy id in a refused request, a
request path, a NACK's error text) goes through `printable` before it reaches a message, so a
newline cannot start a forged record and an escape sequence cannot rewrite an operator's
terminal; it is also cut to `PRINTABLE_MAX_CHARS`, so one request cannot write megabytes. As a
net under that rule, `TextFormatter` escapes the control characters other than newline and tab in
every message (a CR or an ESC is never ours); a newline it must keep (tracebacks, our multi-line
messages), so for those the call sites' `printable` is the defence. JSON lines are escaped by the
encoder.

Third-party libraries that log at DEBUG on every frame or request (h2/hpack: O(payload) per frame;
urllib3, kubernetes, aiohttp.access, asyncio) are held at WARNING whatever the level: `--log-level
debug` is for our code.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
ENV_LEVEL = "MESHFED_LOG_LEVEL"
ENV_FORMAT = "MESHFED_LOG_FORMAT"

# Loggers of libraries that are too chatty below WARNING (per frame, per request, per watch event).
QUIET_LIBRARIES = ("h2", "hpack", "hyperframe", "urllib3", "kubernetes", "aiohttp.access", "aiohttp.server",
                   "asyncio", "grpc", "git", "filelock", "kmock")

# Loggers whose warnings repeat what our own code reports once: urllib3 warns on every retry of
# every request to an API server that is down (the discovery logs the failure once per error).
RETRY_NOISE = ("urllib3.connectionpool",)

_ENVELOPE = ("ts", "level", "logger", "msg")

_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(-----END \1PRIVATE KEY-----|\Z)", re.S),
     "[REDACTED PRIVATE KEY]"),
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+"), r"\1 [REDACTED]"),
    (re.compile(r"(?i)\b((?:[a-z_-]*token|password|passwd|secret|api[_-]?key|authorization)\"?\s*[=:]\s*\"?)"
                r"[^\s\"',;&]+"), r"\1[REDACTED]"),
)


PRINTABLE_MAX_CHARS = 256
# C0 and C1 controls, DEL, and the Unicode line/paragraph separators and bidi overrides that make a
# terminal or an editor show something other than what was written
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\\]")
_CONTROL_BUT_NEWLINE_AND_TAB = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    return _SHORT_ESCAPES.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def printable(value: object, max_chars: int = PRINTABLE_MAX_CHARS) -> str:
    """A peer-supplied value as one safe piece of a log line: control characters (newline, CR,
    ESC...), line separators and bidi overrides as backslash escapes (a backslash doubled, so the
    escaped text reads back unambiguously), cut to `max_chars` with the size of what was cut.
    Every string a peer chose goes through here before it reaches a log message."""
    text = value if isinstance(value, str) else str(value)
    cut = len(text) - max_chars
    if cut > 0:
        text = text[:max_chars]
    text = _UNPRINTABLE.sub(_escape_char, text)
    return text + f"...({cut} more characters)" if cut > 0 else text


def redact(text: str) -> str:
    """`text` with private keys, bearer tokens and `token=...`-style values masked."""
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: "[REDACTED]" if _secret_key(str(k)) else _redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_value(v) for v in value]
    return value


def _secret_key(key: str) -> bool:
    k = key.lower().replace("-", "_")
    return k.endswith("token") or k in ("password", "secret", "private_key", "key_pem", "authorization")


def _timestamp(created_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created_s)) + f".{int(created_s % 1 * 1000):03d}Z"


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a call attached (`extra={"fields": {...}}`), redacted."""
    raw = getattr(record, "fields", None)
    if not isinstance(raw, Mapping):
        return {}
    return {str(k): "[REDACTED]" if _secret_key(str(k)) else _redact_value(v)
            for k, v in raw.items() if str(k) not in _ENVELOPE}


class TextFormatter(logging.Formatter):
    """`<UTC time> <LEVEL> <logger>: <message>` (+ the traceback), one record per line."""

    def format(self, record: logging.LogRecord) -> str:
        message = _CONTROL_BUT_NEWLINE_AND_TAB.sub(_escape_char, record.getMessage())
        line = f"{_timestamp(record.created)} {record.levelname:<7} {record.name}: {message}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One compact JSON object per record (see the module docstring for the keys)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": _timestamp(record.created), "level": record.levelname, "logger": record.name,
                               "msg": redact(record.getMessage())}
        doc.update(fields_of(record))
        if record.exc_info:
            doc["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(doc, separators=(",", ":"), default=str)


class _MeshfedHandler(logging.Handler):
    """The one handler `configure` owns (configuring again replaces it). Without an explicit
    stream it writes to whatever `sys.stderr` is at the time of the record, so a caller that swaps
    stderr (a test runner, click's CliRunner) never leaves it writing to a closed file."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self._stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            stream = self._stream if self._stream is not None else sys.stderr
            stream.write(line + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


_current: tuple[str, str] | None = None


def current() -> tuple[str, str] | None:
    """(level, format) of the last `configure` in this process, None before any: what a process
    hands on to the processes it starts (the controller to its Ray workers)."""
    return _current


def configure(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """Install the one meshfed handler on the root logger (replacing an earlier one); returns it.
    It writes to `stream`, or to the current stderr.

    `level` is one of LEVELS (case-insensitive), `fmt` one of FORMATS; anything else raises
    ValueError naming the choices (the CLIs validate first, so this is for programmatic callers)."""
    lvl, form = level.lower(), fmt.lower()
    if lvl not in LEVELS:
        raise ValueError(f"log level {level!r}: use one of {', '.join(LEVELS)}")
    if form not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _MeshfedHandler):
            root.removeHandler(h)
    handler = _MeshfedHandler(stream)
    handler.setFormatter(JsonFormatter() if form == "json" else TextFormatter())
    root.addHandler(handler)
    numeric = getattr(logging, lvl.upper())
    root.setLevel(numeric)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    for name in RETRY_NOISE:
        logging.getLogger(name).setLevel(max(numeric, logging.ERROR))
    logging.captureWarnings(True)
    global _current
    _current = (lvl, form)
    return handler


def configure_from_env(default_level: str = "info", default_format: str = "text",
                       stream: TextIO | None = None) -> logging.Handler:
    """`configure` from $MESHFED_LOG_LEVEL / $MESHFED_LOG_FORMAT (how the controller hands its
    settings to its Ray workers, and a parent process to its children); unknown values fall back
    to the defaults rather than stop a worker from starting."""
    level = os.environ.get(ENV_LEVEL, "").lower() or default_level
    fmt = os.environ.get(ENV_FORMAT, "").lower() or default_format
    return configure(level if level in LEVELS else default_level, fmt if fmt in FORMATS else default_format, stream)


KV_MAX_CHARS = 4096   # one field of an event's text rendering (its JSON rendering keeps it whole)


def _kv(value: Any) -> str:
    # an event's string fields are often a peer's (an SNI, a client address, a proxy id): escaped
    # like every peer string; other values are JSON, which escapes its strings itself
    text = printable(value, KV_MAX_CHARS) if isinstance(value, str) else json.dumps(value, default=str,
                                                                                    separators=(",", ":"))
    return f'"{text}"' if (" " in text or not text) else text


def render_kv(fields: Mapping[str, Any], skip: tuple[str, ...] = ("kind",)) -> str:
    """`applied=true revision=646acd03 reason="from the controller"`: fields as a text message."""
    return " ".join(f"{k}={_kv(v)}" for k, v in fields.items() if k not in skip)


def event_log(logger: logging.Logger, level_of: Callable[[Mapping[str, Any]], int] | None = None
              ) -> Callable[..., None]:
    """An `emit(kind=..., **fields)` callable (the shape the proxies' components take as `log`)
    that logs through `logger`: the message is `<kind>: k=v ...`, the fields go along for JSON."""
    def emit(**fields: Any) -> None:
        level = level_of(fields) if level_of is not None else logging.INFO
        if logger.isEnabledFor(level):
            kind = str(fields.get("kind", "event"))
            logger.log(level, f"{kind}: {render_kv(fields)}", extra={"fields": fields})
    return emit


def reset() -> None:
    """Remove the meshfed handler and forget the configuration (tests)."""
    global _current
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _MeshfedHandler):
            root.removeHandler(h)
    _current = None
