"""Bootstrap tokens for hand-provisioned proxies: how a proxy with no certificate and no Kubernetes
ServiceAccount gets its first one. The one owner and the one writer of `<state_dir>/bootstrap-tokens.json`.

On Kubernetes (and in the lab) a proxy bootstraps with its pod's projected ServiceAccount token,
which the controller checks with a TokenReview against the proxy's own cluster
(`federation.controller.signing.check_service_account`). A proxy provisioned by hand (a VM, a
bare-metal gateway) gets one of these instead, like `kubeadm token create`:

    meshfed controller bootstrap-token --proxy-id ztunnel/east/node-7 [--ttl 1h]

A token is bound to one proxy id (it buys that proxy's own identity and nothing else), short-lived
(1 h by default, at most `MAX_TTL_S`), and single-use: it is consumed by the first certificate it
obtains (a proxy then renews over mTLS, and after a long outage with the projected token or a new
one). Creating a token for a proxy replaces any unused one it had; when a cluster leaves the fleet
(the end of its drain, `federation.core.removal`) the unused tokens of its proxies are revoked. The file keeps only SHA-256
digests of tokens (a copy of the file buys nothing), each proxy's latest, pruned of expired ones, so
it is bounded by the number of proxies; presented tokens are compared in constant time
(`hmac.compare_digest` of the digests). Writes are serialized by an exclusive lock on
`bootstrap-tokens.lock` (the command and a running controller may race) and go through
`ztunnel.api.secret_files` (0600 from creation, atomic, never through a link).

Tokens of the earlier format (one reusable, never-expiring token per cluster) are not honoured:
such a file reads as empty and is replaced at the next write.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import math
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztunnel.api.clock import calendar_now
from ztunnel.api.identity import ProxyId
from ztunnel.api.secret_files import SecretFileError, make_private_dir, read_secret, write_secret

BOOTSTRAP_TOKENS_FILE = "bootstrap-tokens.json"   # proxy id -> digest, expiry (0600)
LOCK_FILE = "bootstrap-tokens.lock"
TOKEN_BYTES = 24
FORMAT = 2
DEFAULT_TTL_S = 3600.0
MAX_TTL_S = 7 * 86400.0
MAX_TOKENS = 100_000          # one per proxy at most; a bound against a runaway script


class BootstrapTokenError(RuntimeError):
    """The tokens cannot be read or written; the message names the file and the fix."""


def proxy_cluster(proxy_id: str) -> str:
    """`ztunnel/east/node-1`, `gateway/east`, `waypoint/east/shop/waypoint` -> `east`."""
    return ProxyId.parse(proxy_id).cluster   # IdentityError (a ValueError) names the shapes


def _cluster_or_none(proxy_id: str) -> str | None:
    try:
        return proxy_cluster(proxy_id)
    except ValueError:
        return None   # never written by `create`; such an entry can buy nothing anyway


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenRecord:
    digest: str           # SHA-256 of the token, hex
    created_at_s: float
    expires_at_s: float

    def as_dict(self) -> dict[str, Any]:
        return {"sha256": self.digest, "created_at_s": self.created_at_s, "expires_at_s": self.expires_at_s}


class BootstrapTokens:
    """Invariants: at most one token per proxy id; only digests are stored; an entry is removed
    when its token is used or expires; only this class writes the file."""

    def __init__(self, state_dir: str | os.PathLike[str], clock: Callable[[], float] = calendar_now) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / BOOTSTRAP_TOKENS_FILE
        self.clock = clock

    # --- writing -------------------------------------------------------------------------------

    def create(self, proxy_id: str, ttl_s: float = DEFAULT_TTL_S) -> str:
        """A new token for `proxy_id` (replacing an unused one), valid for `ttl_s`; the token itself
        is returned once and never stored."""
        proxy_cluster(proxy_id)
        if not (0 < ttl_s <= MAX_TTL_S) or math.isnan(ttl_s):
            raise ValueError(f"a bootstrap token lives between 1 s and {MAX_TTL_S / 86400:.0f} days, not "
                             f"{ttl_s:g} s: it only has to last until the proxy's first certificate")
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = self.clock()
        with self._locked():
            records = self._live(self._read(), now)
            if proxy_id not in records and len(records) >= MAX_TOKENS:
                raise BootstrapTokenError(f"{self.path} already holds {MAX_TOKENS} unused tokens; let them expire "
                                          "or remove the file (unused tokens become invalid)")
            records[proxy_id] = TokenRecord(_digest(token), now, now + ttl_s)
            self._write(records)
        return token

    def prune(self) -> int:
        """Remove expired tokens; how many were removed (the controller calls it when it starts)."""
        now = self.clock()
        with self._locked():
            records = self._read()
            live = self._live(records, now)
            if len(live) != len(records) or (self.path.exists() and not self._is_current_format()):
                self._write(live)
            return len(records) - len(live)

    def revoke(self, clusters: Iterable[str]) -> list[str]:
        """Remove the unused tokens of the proxies of `clusters` (they left the fleet): those proxies
        can no longer obtain a first certificate (expired tokens go too). Returns the proxy ids
        whose live token was removed."""
        gone = set(clusters)
        with self._locked():
            records = self._read()
            theirs = {p for p in records if _cluster_or_none(p) in gone}
            if not theirs:
                return []
            live = self._live(records, self.clock())
            self._write({p: r for p, r in live.items() if p not in theirs})
        return sorted(theirs & set(live))

    # --- checking ------------------------------------------------------------------------------

    def check(self, token: str, proxy_id: str) -> str:
        """"" when `token` is the live, unused token of `proxy_id`, else the reason (which never
        tells a token of another proxy from a wrong one). Constant time in the token."""
        if not token:
            return "no bootstrap token presented"
        rec = self._read().get(proxy_id)
        presented = _digest(token)
        # compare even when there is no record, so timing does not tell which proxy ids have one
        ok = hmac.compare_digest(presented, rec.digest if rec is not None else _digest(""))
        if rec is None or not ok:
            return (f"not a valid bootstrap token for {proxy_id} (tokens are per proxy id and single-use; "
                    f"create one with `meshfed controller bootstrap-token --proxy-id {proxy_id}`)")
        if self.clock() >= rec.expires_at_s:
            return (f"the bootstrap token of {proxy_id} expired at {rec.expires_at_s:.0f}; create a new one with "
                    f"`meshfed controller bootstrap-token --proxy-id {proxy_id}`")
        return ""

    def consume(self, token: str, proxy_id: str) -> bool:
        """Mark `token` used (it obtained a certificate): it will not buy another. False when it was
        no longer there (used or replaced meanwhile)."""
        with self._locked():
            records = self._read()
            rec = records.get(proxy_id)
            if rec is None or not hmac.compare_digest(_digest(token), rec.digest):
                return False
            del records[proxy_id]
            self._write(self._live(records, self.clock()))
        return True

    def pending(self) -> dict[str, float]:
        """Proxy id -> expiry of its unused token (status; no secrets)."""
        return {p: r.expires_at_s for p, r in sorted(self._live(self._read(), self.clock()).items())}

    # --- file ----------------------------------------------------------------------------------

    @staticmethod
    def _live(records: dict[str, TokenRecord], now_s: float) -> dict[str, TokenRecord]:
        return {p: r for p, r in records.items() if r.expires_at_s > now_s}

    def _is_current_format(self) -> bool:
        try:
            return bool(json.loads(read_secret(self.path)).get("format") == FORMAT)
        except (OSError, ValueError, AttributeError):
            return False

    def _read(self) -> dict[str, TokenRecord]:
        try:
            raw = read_secret(self.path)
        except FileNotFoundError:
            return {}
        except SecretFileError as e:
            raise BootstrapTokenError(f"bootstrap tokens unusable: {e}") from None
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise BootstrapTokenError(f"{self.path} is not JSON ({e}); remove it to start afresh (unused tokens "
                                      f"become invalid: create new ones)") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return {}  # the per-cluster, reusable tokens of the earlier format are not honoured
        out: dict[str, TokenRecord] = {}
        try:
            for pid, rec in dict(data.get("tokens") or {}).items():
                out[str(pid)] = TokenRecord(str(rec["sha256"]), float(rec["created_at_s"]), float(rec["expires_at_s"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BootstrapTokenError(f"{self.path} is damaged ({e}); remove it to start afresh (unused tokens "
                                      f"become invalid: create new ones)") from None
        return out

    def _write(self, records: dict[str, TokenRecord]) -> None:
        data = {"format": FORMAT, "tokens": {p: r.as_dict() for p, r in sorted(records.items())}}
        write_secret(self.path, json.dumps(data, indent=1, sort_keys=True).encode())

    @contextmanager
    def _locked(self) -> Iterator[None]:
        make_private_dir(self.state_dir)
        fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
