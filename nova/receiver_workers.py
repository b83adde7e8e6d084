"""`python -m nova.receiver` with NOVA_RECEIVER_WORKERS > 1: one port, several processes.

One Python process answers a delivery in about 0.3-0.4 ms of CPU, most of it HTTP parsing and
socket calls that no tuning of the handler removes, and a burst needs more than one core's
worth of it (Nylas replays 72 hours of notifications after an outage). So the receiver runs
as a small supervisor and NOVA_RECEIVER_WORKERS worker processes:

- the supervisor binds one listening socket per worker, all on NOVA_RECEIVER_HOST:PORT with
  SO_REUSEPORT (Linux hashes each new connection to one of them: even spread, no thundering
  herd, no accept lock). A port in use ends the process at start, exit status 2, one line;
- each worker is `python -m nova.receiver` again, handed its socket (NOVA_RECEIVER_FD, an
  internal variable), serving exactly as a lone receiver does, with its share of the
  receiver's 20 database connections (10 each for 2 workers: the receiver's connection budget
  does not grow with its workers);
- a worker that dies is started again on the same socket (connections queued on it wait for
  the new worker instead of being refused), after a back-off while it keeps dying; one that
  exits 2 (settings it refuses) stops the receiver with status 2;
- SIGTERM / SIGINT to the supervisor: each worker gets one SIGTERM, answers what it has in
  flight and exits; the supervisor exits 0. Workers run in their own session, so a Ctrl-C at
  a terminal reaches them once, through the supervisor, and they end with it if it is killed
  (Linux PR_SET_PDEATHSIG);
- the metrics server (NOVA_METRICS_PORT), when configured, runs in the supervisor only.

NOVA_RECEIVER_WORKERS=1 is the single process of before. `python -m nova` (everything in one
process) keeps one receiver in its own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time

from nova.config import Settings
from nova.runtime import Fatal

log = logging.getLogger("nova.receiver")

FD_ENV = "NOVA_RECEIVER_FD"  # internal: the listening socket a worker is handed
BACKLOG = 2048
EXIT_SETTINGS = 2
MAX_BACKOFF = 10.0


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` sockets listening on one address with SO_REUSEPORT (port 0: the first one's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(BACKLOG)
            sock.set_inheritable(True)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def inherited_socket() -> socket.socket | None:
    """In a worker: the listening socket its supervisor handed it, else None."""
    fd = os.environ.get(FD_ENV)
    if not fd:
        return None
    die_with_parent()
    return socket.socket(fileno=int(fd))


def die_with_parent() -> None:
    """A worker ends (SIGTERM) when its supervisor does, even if the supervisor is killed."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the supervisor was gone before the line above
        os.kill(os.getpid(), signal.SIGTERM)


class ReceiverWorkers:
    """The supervisor, as a part for nova.runtime.run_parts."""

    def __init__(self, settings: Settings, count: int) -> None:
        self.count = count
        self.grace = max(1.0, float(settings.shutdown_grace_seconds))
        try:
            self.sockets = listening_sockets(settings.receiver_host, settings.receiver_port,
                                             count)
        except OSError as exc:
            log.error("[Receiver] cannot listen on %s:%d: %s", settings.receiver_host,
                      settings.receiver_port, exc)
            raise SystemExit(EXIT_SETTINGS) from None
        self.port = self.sockets[0].getsockname()[1]
        self._stopping = asyncio.Event()
        self._procs: dict[int, asyncio.subprocess.Process] = {}  # by worker index

    async def _spawn(self, index: int) -> None:
        sock = self.sockets[index]
        env = {**os.environ, FD_ENV: str(sock.fileno()),
               "NOVA_RECEIVER_WORKERS": str(self.count),  # each sizes its pool by it
               "NOVA_METRICS_PORT": ""}  # metrics: the supervisor's alone
        self._procs[index] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nova.receiver", env=env, pass_fds=(sock.fileno(),),
            start_new_session=True)

    async def run(self) -> None:
        log.info("[Receiver] %d worker processes on %s port %d (NOVA_RECEIVER_WORKERS)",
                 self.count, self.sockets[0].getsockname()[0], self.port)
        try:
            for index in range(self.count):
                await self._spawn(index)
            await self._watch()
        finally:
            await self._stop_all()
            for sock in self.sockets:
                sock.close()

    async def _watch(self) -> None:
        backoff = {index: 0.5 for index in range(self.count)}
        started = {index: time.monotonic() for index in range(self.count)}
        stop = asyncio.create_task(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                waits = {asyncio.create_task(proc.wait()): index
                         for index, proc in self._procs.items()}
                done, _ = await asyncio.wait([stop, *waits], return_when=asyncio.FIRST_COMPLETED)
                for task in waits:
                    task.cancel()
                if self._stopping.is_set():
                    return
                for task in done:
                    if task is stop:
                        continue
                    index = waits[task]
                    code = task.result()
                    if code == EXIT_SETTINGS:  # it said why; run_parts exits 2 on Fatal
                        raise Fatal(f"receiver worker {index} refused its settings")
                    if time.monotonic() - started[index] > 30:
                        backoff[index] = 0.5
                    log.error("[Receiver] worker %d (pid %d) exited with status %s; starting "
                              "it again in %.1fs", index, self._procs[index].pid, code,
                              backoff[index])
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), backoff[index])
                    if self._stopping.is_set():
                        return
                    backoff[index] = min(backoff[index] * 2, MAX_BACKOFF)
                    started[index] = time.monotonic()
                    await self._spawn(index)
        finally:
            stop.cancel()

    async def _stop_all(self) -> None:
        running = [p for p in self._procs.values() if p.returncode is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if not running:
            return
        _done, late = await asyncio.wait([asyncio.create_task(p.wait()) for p in running],
                                         timeout=self.grace + 5)
        if late:
            log.warning("[Receiver] %d worker(s) still running after the grace period: killed",
                        len(late))
            for proc in running:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            await asyncio.gather(*(p.wait() for p in running), return_exceptions=True)

    def stop(self) -> None:
        self._stopping.set()
