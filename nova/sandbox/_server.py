"""The lifecycle both sandboxes share: a Starlette app served by uvicorn on loopback, in a
background thread with its own event loop, so it serves sync code (``with Sandbox(...) as
sb``) and async tests (``async with Sandbox(...) as sb``) alike; ``serve()`` runs it in the
caller's loop instead (the CLIs)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from types import TracebackType
from typing import Any, Self

import uvicorn


class LoopbackServer:
    """Subclasses set ``app`` and ``thread_name`` and call ``_init_server``; ``_on_start`` and
    ``_on_stop`` run in the server's loop around serving (the webhook outbox, the push
    sender). ``base_url`` is valid after ``start()``."""

    thread_name = "sandbox"
    app: Any

    def _init_server(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def _on_start(self) -> None:
        """In the server's loop, before it serves."""

    async def _on_stop(self) -> None:
        """In the server's loop, after it served."""

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._sock = sock
        return sock

    async def serve(self) -> None:
        """Serve in the current event loop until stopped (the CLI runs this)."""
        sock = self._sock or self._bind()
        await self._on_start()
        config = uvicorn.Config(self.app, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=1,
                                timeout_keep_alive=30)
        self._server = uvicorn.Server(config)
        self._loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        try:
            await self._server.serve(sockets=[sock])
        finally:
            await self._on_stop()

    def _thread_main(self) -> None:
        try:
            asyncio.run(self.serve())
        except BaseException as exc:  # surfaced by start()
            self._error = exc

    def start(self, timeout: float = 10.0) -> Self:
        self._bind()
        self._thread = threading.Thread(target=self._thread_main, name=self.thread_name,
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not (self._server is not None and self._server.started):
            if self._error is not None or not self._thread.is_alive() \
                    or time.monotonic() > deadline:
                raise RuntimeError(f"sandbox failed to start: {self._error!r}")
            time.sleep(0.002)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._loop is not None and self.stop_event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self.stop_event.set)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await asyncio.to_thread(self.stop)
