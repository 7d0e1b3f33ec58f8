"""The status API compares the bearer token in constant time (issue 11, item 3), on loopback: the
server's check goes through `federation.controller.api_token.token_matches`, whose comparison is
`hmac.compare_digest` of SHA-256 digests. The `hmac` that module sees is swapped for one that records what it
compares, so a server that compared the header any other way (`==`, `startswith`) would leave no
record. Wrong tokens of the right length and of another length are both refused.

(The status API's own tests live in test_status_api.py; this file only reuses its source.)
"""

from __future__ import annotations

import http.client
from types import SimpleNamespace

import pytest

from federation.controller import api_token
from federation.server.status_api import StatusServer
from tests.integration.test_status_api import TOKEN, Source
from tests.unit.controller.test_constant_time_tokens import RecordingCompare, same_length_wrong, sha256


def post_reconcile(port: int, token: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", "/api/v1/reconcile", body=b"",
                     headers={"Authorization": f"Bearer {token}", "Host": f"127.0.0.1:{port}"})
        return conn.getresponse().status
    finally:
        conn.close()


def test_the_server_checks_the_bearer_token_with_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = RecordingCompare()
    monkeypatch.setattr(api_token, "hmac", SimpleNamespace(compare_digest=rec))
    src = Source()
    srv = StatusServer(src, "127.0.0.1:0", token=TOKEN, log=lambda _e: None).start()
    try:
        wrong = [same_length_wrong(TOKEN), TOKEN + "x", TOKEN[:8]]
        assert [post_reconcile(srv.port, t) for t in wrong] == [401, 401, 401]
        assert src.triggered == 0
        assert post_reconcile(srv.port, TOKEN) == 202 and src.triggered == 1
    finally:
        srv.stop()
    assert [b for _a, b in rec.calls] == [sha256(t) for t in (*wrong, TOKEN)]
    assert all(a == sha256(TOKEN) for a, _b in rec.calls)
