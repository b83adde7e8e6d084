"""Prometheus metrics and `/healthz` of every Nova process, on NOVA_METRICS_PORT when it is set.

Two kinds of series:

- What this process did, counted where it happens (the runtime, the provider budget, the webhook
  processor): `nova_jobs_total{queue,outcome}`, `nova_job_duration_seconds{queue}`,
  `nova_provider_requests_total{provider,status}`, `nova_webhook_lag_seconds`. Sum them over
  the fleet in Prometheus.
- What the fleet has to do, read from Postgres when scraped (`PostgresCollector`):
  `nova_queue_depth{queue}`, `nova_queue_oldest_message_age_seconds{queue}`,
  `nova_queue_dead_letters{queue}`, `nova_provider_rate{provider,stat}`,
  `nova_provider_grants{provider}`, `nova_provider_grants_held{provider}`,
  `nova_backfill_threads{status}`, `nova_backfills{status}`, `nova_database_up`. Any one
  process gives the whole fleet's view; take one (max by queue) rather than a sum.

No label value names a grant, a mailbox or an address: a grant id is a Nylas account's key and
a Gmail grant is the user's e-mail address, and a scrape endpoint (or the Prometheus behind it)
is no place for either. The per-grant budget is therefore exported aggregated by provider kind
(`nova`'s CLI and the `provider_rate_limits` table have the per-grant detail). A short hash of
the grant was the other choice and was rejected: an unkeyed hash of an address is undone by
hashing the addresses one suspects, a keyed one needs a key to manage, and either makes the
series count grow with the fleet.

The Postgres figures cost a few small queries per scrape and nothing between scrapes: they
run in the HTTP server's thread (never on the event loop) over one psycopg connection with
short connect and statement timeouts, and a scrape within a second of the last one is served
from its result. A database that does not answer makes `nova_database_up` 0 and leaves the
other Postgres series out of that scrape; the process's own counters are always there.

The server is prometheus_client's threaded WSGI server on NOVA_METRICS_HOST (loopback unless
set) and NOVA_METRICS_PORT: `/metrics` (text format, or OpenMetrics when asked) and `/healthz`,
a bare `ok` (200) while the process's event loop turns, `unavailable` (503) when the loop has
not ticked for HEALTH_STALE_SECONDS or the process is stopping; the reason goes to the log, once
per change. The port is taken when the process starts (`server_parts`), before any work: a port
that cannot be had (in use, say) stops the process with exit status 2 and one line naming it;
the metrics never move to another port or interface. NOVA_METRICS_PORT=0 asks for a free port
on NOVA_METRICS_HOST, logged.

`python -m nova.metrics healthcheck` asks the local `/healthz` (the Docker HEALTHCHECK).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
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

from nova import db

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

# Dead letters are the queue's PGMQ archive (only the runtime archives). Depth and dead letters
# are counted exactly up to a cap and estimated past it (nova_queue_overview), so a scrape
# never walks a long queue or a large archive.
DEAD_LETTER_CAP = 10_000
QUEUES = """
SELECT queue_name, queue_length, oldest_msg_age_sec, dead_letters
FROM nova_queue_overview(%s)
"""
# The grants' budgets by provider kind, never by grant (module docstring): how many, how many
# a refusal holds now, and the lowest, median and highest rate. A grant whose rate is not
# learned runs at its kind's configured one: Nylas's NOVA_PROVIDER_RATE_LIMIT until learned,
# Gmail's quota rate always (never learned). A budget key names its provider before a colon
# (Gmail's 'gmail:<address>', nova.providers.gmail.user_key); a bare key is a Nylas grant id.
RATES = """
SELECT provider, count(*) AS grants, count(*) FILTER (WHERE held_until > now()) AS held,
       min(r), percentile_cont(0.5) WITHIN GROUP (ORDER BY r), max(r)
FROM (SELECT CASE WHEN grant_id LIKE 'gmail:%%' THEN 'gmail' ELSE 'nylas' END AS provider,
             held_until, rate FROM provider_rate_limits) k,
     LATERAL (SELECT coalesce(k.rate, CASE k.provider WHEN 'gmail' THEN %(gmail)s
                                                      ELSE %(nylas)s END) AS r) c
GROUP BY provider
"""
RATE_STATS = ("min", "median", "max")
BACKFILL_THREADS = """
SELECT coalesce(sum(threads_pending), 0) AS queued,
       coalesce(sum(threads_processing), 0) AS processing,
       coalesce(sum(threads_completed), 0) AS completed,
       coalesce(sum(threads_failed), 0) AS failed
