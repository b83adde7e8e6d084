"""The receiving side of Nova's outbound webhooks, for tests and benchmarks/bench_hooks.py: a
Starlette app on a loopback port that verifies every delivery with the Standard Webhooks
reference library (`standardwebhooks`, the algorithm's own implementation, not Nova's), records
what it got, and misbehaves on request: a share of failed answers, scripted answers, a delay,
or down altogether (its port closed, so connections are refused) and up again on the same port.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

FAILURES = (500, 502, 503, 504)


@dataclass
class Delivery:
    """One request as received."""

    at: float  # time.monotonic()
    wall: float  # time.time()
    msg_id: str
    timestamp: int
    signatures: list[str]
    verified_by: list[int]  # indexes of the receiver's secrets whose signature matched
    body: dict[str, Any]
    status: int  # what the receiver answered

    @property
    def inbox(self) -> str:
        return str(self.body["data"]["inbox_id"])

    @property
    def position(self) -> int:
        return int(self.body["data"]["position"])


@dataclass
class Receiver:
    """What the endpoint answers, and what it saw. Thread-safe: the server runs in a thread."""

    secrets: list[str] = field(default_factory=list)  # verifies with each, records which match
    fail_rate: float = 0.0  # this share of deliveries answered with one of FAILURES
    seed: int = 0
    delay: float = 0.0  # seconds before answering
    script: deque[tuple[int, dict[str, str]]] = field(default_factory=deque)  # next answers
    # deliveries whose payload this says yes to always fail (500)
    fail_if: Callable[[dict[str, Any]], bool] | None = None
    deliveries: list[Delivery] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)  # msg ids no secret verified

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.rng = random.Random(self.seed)

    def answer(self, body: dict[str, Any]) -> tuple[int, dict[str, str]]:
        with self.lock:
            if self.script:
                return self.script.popleft()
            if self.fail_if is not None and self.fail_if(body):
                return 500, {}
            if self.rng.random() < self.fail_rate:
                return self.rng.choice(FAILURES), {}
            return 204, {}

    def verify(self, body: bytes, headers: dict[str, str]) -> list[int]:
        matched = []
        for i, secret in enumerate(self.secrets):
            try:
                Webhook(secret).verify(body, headers)
            except WebhookVerificationError:
                continue
            matched.append(i)
        return matched

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        headers = dict(request.headers)
        matched = self.verify(body, headers)
        msg_id = headers.get("webhook-id", "")
        payload = json.loads(body)
        status, extra = self.answer(payload)
        if self.delay:
            await asyncio.sleep(self.delay)
        delivery = Delivery(time.monotonic(), time.time(), msg_id,
                            int(headers.get("webhook-timestamp", 0)),
                            headers.get("webhook-signature", "").split(" "), matched,
                            payload, status)
        with self.lock:
            self.deliveries.append(delivery)
            if not matched:
                self.unverified.append(msg_id)
        return Response(status_code=status, headers=extra)

    # --- what it saw ---------------------------------------------------------------------

    def accepted(self) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if 200 <= d.status < 300]

    def accepted_positions(self) -> dict[str, list[int]]:
        """Per inbox, the positions answered 2xx, in arrival order (repeats included)."""
        out: dict[str, list[int]] = defaultdict(list)
        for d in self.accepted():
            out[d.inbox].append(d.position)
        return out

    def attempted_positions(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = defaultdict(list)
        with self.lock:
            for d in self.deliveries:
                out[d.inbox].append(d.position)
        return out


class ReceiverServer:
    """A Receiver served by uvicorn on a loopback port, in a thread; `down()` closes the port
    (connections refused) and `up()` serves the same port again."""

    def __init__(self, receiver: Receiver, path: str = "/hooks") -> None:
        self.receiver = receiver
        self.app = Starlette(routes=[Route(path, receiver.handle, methods=["POST"])])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}{path}"
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    def up(self) -> ReceiverServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        config = uvicorn.Config(self.app, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=1)
        server = uvicorn.Server(config)
        self.server = server
        self.thread = threading.Thread(
            target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("receiver did not start")
            time.sleep(0.005)
        return self

    def down(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(10)
        self.server = self.thread = None

    def __enter__(self) -> ReceiverServer:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()
