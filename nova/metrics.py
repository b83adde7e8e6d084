"""Prometheus metrics and `/healthz` of every Nova process, on NOVA_METRICS_PORT when it is set.

Two kinds of series:

- What this process did, counted where it happens (the runtime, the provider budget, the webhook
  processor): `nova_jobs_total{queue,outcome}`, `nova_job_duration_seconds{queue}`,
  `nova_provider_requests_total{provider,status}`, `nova_webhook_lag_seconds`. Sum them over
  the fleet in Prometheus.
- What the fleet has to do, read from Postgres when scraped (`PostgresCollector`):
  `nova_queue_depth{queue}`, `nova_queue_oldest_message_age_seconds{queue}`,
  `nova_queue_dead_letters{queue}`, `nova_provider_rate{grant}`,
  `nova_backfill_threads{status}`, `nova_backfills{status}`, `nova_database_up`. Any one
  process gives the whole fleet's view; take one (max by queue) rather than a sum.

The Postgres figures cost a few small queries per scrape and nothing between scrapes: they
run in the HTTP server's thread (never on the event loop) over one psycopg connection with
short connect and statement timeouts, and a scrape within a second of the last one is served
from its result. A database that does not answer makes `nova_database_up` 0 and leaves the
other Postgres series out of that scrape; the process's own counters are always there.

The server is prometheus_client's threaded WSGI server: `/metrics` (text format, or
OpenMetrics when asked) and `/healthz`, 200 while the process's event loop turns (a loop that
has not ticked for HEALTH_STALE_SECONDS answers 503) and 503 once it is stopping. A port in use
(a second instance started with the same NOVA_METRICS_PORT) is not fatal: the server binds a
free port instead and logs which, so the process runs on and its metrics are still reachable.

`python -m nova.metrics healthcheck` asks the local `/healthz` (the Docker HEALTHCHECK).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger("nova.metrics")
# The `_created` twin of every counter and histogram is noise on a dashboard.
disable_created_metrics()

# --- what this process does ----------------------------------------------------------------

JOBS = Counter("nova_jobs", "Jobs that reached an outcome, by queue and outcome (done, retried, "
               "dead_lettered, released, lost).", ["queue", "outcome"])
JOB_DURATION = Histogram(
    "nova_job_duration_seconds", "Time from a job's start to its outcome (done or failed).",
    ["queue"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
PROVIDER_REQUESTS = Counter("nova_provider_requests", "Provider HTTP answers, by HTTP status.",
                            ["provider", "status"])
WEBHOOK_LAG = Histogram(
    "nova_webhook_lag_seconds", "From a notification's provider event time (else its arrival) "
    "to its rows committed by the webhook processor.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600))

OUTCOMES = ("done", "retried", "dead_lettered", "released", "lost")


def declare_queue(queue: str) -> None:
    """Create a worker's series at 0, so rates work from its first job (a labelled series
    appears only once it is used)."""
    for outcome in OUTCOMES:
        JOBS.labels(queue, outcome)
    JOB_DURATION.labels(queue)


def job_outcome(queue: str, outcome: str, seconds: float | None = None) -> None:
    JOBS.labels(queue, outcome).inc()
    if seconds is not None:
        JOB_DURATION.labels(queue).observe(seconds)


def provider_answer(provider: str, status: int) -> None:
    PROVIDER_REQUESTS.labels(provider, str(status)).inc()


def webhook_lag(seconds: float) -> None:
    WEBHOOK_LAG.observe(max(0.0, seconds))


# --- what the fleet has to do, from Postgres -----------------------------------------------

QUEUES = """
SELECT m.queue_name, m.queue_length, m.oldest_msg_age_sec
FROM flux_pgmq_list_queues() q, flux_pgmq_metrics(q.queue_name) m
"""
# Dead letters are the queue's PGMQ archive (only the runtime archives); counted up to a cap so
# a scrape stays cheap even if an archive grows huge.
DEAD_LETTER_CAP = 100_000
DEAD_LETTERS = "SELECT count(*) FROM (SELECT 1 FROM pgmq.{} LIMIT %s) a"
# The learned rate of each grant; a grant whose rate is not learned yet runs at the configured
# one. Capped: the series per grant are for watching the busy ones.
RATE_GRANTS_CAP = 1000
RATES = """
SELECT grant_id, coalesce(rate, %s) AS rate FROM provider_rate_limits
ORDER BY updated_at DESC LIMIT %s
"""
BACKFILL_THREADS = """
SELECT coalesce(sum(s.threads_pending), 0) AS queued,
       coalesce(sum(s.threads_processing), 0) AS processing,
       coalesce(sum(s.threads_completed), 0) AS completed,
       coalesce(sum(s.threads_failed), 0) AS failed
