"""Running the app under uvicorn: one process, SIGTERM/SIGINT drain the in-flight requests, exit 0."""
from __future__ import annotations

import contextlib
import signal
import sys


def run_server(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
               drain_seconds: float = 30, ready=None) -> int:
    """Serve ``app`` until SIGTERM or Ctrl+C; returns 0 after the requests in flight are answered.

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

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=drain_seconds, server_header=False, lifespan="on")
    server = Server(config)
    server.run()
    if not server.started:  # the port is taken, or the lifespan (warm-up) failed: uvicorn logged why
        print("nin serve: error: the server did not start (see above)", file=sys.stderr)
        return 1
    return 0
