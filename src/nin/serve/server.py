"""Running the app under uvicorn: in this process, or in several worker processes on one port.

``run_server``: one process; SIGTERM/SIGINT drain the in-flight requests, exit 0.
``run_workers``: N processes (spawned, each with its own model, batch queue, event loop and listening
sockets on the one port, SO_REUSEPORT); a worker that dies is replaced; SIGTERM/SIGINT to this process
drain every worker, exit 0.
"""
from __future__ import annotations

import contextlib
import errno
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import time

from ..errors import UsageError

BACKLOG = 2048  # uvicorn's default


def listen(host: str, port: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Listening sockets on ``host``:``port`` (every address the host name has, as uvicorn would bind),
    made before the model loads, so that a port in use or a wrong --host is one line at once (UsageError),
    not uvicorn's log and exit 3 after the loading.  Port 0: a free port, the same on every address.
    ``reuse_port``: SO_REUSEPORT, so that ``listen_again`` can add a socket per worker."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535 (0: any free port), got {port}")
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        why = getattr(e, "strerror", None) or e
        raise UsageError(f"--host {host}: not an address of this machine ({why})") from None
    addresses = list(dict.fromkeys((i[0], i[4]) for i in infos))
    if reuse_port and port:  # a port another nin serve holds would be shared silently under SO_REUSEPORT
        _close(_bind_all(addresses, host, reuse_port=False))
    return _bind_all(addresses, host, reuse_port=reuse_port)


def listen_again(addresses: list[tuple]) -> list[socket.socket]:
    """More listening sockets on ``addresses`` (``(family, address)`` of sockets made with
    ``listen(reuse_port=True)``).  The kernel spreads new connections over all such sockets by a hash of
    the client's address and port: with one per worker each gets its share, where workers accepting from
    one shared socket took them in bursts (49 of 64 connections to one worker of two, whose clients
    waited the longer)."""
    return _bind_all(addresses, "", reuse_port=True)


def _bind_all(addresses: list[tuple], host: str, *, reuse_port: bool) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for family, addr in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if addr[1] == 0 and len(socks) > 1:  # the free port the first address got
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            try:
                sock.bind(addr)
                sock.listen(BACKLOG)
            except OSError as e:
                raise _bind_error(e, host or addr[0], addr[1]) from None
            sock.set_inheritable(True)
    except BaseException:
        _close(socks)
        raise
    return socks


