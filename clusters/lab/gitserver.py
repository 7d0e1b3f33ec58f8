"""The lab's Git server: the fleet repo over smart HTTP, clone and push, with a push callback.

`dulwich.web` serves the smart HTTP protocol from Python (no `git` daemon, no CGI); this module is
the only one in the lab that imports dulwich. The server binds to a loopback (or lab-internal)
address only. After a successful `git-receive-pack` (a push), `on_push(ref -> sha)` is called so
the lab can trigger an immediate reconcile instead of waiting for the controller's poll.

Pushes need credentials: HTTP basic auth (over loopback only), compared in constant time; a push
without them is answered 401 with a `WWW-Authenticate: Basic` challenge, which is what makes `git`
ask its credential helper. `write_credentials` writes them for `git`'s own `store` helper (one
`http://user:password@host:port` line, 0600), so a push is
`git -c credential.helper='store --file=<file>' push`. Clone and fetch stay anonymous: the
controller follows the repository without credentials, as it would a read-only deploy URL.

`init_fleet_repo()` turns a fleet directory into a bare repository with one commit (using the
`git` CLI in a short-lived process), which is what the server serves and the controller follows.
"""

from __future__ import annotations

import base64
import hmac
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

PushCallback = Callable[[Mapping[str, str]], None]
GIT_USER = "lab"


def new_credentials() -> tuple[str, str]:
    """(user, password) for the lab's Git server; URL-safe, so they fit a credential-store line."""
    return GIT_USER, secrets.token_urlsafe(24)


def write_credentials(path: Path, url: str, credentials: tuple[str, str]) -> None:
    """The credentials as `git credential-store` reads them: 0600, written atomically."""
    from urllib.parse import urlsplit

    from ztunnel.api.secret_files import write_secret

    parts = urlsplit(url)
    user, password = credentials
    write_secret(path, f"{parts.scheme}://{user}:{password}@{parts.netloc}\n".encode())


def credential_helper_args(credentials_file: Path | str) -> list[str]:
    """`git` arguments that make it answer the server's challenge from `credentials_file`."""
    return ["-c", f"credential.helper=store --file={credentials_file}"]


class GitServerError(RuntimeError):
    pass


def _git(args: list[str], cwd: Path | None = None) -> str:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_AUTHOR_NAME="meshfed lab", GIT_AUTHOR_EMAIL="lab@meshfed.dev",
               GIT_COMMITTER_NAME="meshfed lab", GIT_COMMITTER_EMAIL="lab@meshfed.dev")
    r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        raise GitServerError(f"git {' '.join(args)} failed: {r.stderr.strip()[:500]}")
    return r.stdout


def init_fleet_repo(fleet_dir: Path, bare_repo: Path, branch: str = "main") -> str:
    """Create `bare_repo` holding `fleet_dir` as one commit on `branch` (or keep an existing repo).

    If `fleet_dir` is itself a Git work tree, its history is cloned instead. Returns the head sha.
    """
    if (bare_repo / "HEAD").exists():
        return _git(["rev-parse", branch], cwd=bare_repo).strip()
    bare_repo.parent.mkdir(parents=True, exist_ok=True)
    if (fleet_dir / ".git").exists():
        _git(["clone", "--bare", "--quiet", str(fleet_dir), str(bare_repo)])
    else:
        _git(["init", "--bare", "--quiet", "-b", branch, str(bare_repo)])
        with tempfile.TemporaryDirectory(prefix="meshfed-fleet-") as tmp:
            work = Path(tmp) / "w"
            shutil.copytree(fleet_dir, work)
            _git(["init", "--quiet", "-b", branch], cwd=work)
            _git(["add", "-A"], cwd=work)
            _git(["commit", "--quiet", "-m", "Initial fleet from " + fleet_dir.name], cwd=work)
            _git(["push", "--quiet", str(bare_repo), f"{branch}:{branch}"], cwd=work)
    _git(["config", "http.receivepack", "true"], cwd=bare_repo)
    return _git(["rev-parse", "HEAD"], cwd=bare_repo).strip()


def read_refs(bare_repo: Path) -> dict[str, str]:
    out = _git(["for-each-ref", "--format=%(refname) %(objectname)"], cwd=bare_repo)
    refs: dict[str, str] = {}
    for line in out.splitlines():
        if line:
            ref, sha = line.split(" ", 1)
            refs[ref] = sha
    return refs


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class GitServer:
    """Smart HTTP for one bare repository at `http://HOST:PORT/<name>`.

    Invariants: `url` is valid between `start()` and `stop()`; `on_push` runs after the pack has
    been received and the refs updated, on the server thread, never concurrently with itself.
    """

    def __init__(self, bare_repo: Path, host: str = "127.0.0.1", port: int = 0, name: str = "fleet.git",
                 on_push: PushCallback | None = None, credentials: tuple[str, str] | None = None) -> None:
        if credentials is None:
            raise ValueError("the lab's Git server takes pushes with credentials only: pass (user, password) "
                             "(new_credentials())")
        self.bare_repo, self.host, self.port, self.name = bare_repo, host, port, name
        self.on_push = on_push
        self.pushes = 0
        self.refused_pushes = 0
        self._expected_auth = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _app(self) -> Callable[..., Iterable[bytes]]:
        from dulwich.repo import Repo
        from dulwich.server import DictBackend
        from dulwich.web import make_wsgi_chain

        backend = DictBackend({f"/{self.name}": Repo(str(self.bare_repo))})
        inner = make_wsgi_chain(backend)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path, query = environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", "")
            is_push = path.endswith("/git-receive-pack") and environ.get("REQUEST_METHOD") == "POST"
            wants_push = is_push or (path.endswith("/info/refs") and "service=git-receive-pack" in query)
            if wants_push and not self._authorized(environ.get("HTTP_AUTHORIZATION", "")):
                self.refused_pushes += 1
                why = b"pushing to the lab's fleet repo needs its credentials (lab.json: git_credentials_file)\n"
                start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="meshfed lab"'),
                                                    ("Content-Type", "text/plain"),
                                                    ("Content-Length", str(len(why)))])
                return [why]
            body = list(inner(environ, start_response))
            if is_push and self.on_push is not None:
                with self._lock:
                    self.pushes += 1
                    try:
                        self.on_push(read_refs(self.bare_repo))
                    except Exception:  # a failing callback must not break the push itself
                        pass
            return body

        return app

    def _authorized(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "basic" and hmac.compare_digest(value.strip().encode(), self._expected_auth.encode())

    def start(self) -> GitServer:
        self._server = make_server(self.host, self.port, self._app(), handler_class=_QuietHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="lab-git", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/{self.name}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
