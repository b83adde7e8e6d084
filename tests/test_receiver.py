"""The webhook receiver over real HTTP: challenge, signatures, size cap, gzip, duplicates,
database outages."""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from servers import ServerThread, free_port

from nova.config import load_settings
from nova.receiver import Receiver, create_app

SECRET = "receiver-test-secret"


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def notification(kind: str = "message.created", **obj: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "type": kind, "source": "/google/emails/realtime",
            "id": str(uuid.uuid4()), "time": 1_780_000_000, "webhook_delivery_attempt": 1,
            "data": {"application_id": "app", "object": {"id": "m1", "grant_id": "g1", **obj}}}


def settings(**kw: Any) -> Any:
    return load_settings(nylas_webhook_secret=SECRET, receiver_max_body_bytes=64 * 1024, **kw)


@pytest.fixture
def receiver(db_url: str) -> Iterator[str]:
    with ServerThread(create_app(settings(), database_url=db_url)) as server:
        yield server.url


def post(url: str, payload: dict[str, Any] | bytes, *, signature: str | None = None,
         headers: dict[str, str] | None = None) -> httpx.Response:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    sig = sign(body) if signature is None else signature
    return httpx.post(f"{url}/webhooks/nylas", content=body, timeout=10,
                      headers={"X-Nylas-Signature": sig, "Content-Type": "application/json",
                               **(headers or {})})


def stored(db_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as c:
        return c.execute("SELECT webhook_id, notification_type, status FROM"
                         " flux_webhook_notifications ORDER BY received_at").fetchall()


def queued(db_url: str) -> int:
    with psycopg.connect(db_url) as c:
        row = c.execute("SELECT count(*) FROM pgmq.q_nylas_webhook_notifications").fetchone()
        return int(row[0]) if row else -1


def test_challenge_is_echoed_exactly(receiver: str) -> None:
    r = httpx.get(f"{receiver}/webhooks/nylas", params={"challenge": "abc-123_XYZ"})
    assert r.status_code == 200 and r.text == "abc-123_XYZ"
    assert r.headers["content-length"] == str(len("abc-123_XYZ"))
    assert httpx.get(f"{receiver}/webhooks/nylas").status_code == 400


def test_signed_delivery_is_stored_and_queued_before_the_200(receiver: str, db_url: str) -> None:
    note = notification()
    r = post(receiver, note)
    assert r.status_code == 200 and r.json()["duplicate"] is False
    assert stored(db_url) == [(note["id"], "message.created", "pending")]
    assert queued(db_url) == 1


def test_duplicate_delivery_answers_200_and_is_stored_once(receiver: str, db_url: str) -> None:
    note = notification()
    assert post(receiver, note).status_code == 200
    again = post(receiver, note)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert len(stored(db_url)) == 1 and queued(db_url) == 1


@pytest.mark.parametrize("signature", ["", "00" * 32, "not-hex", sign(b"other body")])
def test_bad_signature_is_401_and_nothing_is_stored(receiver: str, db_url: str,
                                                    signature: str) -> None:
    r = post(receiver, notification(), signature=signature)
    assert r.status_code == 401
    assert stored(db_url) == [] and queued(db_url) == 0


def test_signature_with_the_wrong_secret_is_rejected(receiver: str, db_url: str) -> None:
    body = json.dumps(notification()).encode()
    assert post(receiver, body, signature=sign(body, "another-secret")).status_code == 401
    assert stored(db_url) == []


def test_missing_signature_header_is_401(receiver: str, db_url: str) -> None:
    r = httpx.post(f"{receiver}/webhooks/nylas", content=b"{}")
    assert r.status_code == 401 and stored(db_url) == []


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"type": "message.created"}',
                                  b'{"id": "", "type": "x"}', b'{"id": 5, "type": "x"}',
                                  b"\xff\xfe"])
def test_malformed_signed_body_is_400(receiver: str, db_url: str, body: bytes) -> None:
    assert post(receiver, body).status_code == 400
    assert stored(db_url) == []


def test_nul_and_lone_surrogates_cost_only_themselves(receiver: str, db_url: str) -> None:
    note = notification(subject="a\u0000b\ud800c", **{"fro\u0000m": [{"name": "\u0000"}]})
    assert post(receiver, note).status_code == 200
    with psycopg.connect(db_url) as c:
        row = c.execute("SELECT payload #> '{data,object}' FROM flux_webhook_notifications"
                        ).fetchone()
    assert row is not None
    assert row[0]["subject"] == "ab\ufffdc" and row[0]["from"] == [{"name": ""}]