FROM nova_backfill_progress('{}', true)
"""
BACKFILLS = """
SELECT backfill_status, count(*) FROM flux_inbox_configurations WHERE deleted_at IS NULL
GROUP BY backfill_status
"""
BACKFILL_STATUSES = ("pending", "queued", "discovering", "thread_sync", "completed", "failed")
# The series PostgresCollector exports (for the dashboard's test).
POSTGRES_SERIES = ("nova_database_up", "nova_queue_depth", "nova_queue_oldest_message_age_seconds",
                   "nova_queue_dead_letters", "nova_provider_rate", "nova_provider_grants",
                   "nova_provider_grants_held", "nova_backfill_threads", "nova_backfills")


class PostgresCollector:
    """The fleet's figures, read from Postgres when scraped (in the scraping thread)."""

    def __init__(self, url: str, configured_rate: float, *, gmail_rate: float | None = None,
                 timeout: float = 3.0, min_interval: float = 1.0) -> None:
        self.url = url
        self.configured_rate = configured_rate  # Nylas: where a grant starts
        self.gmail_rate = configured_rate if gmail_rate is None else gmail_rate  # quota units/s
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
                # db.connect prepares nothing, and the timeout is set per scrape, inside its
                # transaction: a transaction-mode pooler refuses `options` at connect and keeps
                # neither prepared statements nor session settings between transactions.
                self._conn = db.connect(self.url, autocommit=True,
                                        connect_timeout=max(1, int(self.timeout)),
                                        application_name="nova-metrics")
            with self._conn.transaction():
                # JIT off too, per transaction for the same reason (db.NO_JIT)
                self._conn.execute("SELECT set_config('statement_timeout', %s, true),"
                                   " set_config('jit', 'off', true)",
                                   (str(int(self.timeout * 1000)),))
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
        depth = GaugeMetricFamily("nova_queue_depth", "Messages in the queue, visible or held.",
                                  labels=["queue"])
        oldest = GaugeMetricFamily("nova_queue_oldest_message_age_seconds",
                                   "Age of the queue's oldest message (0 when empty).",
                                   labels=["queue"])
        dead = GaugeMetricFamily("nova_queue_dead_letters", "Messages archived after their last "
                                 "attempt (the queue's PGMQ archive).", labels=["queue"])
        queues = conn.execute(QUEUES, (DEAD_LETTER_CAP,)).fetchall()
        for name, length, age, dead_letters in queues:
            depth.add_metric([name], length)
            oldest.add_metric([name], age or 0)
            dead.add_metric([name], dead_letters)

        rate = GaugeMetricFamily("nova_provider_rate", "The lowest, median and highest rate "
                                 "the provider's grants may send at (Nylas: requests/s; Gmail: "
                                 "quota units/s): learned, or configured until learned.",
                                 labels=["provider", "stat"])
        grants = GaugeMetricFamily("nova_provider_grants", "Grants with a request budget.",
                                   labels=["provider"])
        held = GaugeMetricFamily("nova_provider_grants_held", "Grants a provider's refusal (429 "
                                 "and its Retry-After) holds now.", labels=["provider"])
        configured = {"nylas": self.configured_rate, "gmail": self.gmail_rate}
        for provider, count, holding, *stats in conn.execute(RATES, configured):
            grants.add_metric([provider], count)
            held.add_metric([provider], holding)
            for stat, value in zip(RATE_STATS, stats, strict=True):
                rate.add_metric([provider, stat], value)

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
        return [depth, oldest, dead, rate, grants, held, threads, backfills]


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


class PortUnavailable(OSError):
    """NOVA_METRICS_HOST:NOVA_METRICS_PORT cannot be bound; the message is one line for the
    operator."""


