"""The status API's bearer token: one secret per controller state directory.

`meshfed controller run` serves its status API (`federation.server.status_api`) with this token:
every write (`POST /api/v1/reconcile`) needs it, and so does every request when the API listens on
a non-loopback address. The state owner writes it once, 0600 and atomically
(`ztunnel.api.secret_files`), and keeps it across restarts; whoever may write to the controller —
an operator's `meshfed ... --token-file`, the lab's Git push hook — reads the same file.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from ztunnel.api.secret_files import SecretFileError, make_private_dir, read_secret, write_secret

STATUS_API_TOKEN_FILE = "status-api-token"
MIN_TOKEN_CHARS = 16


class ApiTokenError(RuntimeError):
    """The token file is missing, unsafe or empty; the message names the fix."""


def ensure_api_token(state_dir: str | Path) -> str:
    """The token of this state directory, created (0600) on first use."""
    path = Path(make_private_dir(state_dir)) / STATUS_API_TOKEN_FILE
    if not path.exists() and not path.is_symlink():
        write_secret(path, (secrets.token_urlsafe(32) + "\n").encode())
    return read_api_token(path)


def read_api_token(path: str | Path) -> str:
    """A token file written by `ensure_api_token` (or as carefully by an operator)."""
    try:
        token = read_secret(path, max_bytes=4096).decode("ascii", "replace").strip()
    except FileNotFoundError:
        raise ApiTokenError(f"no status API token at {path}: pass the controller's "
                            f"<state-dir>/{STATUS_API_TOKEN_FILE}") from None
    except SecretFileError as e:
        raise ApiTokenError(str(e)) from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ApiTokenError(f"{path} does not hold a token (one line of at least {MIN_TOKEN_CHARS} characters); "
                            f"delete it and restart the controller to create a new one")
    return token


def token_matches(expected: str, presented: str) -> bool:
    """Constant-time comparison: the SHA-256 digests of both are compared (`hmac.compare_digest`),
    so the time taken depends neither on where they differ nor on how long the presented one is
    (compare_digest returns at once on a length mismatch)."""
    return hmac.compare_digest(hashlib.sha256(expected.encode()).digest(), hashlib.sha256(presented.encode()).digest())