def _close(sockets: list[socket.socket]) -> None:
    for s in sockets:
        s.close()


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
               drain_seconds: float = 30, ready=None, sockets: list[socket.socket] | None = None,
               signals: tuple = (signal.SIGINT, signal.SIGTERM)) -> int:
    """Serve ``app`` until SIGTERM or Ctrl+C; returns 0 after the requests in flight are answered.

    ``sockets``: already listening ones (``listen``); by default they are made here.
    ``ready(host, port)`` is called once the socket listens (the CLI prints the address then)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal after its graceful shutdown, so the process would die
            # by SIGTERM (exit -15); a drained shutdown is a clean exit here.
            old = {s: signal.signal(s, self.handle_exit) for s in signals}
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


def run_workers(recipes: list, options: dict, *, workers: int, sockets: list[socket.socket], log_level: str = "warning",
                drain_seconds: float = 30, ready=None) -> int:
    """Serve with ``workers`` processes until SIGTERM or Ctrl+C; 0 once every worker has drained.

    ``recipes``: ModelRecipe per model (each worker loads its own copy); ``options``: create_app's keyword
    arguments; ``sockets``: ``listen(reuse_port=True)``'s, handed to the first worker (the others listen
    on their own).  ``ready(host, port)`` once every worker has warmed up and listens.  A worker that dies
    after start-up is replaced (as gunicorn does; the others keep answering meanwhile);
    one that dies during start-up, or more than ``MAX_RESTARTS`` deaths within ``RESTART_WINDOW`` seconds,
    stops the server (exit 1): a server that keeps crashing is worse than one that is down."""
    import multiprocessing
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("spawn")  # fork after torch/onnxruntime made their threads is unsafe
    metrics_dir = tempfile.mkdtemp(prefix="nin-serve-metrics-")
    started = ctx.Queue()
    # The first worker takes over ``sockets`` (connections that come while the workers load wait there);
    # the others, and every replacement, listen on sockets of their own once loaded.  A worker's sockets
    # close with it: the connections waiting on them are reset, new ones go to the workers alive.
    addresses = [(s.family, s.getsockname()) for s in sockets]
    pool = _Pool(ctx, (recipes, options, log_level, drain_seconds, started), metrics_dir, addresses)
    old = {s: signal.signal(s, pool.stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        pool.procs.extend(pool.start(i, sockets if i == 0 else None) for i in range(workers))
        died = not _wait_started(pool.procs, started, pool.stopping) and not pool.stopping
        if died:
            _say_died(next(p for p in pool.procs if not p.is_alive()), " during start-up; stopping")
            pool.stop()
        else:
            if ready:
                ready(*sockets[0].getsockname()[:2])
            _close(sockets)  # the first worker has its own copies now
        while not pool.stopping and not died:
            wait([p.sentinel for p in pool.procs], timeout=1)
            _say_listening(started, pool.replaced)
            died = not pool.replace_dead()
        if pool.stopping:
            pool.stop()  # a replacement started while the signal was handled
        code = _join(pool.procs, drain_seconds)
        return 1 if died else code
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _close(sockets)
        shutil.rmtree(metrics_dir, ignore_errors=True)


MAX_RESTARTS = 5      # worker deaths tolerated ...
RESTART_WINDOW = 60   # ... within this many seconds


class _Pool:
    """The worker processes: started, replaced when one dies, each sent SIGTERM once (a second would make
    its uvicorn quit without draining)."""

    def __init__(self, ctx, args: tuple, metrics_dir: str, addresses: list[tuple]) -> None:
        self.ctx, self.args, self.metrics_dir = ctx, args, metrics_dir
        self.addresses = addresses  # where a worker started without sockets listens (listen_again)
        self.procs: list = []
        self.stopping: list = []
        self.signalled: set[int] = set()
        self.deaths: list[float] = []
        self.replaced: dict[int, str] = {}  # pid of a replacement -> its name, until it listens

    def start(self, i: int, sockets: list[socket.socket] | None = None):
        from .metrics import MULTIPROC

        recipes, options, *rest = self.args
        p = self.ctx.Process(target=_worker, name=f"nin-serve-{i}", daemon=False,
                             args=(recipes, options, sockets or self.addresses, *rest))
        os.environ[MULTIPROC] = self.metrics_dir  # read by the worker's prometheus_client as it starts
        try:
            p.start()
        finally:
            os.environ.pop(MULTIPROC, None)
        return p

    def stop(self, signum=None, frame=None) -> None:
        self.stopping.append(signum)
        for p in self.procs:
            if p.pid and p.is_alive() and p.pid not in self.signalled:
                self.signalled.add(p.pid)
                os.kill(p.pid, signal.SIGTERM)

    def replace_dead(self) -> bool:
        """Start a worker in place of each dead one; False (and stop all) after too many deaths."""
        for i, p in enumerate(self.procs):
            if self.stopping or p.is_alive():
                continue
            now = time.monotonic()
            self.deaths = [t for t in self.deaths if now - t < RESTART_WINDOW] + [now]
            _forget(self.metrics_dir, p.pid)
            if len(self.deaths) > MAX_RESTARTS:
                _say_died(p, f" ({len(self.deaths)} deaths within {RESTART_WINDOW} s); stopping")
                self.stop()
                return False
            _say_died(p, "; starting another", error=False)
            self.procs[i] = self.start(i)
            self.replaced[self.procs[i].pid] = self.procs[i].name
        return True


def _say_died(p, then: str, error: bool = True) -> None:
    print(f"nin serve: {'error: ' * error}worker {p.name} (pid {p.pid}) exited with {p.exitcode}{then}",
          file=sys.stderr, flush=True)


def _say_listening(started, replaced: dict) -> None:
    """Say when a replacement worker listens (it puts its pid on ``started``, as every worker does)."""
    while True:
        try:
            pid = started.get_nowait()
        except queue.Empty:
            return
        if pid in replaced:
            print(f"nin serve: worker {replaced.pop(pid)} (pid {pid}) answers again", file=sys.stderr, flush=True)


def _forget(metrics_dir: str, pid: int) -> None:
    """Drop a dead worker's live gauges (queue depth) from the shared metrics; its counters stay counted."""
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, metrics_dir)
    except (ImportError, OSError):
        pass


def _wait_started(procs, started, stopping) -> bool:
    """True once every worker said it listens; False if one died first or a signal came."""
    pending = len(procs)
    while pending and not stopping:
        try:
            started.get(timeout=0.2)
            pending -= 1
        except queue.Empty:
            if not all(p.is_alive() for p in procs):
                return False
    return not pending


def _join(procs, drain_seconds: float) -> int:
    """Wait for every worker to drain and exit; 0 when all exited 0."""
    for p in procs:
        p.join(drain_seconds + 10)
        if p.is_alive():
            p.kill()
            p.join()
    return 0 if all(p.exitcode == 0 for p in procs) else 1


def _worker(recipes, options, listening, log_level, drain_seconds, started) -> None:
    """One worker process: load the models, serve until SIGTERM (from the parent) on ``listening``: the
    parent's sockets, or addresses to listen on once loaded (listen_again)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the parent, which sends SIGTERM once
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stopped while loading: nothing to drain yet
    from .app import create_app

    app = create_app([r.load() for r in recipes], **options)
    sockets = listening if isinstance(listening[0], socket.socket) else listen_again(listening)
    code = run_server(app, sockets=sockets, log_level=log_level, drain_seconds=drain_seconds,
                      ready=lambda host, port: started.put(os.getpid()), signals=(signal.SIGTERM,))
    sys.exit(code)


def _die_with_parent() -> None:
    """Linux: SIGTERM (a drain) when the parent dies, even by SIGKILL, so that no orphan keeps the port."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
