"""The status API's request log (issue 15): writes and errors at INFO, polls at DEBUG (a console
polls every second), secret-looking query values masked."""

from __future__ import annotations

import logging

import pytest

from federation.server.status_api import loggable_path, request_log_level


def test_writes_and_errors_are_info_polls_are_debug() -> None:
    assert request_log_level("POST", 200) == logging.INFO
    assert request_log_level("GET", 404) == logging.INFO
    assert request_log_level("GET", 500) == logging.INFO
    assert request_log_level("GET", 200) == logging.DEBUG


def test_secret_query_values_are_masked() -> None:
    assert loggable_path("/api/v1/status") == "/api/v1/status"
    assert loggable_path("/api/v1/explain?service=checkout&from=east") == "/api/v1/explain?service=checkout&from=east"
    masked = loggable_path("/x?access_token=abc123&service=s&api_key=k9&password=p")
    assert "abc123" not in masked and "k9" not in masked and masked.endswith("password=[REDACTED]")
    assert masked.startswith("/x?access_token=[REDACTED]&service=s&api_key=[REDACTED]")


def test_the_default_request_log_is_the_access_logger_with_main_s_entry(caplog: pytest.LogCaptureFixture) -> None:
    """Merging issue 11 part C: its per-request entry (with `authenticated`) is written through this
    branch's access logger: polls at DEBUG, refusals and writes at INFO, the event's fields."""
    from federation.server.status_api import _log_request

    caplog.set_level(logging.DEBUG, logger="federation.server.status_api.access")
    base = {"ts": 1.0, "client": "10.0.0.9", "ms": 1.5}
    _log_request({**base, "method": "GET", "path": "/api/v1/status", "status": 200, "authenticated": False})
    _log_request({**base, "method": "GET", "path": "/api/v1/status", "status": 401, "authenticated": False})
    _log_request({**base, "method": "POST", "path": "/api/v1/reconcile", "status": 202, "authenticated": True,
                  "query": "token=[REDACTED]"})
    poll, refused, write = caplog.records
    assert (poll.levelno, refused.levelno, write.levelno) == (logging.DEBUG, logging.INFO, logging.INFO)
    assert write.fields == {"event": "HttpRequest", "client": "10.0.0.9", "ms": 1.5, "method": "POST",  # type: ignore[attr-defined]
                            "path": "/api/v1/reconcile", "status": 202, "authenticated": True,
                            "query": "token=[REDACTED]"}
    assert write.getMessage() == "POST /api/v1/reconcile?token=[REDACTED] 202 1.5 ms from 10.0.0.9 (authenticated)"
