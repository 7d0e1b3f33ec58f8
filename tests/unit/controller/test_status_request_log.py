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


# --- who may talk to it: the Host check (review finding 3, DNS rebinding) ---------------------------



@pytest.mark.parametrize(("hosts", "version", "code"), [
    (["127.0.0.1:15014"], "HTTP/1.1", 0),
    (["localhost:15014"], "HTTP/1.1", 0),
    (["LOCALHOST."], "HTTP/1.1", 0),                      # case and one trailing dot are not a new name
    (["localhost:8080"], "HTTP/1.1", 0),                   # a relay's port (port-forward, the lab portal)
    (["status.example:15014"], "HTTP/1.1", 0),             # named with --status-allowed-host
    (["attacker.example:15014"], "HTTP/1.1", 421),         # the rebinding page's own name
    (["127.0.0.1.attacker.example"], "HTTP/1.1", 421),
    (["10.1.2.3:15014"], "HTTP/1.1", 421),                 # another address than the one it listens on
    (["[::1]:15014"], "HTTP/1.1", 421),
    ([], "HTTP/1.1", 400),                                 # RFC 9112: HTTP/1.1 needs exactly one Host
    (["localhost", "attacker.example"], "HTTP/1.1", 400),
    (["local host"], "HTTP/1.1", 400),
    (["localhost:80x"], "HTTP/1.1", 400),
    (["user@localhost"], "HTTP/1.1", 400),
    ([], "HTTP/1.0", 0),                                   # names nobody (no browser sends this)
])
def test_a_request_must_name_this_server_in_host(hosts: list[str], version: str, code: int) -> None:
    from federation.server.status_api import admitted_host_names, host_refusal

    admitted = admitted_host_names("127.0.0.1", ["status.example:9999"])
    got, why = host_refusal(hosts, version, admitted, any_ip_literal=False)
    assert got == code, why
    if code == 421:
        assert "--status-allowed-host" in why and "localhost" in why


def test_on_a_wildcard_address_any_ip_literal_passes_but_no_other_name() -> None:
    """A server on 0.0.0.0 (the in-cluster controller) is reached by the pod's IPs (the kubelet's
    probe sends the pod IP): an IP literal cannot be a rebinding name, so every one passes."""
    from federation.server.status_api import admitted_host_names, host_refusal

    admitted = admitted_host_names("0.0.0.0", [])
    assert admitted == frozenset({"localhost"})
    assert host_refusal(["10.244.1.7:15014"], "HTTP/1.1", admitted, any_ip_literal=True) == (0, "")
    assert host_refusal(["[fd00::7]:15014"], "HTTP/1.1", admitted, any_ip_literal=True) == (0, "")
    assert host_refusal(["evil.example:15014"], "HTTP/1.1", admitted, any_ip_literal=True)[0] == 421


def test_an_allowed_host_that_is_not_a_name_is_refused_with_the_fix() -> None:
    from federation.server.status_api import admitted_host_names

    with pytest.raises(ValueError, match="NAME or NAME:PORT"):
        admitted_host_names("127.0.0.1", ["http://x/"])
    assert "::1" in admitted_host_names("[::1]", [])


def test_the_in_cluster_controller_answers_to_its_service_names() -> None:
    from pathlib import Path

    from clusters.kind.manifests import controller_objects, status_service_names
    from gitops import load_worktree

    snap = load_worktree(Path(__file__).resolve().parents[3] / "examples" / "fleet")
    deploy = next(o for o in controller_objects(snap, "east", "https://git.example/fleet.git")
                  if o["kind"] == "Deployment")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    given = [args[i + 1] for i, a in enumerate(args) if a == "--status-allowed-host"]
    assert given == list(status_service_names())
    service = next(o for o in controller_objects(snap, "east", "https://git.example/fleet.git")
                   if o["kind"] == "Service" and o["metadata"]["name"].endswith("-status"))
    assert given[0] == service["metadata"]["name"]


def test_a_bad_time_argument_is_a_400_naming_it() -> None:
    """Review finding 8: `since_s=abc` was a 500 quoting the exception."""
    from federation.server.status_api import BadRequest, _float

    assert _float("1700000000.5") == 1700000000.5 and _float(None) is None and _float("") is None
    for bad in ("abc", "nan", "inf", "-1", "1e400"):
        with pytest.raises(BadRequest, match="since_s="):
            _float(bad)