FROM flux_inbox_configurations c JOIN inbox_sync_stats s ON s.config_id = c.id
WHERE c.backfill_status IN ('queued', 'discovering', 'thread_sync') AND c.deleted_at IS NULL
"""
BACKFILLS = """
SELECT backfill_status, count(*) FROM flux_inbox_configurations WHERE deleted_at IS NULL
GROUP BY backfill_status
"""
BACKFILL_STATUSES = ("pending", "queued", "discovering", "thread_sync", "completed", "failed")
# The series PostgresCollector exports (for the dashboard's test).
POSTGRES_SERIES = ("nova_database_up", "nova_queue_depth", "nova_queue_oldest_message_age_seconds",
                   "nova_queue_dead_letters", "nova_provider_rate", "nova_backfill_threads",
                   "nova_backfills")


class PostgresCollector:
    """The fleet's figures, read from Postgres when scraped (in the scraping thread)."""

    def __init__(self, url: str, configured_rate: float, *, timeout: float = 3.0,
                 min_interval: float = 1.0) -> None:
        self.url = url
        self.configured_rate = configured_rate
        self.timeout = timeout
        self.min_interval = min_interval
        self._conn: Any = None
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None
        self.last_error: str | None = None

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.min_interval:
                self._cached = (now, self._read())
            metrics = self._cached[1]
        yield from metrics

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _read(self) -> list[Metric]:
        import psycopg

        up = GaugeMetricFamily("nova_database_up", "1 when the last scrape could read Nova's "
                               "figures from Postgres.")
        try:
            if self._conn is None or self._conn.closed:
                ms = int(self.timeout * 1000)
                self._conn = psycopg.connect(self.url, autocommit=True,
                                             connect_timeout=max(1, int(self.timeout)),
                                             options=f"-c statement_timeout={ms}",
                                             application_name="nova-metrics")
            metrics = self._figures(self._conn)
        except psycopg.Error as exc:
            self._drop()
            text = str(exc).strip().splitlines()
            error = text[0] if text else type(exc).__name__
            if error != self.last_error:
                log.warning("[Metrics] Postgres figures unavailable (%s)", error)
            self.last_error = error
            up.add_metric([], 0)
            return [up]
        self.last_error = None
        up.add_metric([], 1)
        return [up, *metrics]

    def _figures(self, conn: Any) -> list[Metric]:
        from psycopg import sql

        depth = GaugeMetricFamily("nova_queue_depth", "Messages in the queue, visible or held.",
                                  labels=["queue"])
        oldest = GaugeMetricFamily("nova_queue_oldest_message_age_seconds",
                                   "Age of the queue's oldest message (0 when empty).",
                                   labels=["queue"])
        dead = GaugeMetricFamily("nova_queue_dead_letters", "Messages archived after their last "
                                 "attempt (the queue's PGMQ archive).", labels=["queue"])
        queues = conn.execute(QUEUES).fetchall()
        for name, length, age in queues:
            depth.add_metric([name], length)
            oldest.add_metric([name], age or 0)
            count = conn.execute(sql.SQL(DEAD_LETTERS).format(sql.Identifier("a_" + name)),
                                 (DEAD_LETTER_CAP,)).fetchone()
            dead.add_metric([name], count[0] if count else 0)

        rate = GaugeMetricFamily("nova_provider_rate", "Requests/s a grant may send: the learned "
                                 "rate, or the configured one until one is learned.",
                                 labels=["grant"])
        for grant_id, value in conn.execute(RATES, (self.configured_rate, RATE_GRANTS_CAP)):
            rate.add_metric([grant_id], value)

        threads = GaugeMetricFamily("nova_backfill_threads", "Threads of the running backfills, "
                                    "by status.", labels=["status"])
        row = conn.execute(BACKFILL_THREADS).fetchone()
        for status, value in zip(("queued", "processing", "completed", "failed"), row or (),
                                 strict=False):
            threads.add_metric([status], value)

        backfills = GaugeMetricFamily("nova_backfills", "Backfill configurations, by status.",
                                      labels=["status"])
        counts = dict(conn.execute(BACKFILLS).fetchall())
        for status in BACKFILL_STATUSES:
            backfills.add_metric([status], counts.get(status, 0))
        return [depth, oldest, dead, rate, threads, backfills]