def test_any_failure_before_the_commit_is_503_which_nylas_retries(receiver: str,
                                                                   db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("ALTER TABLE flux_webhook_notifications RENAME TO gone")
    try:
        r = post(receiver, notification())
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
    finally:
        with psycopg.connect(db_url, autocommit=True) as c:
            c.execute("ALTER TABLE gone RENAME TO flux_webhook_notifications")
    assert stored(db_url) == []


def test_body_over_the_cap_is_413(receiver: str, db_url: str) -> None:
    note = notification(body="x" * (70 * 1024))
    assert post(receiver, note).status_code == 413
    assert stored(db_url) == []


def test_gzip_delivery_is_verified_on_compressed_bytes(receiver: str, db_url: str) -> None:
    note = notification()
    packed = gzip.compress(json.dumps(note).encode())
    ok = post(receiver, packed, headers={"Content-Encoding": "gzip"})
    assert ok.status_code == 200
    assert stored(db_url)[0][0] == note["id"]
    # a signature over the uncompressed JSON does not count
    other = notification()
    raw = json.dumps(other).encode()
    bad = post(receiver, gzip.compress(raw), signature=sign(raw),
               headers={"Content-Encoding": "gzip"})
    assert bad.status_code == 401


def test_gzip_bomb_is_413(receiver: str, db_url: str) -> None:
    bomb = gzip.compress(b'{"id": "x", "type": "y", "pad": "' + b"0" * 5_000_000 + b'"}')
    assert len(bomb) < 64 * 1024
    assert post(receiver, bomb, headers={"Content-Encoding": "gzip"}).status_code == 413
    assert stored(db_url) == []


def test_database_unreachable_is_503_and_health_says_so() -> None:
    dead = "postgresql://postgres@127.0.0.1:1/nowhere"
    with ServerThread(create_app(settings(), database_url=dead)) as server:
        r = post(server.url, notification())
        assert r.status_code == 503  # Nylas retries 503
        assert httpx.get(f"{server.url}/healthz").status_code == 503


def test_health_is_ok_with_a_database(receiver: str) -> None:
    r = httpx.get(f"{receiver}/healthz")
    assert r.status_code == 200 and r.text == "ok"


def test_health_answers_a_bare_status_and_logs_why_once_per_change(
        db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Anyone who can reach /healthz learns up or down, never the database's address or the
    error; the operator's log says why, once when it changes, not at every probe."""
    app = Receiver(settings(), database_url="postgresql://postgres@127.0.0.1:1/nowhere")
    with caplog.at_level(logging.INFO, logger="nova.receiver"), ServerThread(app.app) as server:
        down = [httpx.get(f"{server.url}/healthz", timeout=10) for _ in range(3)]
        app.database_url = db_url  # the database is back
        up = [httpx.get(f"{server.url}/healthz", timeout=10) for _ in range(2)]
    assert [(r.status_code, r.text) for r in down] == [(503, "unavailable")] * 3
    for r in down:
        assert "127.0.0.1" not in r.text and "nowhere" not in r.text
        assert r.headers["content-type"].startswith("text/plain")
    assert [(r.status_code, r.text) for r in up] == [(200, "ok")] * 2
    said = [rec.getMessage() for rec in caplog.records if "/healthz" in rec.getMessage()]
    assert len(said) == 2, said
    assert "answers 503" in said[0] and "127.0.0.1" in said[0]  # the detail, for the operator
    assert "answers 200 again" in said[1]


def test_receiver_refuses_to_start_without_a_secret() -> None:
    with pytest.raises(ValueError, match="NYLAS_WEBHOOK_SECRET"):
        create_app(load_settings(), database_url="postgresql://x@127.0.0.1/x")


# --- NOVA_RECEIVER_WORKERS: several processes on one port (nova.receiver_workers) ----------

def children(pid: int) -> set[int]:
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(check: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


def test_workers_share_one_port_store_each_delivery_once_and_stop_with_the_supervisor(
        db_url: str) -> None:
    port = free_port()
    env = {**os.environ, "NOVA_DATABASE_URL": db_url, "NYLAS_WEBHOOK_SECRET": SECRET,
           "NOVA_RECEIVER_HOST": "127.0.0.1", "NOVA_RECEIVER_PORT": str(port),
           "NOVA_RECEIVER_WORKERS": "2", "LOG_LEVEL": "info"}
    env.pop("NOVA_METRICS_PORT", None)
    proc = subprocess.Popen([sys.executable, "-m", "nova.receiver"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        workers = wait_for(lambda: len(children(proc.pid)) == 2 and children(proc.pid),
                           "two worker processes")

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, "the receiver answers")
        notes = [notification() for _ in range(24)]

        def deliver(note: dict[str, Any]) -> int:
            with httpx.Client() as client:  # a connection each: spread over the workers
                return post_with(client, url, note).status_code

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(deliver, [*notes, *notes[:4]])) == [200] * 28
        assert sorted(r[0] for r in stored(db_url)) == sorted(n["id"] for n in notes)
        assert queued(db_url) == 24

        # a worker that dies is started again, on the same port
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        renewed = wait_for(lambda: len(children(proc.pid) - {victim}) == 2
                           and children(proc.pid), "the dead worker is replaced")
        assert victim not in renewed
        wait_for(healthy, "the receiver answers again")
        late = notification()
        for _ in range(6):  # new connections, whichever worker takes them
            with httpx.Client() as client:
                assert post_with(client, url, late).status_code == 200
        assert queued(db_url) == 25

        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    assert "2 worker processes" in out and "exited with status" in out
    assert not any(alive(pid) for pid in renewed)


def post_with(client: httpx.Client, url: str, note: dict[str, Any]) -> httpx.Response:
    body = json.dumps(note).encode()
    return client.post(f"{url}/webhooks/nylas", content=body, timeout=10,
                       headers={"X-Nylas-Signature": sign(body)})


def test_workers_refuse_a_port_in_use_at_start(db_url: str) -> None:
    with ServerThread(create_app(settings(), database_url=db_url)) as server:
        env = {**os.environ, "NOVA_DATABASE_URL": db_url, "NYLAS_WEBHOOK_SECRET": SECRET,
               "NOVA_RECEIVER_HOST": "127.0.0.1", "NOVA_RECEIVER_PORT": str(server.port),
               "NOVA_RECEIVER_WORKERS": "2"}
        env.pop("NOVA_METRICS_PORT", None)
        proc = subprocess.run([sys.executable, "-m", "nova.receiver"], env=env, timeout=60,
                              capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot listen" in lines[0], lines
