"""Bootstrap tokens: how a proxy with no certificate yet gets its first one. The one owner and the
one writer of `<state_dir>/bootstrap-tokens.json`.

A proxy proves who it is to the certificate service (on the controller's bootstrap port, TLS
without a client certificate) with a token; the token says which cluster's proxies it may speak
for, and the CSR it accompanies may only name that proxy's own identity
(`federation.controller.signing`). After that first certificate the proxy renews over mTLS.

Everything that needs a token goes through this module: the controller when it starts (it creates
tokens for the clusters of the fleet and keeps existing ones), and `meshfed controller
bootstrap-token` — the command the lab (and an operator provisioning a node by hand) runs to get
the token of one proxy, like `kubeadm token create`. Writes are serialized by an exclusive lock
on `bootstrap-tokens.lock` (the command and a running controller may race) and go through
`ztunnel.api.secret_files` (0600 from creation, atomic, never through a link). Tokens are compared
in constant time.
"""

from __future__ import annotations

import fcntl
import hmac
import json
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from ztunnel.api.identity import parse_proxy_id
from ztunnel.api.secret_files import SecretFileError, make_private_dir, read_secret, write_secret

BOOTSTRAP_TOKENS_FILE = "bootstrap-tokens.json"   # cluster -> token (0600): hand to that cluster's proxies
LOCK_FILE = "bootstrap-tokens.lock"
TOKEN_BYTES = 24


class BootstrapTokenError(RuntimeError):
    """The tokens cannot be read or written; the message names the file and the fix."""


def proxy_cluster(proxy_id: str) -> str:
    """`ztunnel/east/node-1`, `gateway/east`, `waypoint/east/shop/waypoint` -> `east`."""
    return parse_proxy_id(proxy_id)[1]


class BootstrapTokens:
    """Invariants: the file maps each cluster to one token; a token, once written, stays until the
    file is removed (proxies that restart present it again); only this class writes the file."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / BOOTSTRAP_TOKENS_FILE
        self._by_cluster: dict[str, str] = {}

    # --- writing -------------------------------------------------------------------------------

    def ensure(self, clusters: Iterable[str]) -> Mapping[str, str]:
        """Tokens for `clusters` (created where missing, kept where present); cluster -> token."""
        wanted = sorted(set(clusters))
        with self._locked():
            tokens = self._read()
            missing = [c for c in wanted if c not in tokens]
            if missing:
                tokens.update({c: secrets.token_urlsafe(TOKEN_BYTES) for c in missing})
                write_secret(self.path, json.dumps(tokens, indent=1, sort_keys=True).encode())
        self._by_cluster = {c: tokens[c] for c in wanted}
        return dict(self._by_cluster)

    def revoke(self, clusters: Iterable[str]) -> list[str]:
        """Remove the tokens of `clusters` (they left the fleet): the file and the checks forget
        them. Returns the clusters whose token was removed."""
        gone = set(clusters)
        with self._locked():
            tokens = self._read()
            removed = sorted(gone & set(tokens))
            if removed:
                write_secret(self.path, json.dumps({c: t for c, t in tokens.items() if c not in gone}, indent=1,
                                                   sort_keys=True).encode())
        self._by_cluster = {c: t for c, t in self._by_cluster.items() if c not in gone}
        return removed

    def token_for_proxy(self, proxy_id: str) -> str:
        """The token a proxy presents (created if its cluster has none yet)."""
        cluster = proxy_cluster(proxy_id)
        return self.ensure([*self._by_cluster, cluster])[cluster]

    # --- checking ------------------------------------------------------------------------------

    def cluster_for(self, token: str) -> str | None:
        """The cluster whose proxies `token` may speak for, or None. Constant time in the token:
        every known token is compared, with `hmac.compare_digest`."""
        found: str | None = None
        presented = token.encode()
        for cluster, known in sorted(self._by_cluster.items()):
            if hmac.compare_digest(presented, known.encode()) and token:
                found = cluster
        return found

    # --- file ----------------------------------------------------------------------------------

    def _read(self) -> dict[str, str]:
        try:
            raw = read_secret(self.path)
        except FileNotFoundError:
            return {}
        except SecretFileError as e:
            raise BootstrapTokenError(f"bootstrap tokens unusable: {e}") from None
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise BootstrapTokenError(f"{self.path} is not JSON ({e}); remove it to issue new tokens (proxies "
                                      f"without a certificate will need the new ones)") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise BootstrapTokenError(f"{self.path} must map cluster names to tokens; remove it to issue new ones")
        return dict(data)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        make_private_dir(self.state_dir)
        fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