class MetricsServer:
    """A part of a process (see nova.runtime.run_parts): serves /metrics and /healthz from a
    thread while the process runs; its own loop proves the event loop turns."""

    def __init__(self, port: int, *, host: str = "127.0.0.1", component: str = "nova",
                 database_url: str | None = None, url_for: Callable[[], str] | None = None,
                 configured_rate: float = 10.0, gmail_rate: float | None = None) -> None:
        self.requested_port = port
        self.host = host
        self.component = component
        self.database_url = database_url
        self.url_for = url_for  # how to find the database when no URL is given (embedded)
        self.configured_rate = configured_rate
        self.gmail_rate = gmail_rate
        self.port: int | None = None  # the bound port, once bound
        self.collector: PostgresCollector | None = None
        self._tick = time.monotonic()
        self._stopping = asyncio.Event()
        self._ready = threading.Event()
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._metrics_app: Callable[..., Any] | None = None
        self._health_lock = threading.Lock()
        self._health_state = "ok"

    def stop(self) -> None:
        self._stopping.set()

    def bind(self) -> None:
        """Take the port now, so that a process whose port is taken stops before it starts any
        work (server_parts); requests wait in the backlog until run() serves them. Raises
        PortUnavailable. Never another port or another interface: a scraper (or the Docker
        health check) asking the configured one would find another process's answers there."""
        if self._server is not None:
            return
        try:
            family = socket.getaddrinfo(self.host, self.requested_port, type=socket.SOCK_STREAM,
                                        flags=socket.AI_PASSIVE)[0][0]

            class Server(ThreadingWSGIServer):
                address_family = family

            self._server = make_server(self.host, self.requested_port, self._app, Server,
                                       handler_class=_Quiet)
        except OSError as exc:
            taken = " (another process has it: give each instance on a host its own port)" \
                if exc.errno == errno.EADDRINUSE else ""
            raise PortUnavailable(
                f"cannot serve metrics on {self.host}:{self.requested_port} "
                f"(NOVA_METRICS_HOST:NOVA_METRICS_PORT): {exc.strerror or exc}{taken}; "
                f"unset NOVA_METRICS_PORT to run without metrics") from None
        self.port = int(self._server.server_port)

    async def run(self) -> None:
        self._tick = time.monotonic()
        try:
            self.bind()
        except PortUnavailable as exc:
            from nova.runtime import Fatal  # nova.runtime imports this module

            log.error("[Metrics] %s", exc)
            raise Fatal(str(exc)) from None
        assert self._server is not None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Process())
        if self.database_url is None and self.url_for is not None:
            # On the loop's thread, as the other parts do: the embedded server is started (or
            # joined) once per process, never by two threads at once.
            self.database_url = self.url_for()
        if self.database_url is not None:
            self.collector = PostgresCollector(self.database_url, self.configured_rate,
                                               gmail_rate=self.gmail_rate)
            registry.register(self.collector)
        self._metrics_app = make_wsgi_app(registry)
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

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") == "/healthz":
            return self._health(start_response)
        if self._metrics_app is None:  # bound, not serving yet
            return _plain(start_response, "503 Service Unavailable", "unavailable")
        return self._metrics_app(environ, start_response)

    def _close(self) -> None:
        if self._server is not None:
            if self._thread is not None:
                self._server.shutdown()
            self._server.server_close()
        if self.collector is not None:
            self.collector.close()

    def _health(self, start_response: Callable[..., Any]) -> list[bytes]:
        """A bare status for whoever probes; why it is what it is goes to the log, once per
        change."""
        stale = time.monotonic() - self._tick
        if self._stopping.is_set():
            state = "stopping"
        elif stale > HEALTH_STALE_SECONDS:
            state = "stalled"
        else:
            state = "ok"
        with self._health_lock:
            was, self._health_state = self._health_state, state
        if state != was:
            if state == "stalled":
                log.warning("[Metrics] /healthz answers 503: the event loop has not turned for "
                            "%.1fs component=%s", stale, self.component)
            else:
                log.info("[Metrics] /healthz answers %s component=%s",
                         "200 again" if state == "ok" else "503: stopping", self.component)
        if state == "ok":
            return _plain(start_response, "200 OK", "ok")
        return _plain(start_response, "503 Service Unavailable", "unavailable")


def _plain(start_response: Callable[..., Any], status: str, text: str) -> list[bytes]:
    data = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(data)))])
    return [data]


def server_parts(settings: Any, component: str, *, database_url: str | None = None,
                 ) -> list[MetricsServer]:
    """The metrics server of a process, as a part for run_parts, its port already taken: none
    without NOVA_METRICS_PORT. A port that cannot be had ends the process here, with exit
    status 2 and one line, before it starts any work."""
    if settings.metrics_port is None:
        return []
    from nova import db
    from nova.providers.registry import gmail_budget

    server = MetricsServer(settings.metrics_port, host=settings.metrics_host,
                           component=component, database_url=database_url,
                           url_for=lambda: db.database_url(settings),
                           configured_rate=settings.provider_rate_limit,
                           gmail_rate=gmail_budget(settings).rate)
    try:
        server.bind()
    except PortUnavailable as exc:
        log.error("[Metrics] %s", exc)
        raise SystemExit(2) from None
    return [server]


# --- python -m nova.metrics healthcheck ----------------------------------------------------

def probe_host(host: str) -> str:
    """Where the local health check finds a server bound to ``host``: loopback for the
    wildcard addresses, else the host itself (bracketed when IPv6)."""
    host = host.strip()
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def healthcheck(port: str | None = None, timeout: float = 4.0) -> int:
    """0 when the local /healthz answers 200 (1 otherwise); 0 when metrics are off."""
    import urllib.error
    import urllib.request

    port = port if port is not None else os.environ.get("NOVA_METRICS_PORT", "").strip()
    if not port:
        print("NOVA_METRICS_PORT is not set: nothing to check")
        return 0
    host = probe_host(os.environ.get("NOVA_METRICS_HOST", ""))
    try:
        with urllib.request.urlopen(f"http://{host}:{int(port)}/healthz",
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
