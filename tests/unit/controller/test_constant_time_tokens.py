"""Presented secrets are compared in constant time (issue 11, item 3): every comparison of a
bootstrap token or of the status API's bearer token goes through `hmac.compare_digest`. A `==`
stops at the first byte that differs, so how long a refusal takes would tell an attacker how much
of a guess is right.

The tests swap the `hmac` the module under test sees for one whose `compare_digest` records its
arguments (and still compares): a comparison written any other way leaves no record and fails them.
Both kinds of token are compared as SHA-256 digests, so even a guess of another length is compared
as two strings of one length (`compare_digest` returns at once on a length mismatch); a proxy id
with no token is compared too, so the time taken does not say which proxies have one.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from types import SimpleNamespace

import pytest

from federation.controller import api_token, bootstrap
from federation.controller.api_token import token_matches
from federation.controller.bootstrap import BootstrapTokens

NODE1, NODE2 = "ztunnel/east/node-1", "ztunnel/east/node-2"


class RecordingCompare:
    """`hmac.compare_digest` that remembers what it compared."""

    def __init__(self) -> None:
        self.calls: list[tuple[str | bytes, str | bytes]] = []

    def __call__(self, a: str | bytes, b: str | bytes) -> bool:
        self.calls.append((a, b))
        return hmac.compare_digest(a, b)  # type: ignore[type-var,arg-type]


def record_comparisons(monkeypatch: pytest.MonkeyPatch, module: object) -> RecordingCompare:
    rec = RecordingCompare()
    monkeypatch.setattr(module, "hmac", SimpleNamespace(compare_digest=rec))
    return rec


def sha256(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def same_length_wrong(token: str) -> str:
    return token[:-1] + ("A" if token[-1] != "A" else "B")


def test_the_status_api_token_is_compared_with_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = record_comparisons(monkeypatch, api_token)
    expected = "s3cret-status-api-token-of-43-characters-xx"
    wrong_same_length, wrong_length = same_length_wrong(expected), expected + "x"
    assert len(wrong_same_length) == len(expected) and len(wrong_length) != len(expected)

    assert not token_matches(expected, wrong_same_length)
    assert not token_matches(expected, wrong_length)
    assert not token_matches(expected, expected[:-1])   # a prefix of it
    assert not token_matches(expected, "")
    assert token_matches(expected, expected)
    presented = [b for _a, b in rec.calls]
    assert presented == [sha256(t) for t in (wrong_same_length, wrong_length, expected[:-1], "", expected)]
    # digests: the same length whatever was presented, so even the length is not timed
    assert all(a == sha256(expected) for a, _b in rec.calls)


def test_a_bootstrap_token_is_checked_with_compare_digest_on_digests(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = BootstrapTokens(tmp_path)
    token = tokens.create(NODE1)
    rec = record_comparisons(monkeypatch, bootstrap)

    assert tokens.check(same_length_wrong(token), NODE1)     # refused: a wrong token of the same length
    assert tokens.check(token + "x", NODE1)                  # refused: a longer one
    assert tokens.check(token[:-1], NODE1)                   # refused: a prefix
    assert tokens.check(token, NODE1) == ""
    assert len(rec.calls) == 4
    # what is compared is two SHA-256 digests: the same length whatever the guess's length
    assert all(len(a) == len(b) == 64 for a, b in rec.calls)


def test_a_proxy_without_a_token_is_compared_all_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = BootstrapTokens(tmp_path)
    token = tokens.create(NODE1)
    rec = record_comparisons(monkeypatch, bootstrap)
    assert tokens.check(token, NODE2)   # NODE2 has no token: refused, after the same comparison
    assert len(rec.calls) == 1


def test_using_up_a_token_compares_it_with_compare_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = BootstrapTokens(tmp_path)
    token = tokens.create(NODE1)
    rec = record_comparisons(monkeypatch, bootstrap)
    assert not tokens.consume(same_length_wrong(token), NODE1)
    assert not tokens.consume(token + "x", NODE1)
    assert len(rec.calls) == 2
    assert tokens.consume(token, NODE1)
    assert len(rec.calls) == 3
    assert not tokens.consume(token, NODE1)   # used up: nothing left to compare against
