"""The status API's request log (issue 15): writes and errors at INFO, polls at DEBUG (a console
polls every second), secret-looking query values masked."""

from __future__ import annotations

import logging

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
