"""The lab's control socket: `control.sock` in the state directory, server and client.

Protocol: one JSON request per connection (the client half-closes after sending it), one JSON
answer, then the server closes. `{"ok": true, …}` or `{"ok": false, "error": "…"}`. A Unix socket
crosses network namespaces, so the host reaches the supervisor without entering the sandbox; the
socket is 0600 (only the lab's owner may fault it). Inside the sandbox it is no boundary: every lab
process (pods and proxies too) is (mapped) root in the same mount namespace and can reach it, and
`spawn` runs any argv — the lab is a test bed, not an isolation of its processes from each other.

Each connection is handled on its own thread, and the server holds no lock of its own while a
handler runs: a slow request (a fault that waits for a process to die, starting proxies) never
delays another. Streams (`meshfed lab exec`) do not come here at all: the host enters the
sandbox's namespaces itself (`clusters.lab.nsexec`).

Bounded: a request is at most MAX_REQUEST_BYTES and must arrive within REQUEST_READ_TIMEOUT_S;
at most MAX_IN_FLIGHT requests are handled at once, more are answered "busy" at once.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from clusters.lab import sandbox
from clusters.lab.layout import LabError

MAX_REQUEST_BYTES = 1 << 20
REQUEST_READ_TIMEOUT_S = 10.0
ANSWER_WRITE_TIMEOUT_S = 30.0
MAX_IN_FLIGHT = 32

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlServer:
    """Invariants: the socket file exists while `serve` runs and is removed when it returns; each
    accepted connection gets exactly one answer (or is closed on a malformed request)."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        self._sock: socket.socket | None = None

    def bind(self) -> None:
        self.path.unlink(missing_ok=True)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(self.path))
        os.chmod(self.path, 0o600)  # connecting needs write permission; the umask already denied it to others
        srv.listen(64)
        srv.settimeout(0.2)
        self._sock = srv

    def serve(self, stop: threading.Event) -> None:
        """Accept until `stop` is set; one thread per connection."""
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        try:
            while not stop.is_set():
                try:
                    conn, _ = self._sock.accept()
                except TimeoutError:
                    continue
                if not self._slots.acquire(blocking=False):
                    self._refuse(conn)  # inline and non-blocking: a flood of refusals costs no threads
                    continue
                threading.Thread(target=self._serve_one, args=(conn,), name="lab-control", daemon=True).start()
        finally:
            self._sock.close()
            self.path.unlink(missing_ok=True)

    def _refuse(self, conn: socket.socket) -> None:
        with conn:
            conn.setblocking(False)
            try:
                conn.send(json.dumps({"ok": False, "error": f"the lab is busy ({MAX_IN_FLIGHT} requests in "
                                                             f"flight); retry"}).encode())
            except OSError:
                pass  # a client that cannot take a few bytes now gets the closed connection as its answer

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            with conn:
                try:
                    request = _read_request(conn)
                except (OSError, ValueError) as e:
                    _send(conn, {"ok": False, "error": f"bad request: {e}"})
                    return
                try:
                    answer = self.handler(request)
                except LabError as e:
                    answer = {"ok": False, "error": str(e)}
                except Exception as e:
                    traceback.print_exc()
                    answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                _send(conn, answer)
        finally:
            self._slots.release()


def _read_request(conn: socket.socket) -> dict[str, Any]:
    # one deadline for the whole request: a per-recv timeout would let a client that trickles a
    # byte at a time hold one of the few slots indefinitely
    deadline = time.monotonic() + REQUEST_READ_TIMEOUT_S
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ValueError(f"the request did not arrive within {REQUEST_READ_TIMEOUT_S:g} s")
        conn.settimeout(left)
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST_BYTES:
            raise ValueError(f"more than {MAX_REQUEST_BYTES} bytes")
    request = json.loads(data)
    if not isinstance(request, dict):
        raise ValueError("a request is a JSON object")
    return request


def _send(conn: socket.socket, answer: Mapping[str, Any]) -> None:
    conn.settimeout(ANSWER_WRITE_TIMEOUT_S)
    try:
        conn.sendall(json.dumps(answer, default=str).encode())
    except OSError:
        pass  # the client went away; nothing to tell it


# --- the client ---------------------------------------------------------------------------------


def control_request(state_dir: Path, request: Mapping[str, Any], timeout_s: float = 30.0) -> dict[str, Any]:
    """Send one request to the lab in `state_dir`; the answer, or LabError with what to do."""
    path = state_dir / sandbox.CONTROL_SOCKET
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        s.connect(str(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    except FileNotFoundError:
        raise LabError(f"no lab is running in {state_dir} (no control socket); start one with `meshfed lab up`") from None
    except OSError as e:  # refused, reset, timed out: the supervisor is gone or stuck
        raise LabError(f"the lab in {state_dir} does not answer ({e}); `meshfed lab down` cleans it up") from None
    finally:
        s.close()
    try:
        answer: dict[str, Any] = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        raise LabError(f"the lab in {state_dir} sent a garbled answer; see {state_dir}/lab.log") from None
    if not answer.get("ok"):
        raise LabError(str(answer.get("error", "the lab refused the request")))
    return answer
