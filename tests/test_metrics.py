"""Prometheus metrics and /healthz: every process serves them on NOVA_METRICS_PORT and exits 0
on SIGTERM; the series count what a real run did; the Postgres figures are the fleet's."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psycopg
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from servers import ServerThread
from synchelp import add_inbox, make_sandbox, running, settings, start_backfill, status, wait_for

from nova import metrics
from nova.config import load_settings
from nova.metrics import MetricsServer, PostgresCollector
from nova.receiver import create_app
from nova.runtime import GiveUp, Job, JobContext, Worker
from nova.webhooks import WebhookProcessor

from runtime_procs import LOG_TABLE, TEST_QUEUE, Recorder

ROOT = Path(__file__).resolve().parent.parent
TICK = metrics.TICK_SECONDS + 0.5
PROCESSES = ["nova.receiver", "nova.webhooks", "nova.backfill", "nova.threads",
             "nova.completion", "nova.attachments"]
FLEET_SERIES = ["nova_queue_depth", "nova_queue_oldest_message_age_seconds",
                "nova_queue_dead_letters", "nova_backfill_threads", "nova_backfills",
                "nova_database_up"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def local(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- every process ------------------------------------------------------------------------

@pytest.mark.parametrize("module", PROCESSES)
def test_every_process_serves_metrics_and_health_and_exits_0_on_sigterm(
        module: str, db_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NYLAS_", "NOVA_", "DATABASE_URL"))}
    # NOVA_METRICS_HOST unset: loopback is the default
    env.update({"NOVA_DATABASE_URL": db_url, "NOVA_METRICS_PORT": str(port),
                "NYLAS_API_KEY": "k", "NYLAS_API_URI": "http://127.0.0.1:9",
                "NYLAS_WEBHOOK_SECRET": "metrics-test-secret",
                "NOVA_RECEIVER_HOST": "127.0.0.1", "NOVA_RECEIVER_PORT": str(free_port()),
                "NOVA_ATTACHMENT_PATH": str(tmp_path / "nas"), "PYTHONPATH": str(ROOT)})
    proc = subprocess.Popen([sys.executable, "-m", module], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no /healthz"
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert health.status_code == 200 and health.text == "ok"
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert scraped.status_code == 200
        found = samples(scraped.text)
        for name in FLEET_SERIES:
            assert any(key[0] == name for key in found), name
        assert value(found, "nova_database_up") == 1
        assert value(found, "nova_queue_depth", queue="thread_sync_jobs") == 0
        assert any(key[0] == "process_resident_memory_bytes" for key in found)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert f"[Metrics] serving /metrics and /healthz on 127.0.0.1:{port}" in out


# --- a real run -----------------------------------------------------------------------------

SECRET = "metrics-test-secret"


async def test_a_run_fills_every_series(db_url: str, pool: asyncpg.Pool) -> None:
    """A sandbox backfill plus a signed webhook through the receiver: the series say what
    happened, with the figures of the run."""
    with make_sandbox(30, webhook_secret=SECRET) as sb:
        s = settings(sb, nylas_webhook_secret=SECRET)
        app = create_app(s, database_url=db_url)
        grant = sb.grant_ids[0]
        before = {
            "done": local("nova_jobs_total", queue="thread_sync_jobs", outcome="done"),
            "hooks": local("nova_jobs_total", queue="nylas_webhook_notifications",
                           outcome="done"),
            "ok": local("nova_provider_requests_total", provider="nylas", status="200"),
            "lag": local("nova_webhook_lag_seconds_count"),
            "durations": local("nova_job_duration_seconds_count", queue="thread_sync_jobs"),
        }
        server = MetricsServer(0, host="127.0.0.1", database_url=db_url,
                               configured_rate=s.provider_rate_limit)
        served = asyncio.create_task(server.run())
        with ServerThread(app) as receiver:
            sb.outbox.url = f"{receiver.url}/webhooks/nylas"
            inbox = await add_inbox(pool, grant)
            config = await start_backfill(pool, inbox)
            async with running(db_url, s, threads=2):
                await wait_for(lambda: _completed(pool, config), what="the backfill")
                hooks = Worker(WebhookProcessor(s), s, database_url=db_url)
                sb.add_message(grant, subject="metrics")
                await sb.await_webhooks()
                await hooks.run(burst=True)
                await wait_for(lambda: _port(server), what="the metrics server")
                async with httpx.AsyncClient() as client:
                    text = (await client.get(f"http://127.0.0.1:{server.port}/metrics")).text
        server.stop()
        await served

    found = samples(text)
    threads = await pool.fetchval("SELECT threads_queued FROM inbox_sync_stats"
                                  " WHERE config_id = $1", config)
    synced = await pool.fetchval("SELECT count(*) FROM queued_threads WHERE config_id = $1"
                                 " AND queue_msg_id IS NOT NULL", config)
    assert threads == 30 and synced > 0
    done = value(found, "nova_jobs_total", queue="thread_sync_jobs", outcome="done")
    assert done is not None and done - before["done"] >= synced
    assert value(found, "nova_jobs_total", queue="thread_sync_jobs", outcome="retried") \
        is not None  # declared at 0 by every worker
    assert value(found, "nova_jobs_total", queue="nylas_webhook_notifications",
                 outcome="done") == before["hooks"] + 1
    count = value(found, "nova_job_duration_seconds_count", queue="thread_sync_jobs")
    assert count is not None and count - before["durations"] >= synced
    answered = value(found, "nova_provider_requests_total", provider="nylas", status="200")
    assert answered is not None and answered - before["ok"] >= synced + 1  # listing + threads
    assert value(found, "nova_webhook_lag_seconds_count") == before["lag"] + 1
    learned = await pool.fetchval("SELECT coalesce(rate, $2) FROM provider_rate_limits"
                                  " WHERE grant_id = $1", grant, s.provider_rate_limit)
    assert value(found, "nova_provider_grants", provider="nylas") == 1
    for stat in ("min", "median", "max"):  # one grant: each is its rate
        assert value(found, "nova_provider_rate", provider="nylas", stat=stat) == learned
    assert_no_grant_in_labels(found, grant)
    assert value(found, "nova_backfills", status="completed") == 1
    assert value(found, "nova_backfill_threads", status="completed") == 0  # none running
    assert value(found, "nova_queue_depth", queue="inbox_backfill_jobs") == 0


def assert_no_grant_in_labels(found: dict[tuple[str, tuple[tuple[str, str], ...]], float],
                              *grants: str) -> None:
    """No label of any series carries a grant id or an e-mail address."""
    for name, labels in found:
        for label, text in labels:
            assert "@" not in text, (name, label, text)
            assert not any(g.lower() in text.lower() for g in grants), (name, label, text)


async def _completed(pool: asyncpg.Pool, config: uuid.UUID) -> bool:
    return await status(pool, config) == "completed"


async def _port(server: MetricsServer) -> int | None:
    return server.port


# --- the Postgres figures -----------------------------------------------------------------

def test_postgres_figures_are_the_queues_backfills_and_rates(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as c:
        for n in range(3):
            c.execute("SELECT pgmq.send('attachment_downloads', %s::jsonb)",
                      (json.dumps({"n": n}),))
        first = c.execute("SELECT min(msg_id) FROM pgmq.q_attachment_downloads").fetchone()
        assert first is not None
        c.execute("SELECT pgmq.archive('attachment_downloads', %s::bigint)", (first[0],))
        c.execute("UPDATE pgmq.q_attachment_downloads SET enqueued_at = now() - interval '90 s'")
        inbox = c.execute("INSERT INTO flux_inboxes (grant_id, email) VALUES ('g-m', 'm@x.com')"
                          " RETURNING id").fetchone()
        assert inbox is not None
        config = c.execute("SELECT queue_inbox_backfill(%s)", (inbox[0],)).fetchone()
        assert config is not None
        for thread in ("t1", "t2", "t3"):
            c.execute("SELECT queue_thread_sync(%s, %s)", (config[0], thread))
        c.execute("UPDATE queued_threads SET status = 'completed' WHERE provider_thread_id = 't1'")
        c.execute("INSERT INTO provider_rate_limits (grant_id, rate, held_until) VALUES"
                  " ('g-learned', 42.5, NULL), ('g-new', NULL, NULL),"
                  " ('g-held', 2.5, now() + interval '1 minute'),"
                  " ('gmail:Someone.Private@example.com', NULL, now() - interval '1 minute')")

    collector = PostgresCollector(db_url, configured_rate=10.0, gmail_rate=240.0)
    try:
        found = {(s.name, tuple(sorted(s.labels.items()))): s.value
                 for family in collector.collect() for s in family.samples}
    finally:
        collector.close()
    assert value(found, "nova_database_up") == 1
    assert value(found, "nova_queue_depth", queue="attachment_downloads") == 2
    assert value(found, "nova_queue_depth", queue="thread_sync_jobs") == 3
    age = value(found, "nova_queue_oldest_message_age_seconds", queue="attachment_downloads")
    assert age is not None and age >= 90
    assert value(found, "nova_queue_dead_letters", queue="attachment_downloads") == 1
    assert value(found, "nova_queue_dead_letters", queue="thread_sync_jobs") == 0
    # by provider kind, never by grant: g-new is not learned yet (the configured 10/s)
    assert value(found, "nova_provider_grants", provider="nylas") == 3
    assert value(found, "nova_provider_grants_held", provider="nylas") == 1  # g-held
    assert value(found, "nova_provider_rate", provider="nylas", stat="min") == 2.5
    assert value(found, "nova_provider_rate", provider="nylas", stat="median") == 10.0
    assert value(found, "nova_provider_rate", provider="nylas", stat="max") == 42.5
    assert value(found, "nova_provider_grants", provider="gmail") == 1
    assert value(found, "nova_provider_grants_held", provider="gmail") == 0  # hold is over
    # Gmail's rate is never learned: its quota rate, not Nylas's configured one
    assert value(found, "nova_provider_rate", provider="gmail", stat="max") == 240
    assert_no_grant_in_labels(found, "g-learned", "g-new", "g-held", "someone.private")
    assert value(found, "nova_backfill_threads", status="queued") == 2
    assert value(found, "nova_backfill_threads", status="completed") == 1
    assert value(found, "nova_backfills", status="queued") == 1


def test_a_database_that_does_not_answer_is_database_up_0_and_nothing_else(
        caplog: pytest.LogCaptureFixture) -> None:
    collector = PostgresCollector(f"postgresql://nobody@127.0.0.1:{free_port()}/x",
                                  configured_rate=10.0, timeout=1)
    with caplog.at_level(logging.WARNING, logger="nova.metrics"):
        families = list(collector.collect())
    assert [(f.name, [s.value for s in f.samples]) for f in families] == [
        ("nova_database_up", [0.0])]
    assert "Postgres figures unavailable" in caplog.text


# --- the runtime's outcomes ------------------------------------------------------------------

class Outcomes(Recorder):
    async def process(self, job: Job, ctx: JobContext) -> str | None:
        if job.message.get("give_up"):
            raise GiveUp("bad payload")
        return await super().process(job, ctx)


async def test_job_outcomes_are_counted_by_queue_and_outcome(db_url: str,
                                                             pool: asyncpg.Pool) -> None:
    await pool.execute(LOG_TABLE)
    for message in ({}, {}, {"fail": 1}, {"give_up": True}):
        await pool.execute("SELECT pgmq.send($1, $2::jsonb)", TEST_QUEUE, message)
    before = {o: local("nova_jobs_total", queue=TEST_QUEUE, outcome=o)
              for o in metrics.OUTCOMES}
    durations = local("nova_job_duration_seconds_count", queue=TEST_QUEUE)
    s = load_settings(batch_size=4, visibility_timeout=30, poll_interval_ms=200)
    worker = Worker(Outcomes(), s, pool=pool, database_url=db_url)
    task = asyncio.create_task(worker.run())
    await wait_for(lambda: pool.fetchval("SELECT count(*) = 3 FROM runtime_done"),
                   what="three jobs done")
    worker.stop()
    await task
    delta = {o: local("nova_jobs_total", queue=TEST_QUEUE, outcome=o) - before[o]
             for o in metrics.OUTCOMES}
    assert delta == {"done": 3, "retried": 1, "dead_lettered": 1, "released": 0, "lost": 0}
    assert local("nova_job_duration_seconds_count", queue=TEST_QUEUE) - durations == 5


# --- the server ----------------------------------------------------------------------------

@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


async def test_a_port_in_use_is_fatal_and_never_moves_to_another_port(
        taken_port: int, caplog: pytest.LogCaptureFixture) -> None:
    from nova.runtime import Fatal

    server = MetricsServer(taken_port, host="127.0.0.1")
    with caplog.at_level(logging.INFO, logger="nova.metrics"), pytest.raises(Fatal) as err:
        await server.run()
    assert server.port is None  # nothing was bound instead
    assert f"cannot serve metrics on 127.0.0.1:{taken_port}" in str(err.value)
    assert "another process has it" in str(err.value)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and str(taken_port) in errors[0]
    assert "serving /metrics" not in caplog.text


def test_a_process_whose_metrics_port_is_taken_exits_2_with_one_line(
        db_url: str, taken_port: int) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NYLAS_", "NOVA_", "DATABASE_URL"))}
    env.update({"NOVA_DATABASE_URL": db_url, "NOVA_METRICS_PORT": str(taken_port),
                "NYLAS_API_KEY": "k", "NYLAS_API_URI": "http://127.0.0.1:9",
                "PYTHONPATH": str(ROOT)})
    run = subprocess.run([sys.executable, "-m", "nova.backfill"], env=env, text=True,
                         capture_output=True, timeout=60)
    assert run.returncode == 2, (run.stdout, run.stderr)
    # refused before any work: that line is all the process says
    lines = (run.stdout + run.stderr).strip().splitlines()
    assert len(lines) == 1 and "[Metrics]" in lines[0], lines
    assert f"cannot serve metrics on 127.0.0.1:{taken_port}" in lines[0]


async def test_port_0_is_a_free_port_on_the_configured_host() -> None:
    parts = metrics.server_parts(load_settings(metrics_port=0), "Test")
    assert len(parts) == 1
    server = parts[0]
    assert server.host == "127.0.0.1" and server.port not in (None, 0)
    task = asyncio.create_task(server.run())
    await wait_for(lambda: _ready(server), what="the server")
    async with httpx.AsyncClient() as client:
        health = await client.get(f"http://127.0.0.1:{server.port}/healthz")
    server.stop()
    await task
    assert health.status_code == 200 and health.text == "ok"


async def _ready(server: MetricsServer) -> bool:
    return server._ready.is_set()


async def test_healthz_is_503_when_the_event_loop_stops_turning(
        monkeypatch: Any, caplog: pytest.LogCaptureFixture) -> None:
    server = MetricsServer(0, host="127.0.0.1")
    task = asyncio.create_task(server.run())
    await wait_for(lambda: _port(server), what="the server")
    url = f"http://127.0.0.1:{server.port}/healthz"
    assert (await asyncio.to_thread(httpx.get, url, timeout=2)).status_code == 200
    monkeypatch.setattr(metrics, "HEALTH_STALE_SECONDS", 0.5)
    # Block the event loop as a job that never yields would; the server's thread answers.
    time.sleep(1.5)  # noqa: ASYNC251 - the point of the test
    with caplog.at_level(logging.INFO, logger="nova.metrics"):
        # the loop is blocked on purpose
        stalled = [httpx.get(url, timeout=2) for _ in range(3)]  # noqa: ASYNC210
        monkeypatch.setattr(metrics, "HEALTH_STALE_SECONDS", 15.0)
        await asyncio.sleep(TICK)  # the loop turns again
        again = await asyncio.to_thread(httpx.get, url, timeout=2)
    server.stop()
    await task
    # a bare status; why goes to the log, once per change (not per probe)
    assert [(r.status_code, r.text) for r in stalled] == [(503, "unavailable")] * 3
    assert (again.status_code, again.text) == (200, "ok")
    said = [r.getMessage() for r in caplog.records]
    assert sum("has not turned for" in m for m in said) == 1
    assert sum("answers 200 again" in m for m in said) == 1


def test_the_healthcheck_command_asks_the_local_healthz() -> None:
    run = [sys.executable, "-m", "nova.metrics", "healthcheck"]
    env = {k: v for k, v in os.environ.items() if k != "NOVA_METRICS_PORT"}
    off = subprocess.run(run, capture_output=True, text=True, env=env, timeout=30)
    assert off.returncode == 0 and "not set" in off.stdout
    down = subprocess.run([*run, str(free_port())], capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and "unhealthy" in down.stdout

    async def serve_and_check() -> subprocess.CompletedProcess[str]:
        server = MetricsServer(0, host="127.0.0.1")
        task = asyncio.create_task(server.run())
        await wait_for(lambda: _port(server), what="the server")
        try:
            return await asyncio.to_thread(subprocess.run, [*run, str(server.port)],
                                           capture_output=True, text=True, timeout=30)
        finally:
            server.stop()
            await task

    up = asyncio.run(serve_and_check())
    assert up.returncode == 0 and up.stdout.strip() == "ok"