class _Process:
    """This process's own series (the default registry) inside a server's registry."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass


# --- the server ----------------------------------------------------------------------------

HEALTH_STALE_SECONDS = 15.0
TICK_SECONDS = 1.0


class MetricsServer:
    """A part of a process (see nova.runtime.run_parts): serves /metrics and /healthz from a
    thread while the process runs; its own loop proves the event loop turns."""

    def __init__(self, port: int, *, host: str = "0.0.0.0", component: str = "nova",
                 database_url: str | None = None, url_for: Callable[[], str] | None = None,
                 configured_rate: float = 10.0) -> None:
        self.requested_port = port
        self.host = host
        self.component = component
        self.database_url = database_url
        self.url_for = url_for  # how to find the database when no URL is given (embedded)
        self.configured_rate = configured_rate
        self.port: int | None = None  # the bound port, once serving
        self.collector: PostgresCollector | None = None
        self._tick = time.monotonic()
        self._stopping = asyncio.Event()
        self._ready = threading.Event()
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        self._tick = time.monotonic()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Process())
        if self.database_url is None and self.url_for is not None:
            # On the loop's thread, as the other parts do: the embedded server is started (or
            # joined) once per process, never by two threads at once.
            self.database_url = self.url_for()
        if self.database_url is not None:
            self.collector = PostgresCollector(self.database_url, self.configured_rate)
            registry.register(self.collector)
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            if environ.get("PATH_INFO") == "/healthz":
                return self._health(start_response)
            return metrics_app(environ, start_response)

        self._server = self._bind(app)
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="nova-metrics")
        self._thread.start()
        self._ready.set()
        log.info("[Metrics] serving /metrics and /healthz on %s:%d component=%s", self.host,
                 self.port, self.component)
        try:
            while not self._stopping.is_set():
                self._tick = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), TICK_SECONDS)
        finally:
            await asyncio.to_thread(self._close)

    def _bind(self, app: Callable[..., Any]) -> ThreadingWSGIServer:
        try:
            return make_server(self.host, self.requested_port, app, ThreadingWSGIServer,
                               handler_class=_Quiet)
        except OSError as exc:
            if self.requested_port == 0:
                raise
            server = make_server(self.host, 0, app, ThreadingWSGIServer, handler_class=_Quiet)
            log.warning("[Metrics] NOVA_METRICS_PORT %d is not free (%s): serving on %d "
                        "instead; give each instance its own port", self.requested_port,
                        exc.strerror or exc, server.server_port)
            return server

    def _close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self.collector is not None:
            self.collector.close()

    def _health(self, start_response: Callable[..., Any]) -> list[bytes]:
        stale = time.monotonic() - self._tick
        body: dict[str, Any]
        if self._stopping.is_set():
            status, body = "503 Service Unavailable", {"status": "stopping"}
        elif stale > HEALTH_STALE_SECONDS:
            status, body = "503 Service Unavailable", {"status": "stalled",
                                                       "loop_stalled_seconds": round(stale, 1)}
        else:
            status, body = "200 OK", {"status": "ok"}
        body["component"] = self.component
        data = json.dumps(body).encode()
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(data)))])
        return [data]


def server_parts(settings: Any, component: str, *, database_url: str | None = None,
                 ) -> list[MetricsServer]:
    """The metrics server of a process, as a part for run_parts: none without
    NOVA_METRICS_PORT."""
    if settings.metrics_port is None:
        return []
    from nova import db

    return [MetricsServer(settings.metrics_port, host=settings.metrics_host,
                          component=component, database_url=database_url,
                          url_for=lambda: db.database_url(settings),
                          configured_rate=settings.provider_rate_limit)]


# --- python -m nova.metrics healthcheck ----------------------------------------------------

def healthcheck(port: str | None = None, timeout: float = 4.0) -> int:
    """0 when the local /healthz answers 200 (1 otherwise); 0 when metrics are off."""
    import urllib.error
    import urllib.request

    port = port if port is not None else os.environ.get("NOVA_METRICS_PORT", "").strip()
    if not port:
        print("NOVA_METRICS_PORT is not set: nothing to check")
        return 0
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{int(port)}/healthz",
                                    timeout=timeout) as answer:
            print(answer.read().decode(errors="replace"))
            return 0
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: {exc.code} {exc.read().decode(errors='replace')}")
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {exc}")
    return 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["healthcheck"]:
        print("usage: python -m nova.metrics healthcheck [PORT]", file=sys.stderr)
        return 2
    return healthcheck(args[1] if len(args) > 1 else None)


if __name__ == "__main__":
    raise SystemExit(main())
