"""Running the app under uvicorn: one process, SIGTERM/SIGINT drain the in-flight requests, exit 0."""
from __future__ import annotations

import contextlib
import errno
import signal
import socket
import sys

from ..errors import UsageError

BACKLOG = 2048  # uvicorn's default


def listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on ``host``:``port`` (every address the host name has, as uvicorn would bind),
    made before the model loads, so that a port in use or a wrong --host is one line at once (UsageError),
    not uvicorn's log and exit 3 after the loading.  Port 0: a free port, the same on every address."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535 (0: any free port), got {port}")
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        why = getattr(e, "strerror", None) or e
        raise UsageError(f"--host {host}: not an address of this machine ({why})") from None
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys((i[0], i[1], i[2], "", i[4]) for i in infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(socks) > 1:  # the free port the first address got
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            try:
                sock.bind(addr)
                sock.listen(BACKLOG)
            except OSError as e:
                raise _bind_error(e, host, addr[1]) from None
            sock.set_inheritable(True)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _bind_error(e: OSError, host: str, port: int) -> UsageError:
    if e.errno == errno.EADDRINUSE:
        return UsageError(f"port {port} on {host} is in use (another server, or another nin serve); "
                          "choose another with --port, or --port 0 for a free one")
    if e.errno == errno.EACCES:
        return UsageError(f"port {port} on {host}: permission denied (ports below 1024 need privileges); "
                          "choose one above 1023 with --port")
    if e.errno == errno.EADDRNOTAVAIL:
        return UsageError(f"--host {host}: not an address of this machine")
    return UsageError(f"cannot listen on port {port} on {host} ({e.strerror or e})")


def run_server(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
               drain_seconds: float = 30, ready=None, sockets: list[socket.socket] | None = None) -> int:
    """Serve ``app`` until SIGTERM or Ctrl+C; returns 0 after the requests in flight are answered.

    ``sockets``: already listening ones (``listen``); by default they are made here.
    ``ready(host, port)`` is called once the socket listens (the CLI prints the address then)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal after its graceful shutdown, so the process would die
            # by SIGTERM (exit -15); a drained shutdown is a clean exit here.
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if ready and self.started:
                bound = [s.getsockname() for srv in self.servers for s in srv.sockets]
                ready(*bound[0][:2]) if bound else ready(host, port)

    if sockets is None:
        sockets = listen(host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=drain_seconds, server_header=False, lifespan="on",
                            backlog=BACKLOG)
    server = Server(config)
    try:
        server.run(sockets=sockets)
    except SystemExit:  # uvicorn's exit when the lifespan (warm-up) failed; it logged why
        pass
    finally:
        for s in sockets:
            s.close()
    if not server.started:
        print("nin serve: error: the server did not start (see above)", file=sys.stderr)
        return 1
    return 0
