"""Run an ASGI app on a loopback port in a background thread, for tests and benchmarks."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from typing import Any

import uvicorn


def bindable(port: int) -> bool:
    """Whether a loopback port is free now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range (32768 and up), for a server a
    test starts later: a port the kernel handed out for port 0 could be handed out again,
    meanwhile, to a sandbox binding port 0 in the process under test."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        if bindable(port):
            return port
    raise RuntimeError("no free port between 20000 and 32000")


def metrics_base(instances: int = 1) -> int:
    """A base for ecosystem.config.js's metrics ports (NOVA_METRICS_PORT_BASE: a block of 100
    per app, six apps) whose first `instances` ports of every block are free, below the
    ephemeral range."""
    for _ in range(100):
        base = random.randrange(200, 314) * 100
        if all(bindable(base + 100 * block + n) for block in range(6) for n in range(instances)):
            return base
    raise AssertionError("no free block of metrics ports")


class ServerThread:
    def __init__(self, app: Any, *, lifespan: str = "on") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan=lifespan,
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(
            self.server.serve(sockets=[self.sock])), daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.005)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
