"""Host-side loopback doors into the sandbox (for kubectl, git clone and the controller's API).

The sandbox has its own network stack, so its 127.0.0.1 is not the host's. The launcher hands the
supervisor an open descriptor of the host's network namespace; the portal creates its listening
sockets *inside* that namespace (a socket keeps the namespace it was created in) and relays each
accepted connection to a target dialled from the sandbox. It binds 127.0.0.1 only, and it lives in
the sandbox's PID namespace, so it vanishes with the lab.

Each door keeps the same port number on both sides: the API server listens on 127.0.0.1:P in the
sandbox and the portal on 127.0.0.1:P on the host, so one kubeconfig is valid in both places.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading

from clusters.lab.netns import in_fd_netns


class Portal:
    """Invariants: every listener is bound to 127.0.0.1 in the host namespace; relays run on one
    event loop thread that never changes namespace (so dialled sockets are in the sandbox)."""

    def __init__(self, host_netns_fd: int) -> None:
        self._fd = host_netns_fd
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lab-portal", daemon=True)
        self._servers: list[asyncio.base_events.Server] = []
        self.doors: dict[int, tuple[str, int]] = {}
        self._thread.start()

    def reserve(self, port: int = 0) -> socket.socket:
        """A listening socket on the host's 127.0.0.1 (port 0 = any free port)."""
        with in_fd_netns(self._fd):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(128)
        return s

    def open_door(self, listener: socket.socket, target: tuple[str, int]) -> int:
        port = int(listener.getsockname()[1])

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                ur, uw = await asyncio.open_connection(*target)
            except OSError:
                writer.close()
                return

            async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                try:
                    while data := await r.read(65536):
                        w.write(data)
                        await w.drain()
                    with contextlib.suppress(OSError):
                        w.write_eof()
                except OSError:
                    w.close()

            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(pump(reader, uw))
                    tg.create_task(pump(ur, writer))
            finally:
                uw.close()
                writer.close()

        async def start() -> asyncio.base_events.Server:
            return await asyncio.start_server(relay, sock=listener)

        self._servers.append(asyncio.run_coroutine_threadsafe(start(), self._loop).result(5))
        self.doors[port] = target
        return port

    def close(self) -> None:
        for s in self._servers:
            self._loop.call_soon_threadsafe(s.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(2)
