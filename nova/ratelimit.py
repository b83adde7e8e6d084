"""Provider requests paced by a per-grant budget that every worker shares through Postgres.

Each HTTP request to the provider first reserves a slot of its grant with
`acquire_provider_budget` (sql/050_rate_limits.sql) and sleeps until that slot; a 429 answer
records its Retry-After with `hold_provider_grant`, so every worker on every machine waits it
out, not only the one that was refused. The pacing hooks into httpx's request/response events,
so every request counts, including the pages the provider fetches inside one call and its own
transient retries.

    budget = ProviderBudget(pool, rate=10, burst=5)
    provider = budgeted_nylas(budget, api_key, api_uri)
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar
from urllib.parse import unquote

import asyncpg
import httpx

from nova.config import Settings, settings_or_exit
from nova.logs import setup_logging
from nova.providers import MailProvider, RateLimited
from nova.providers.nylas import NylasProvider, parse_retry_after
from nova.runtime import Processor, RetryLater, RetryPolicy, Worker, run_parts

log = logging.getLogger("nova.ratelimit")

ACQUIRE = "SELECT acquire_provider_budget($1, $2, $3)"
HOLD = "SELECT hold_provider_grant($1, $2)"
MAX_RATE_LIMITED_IN_A_ROW = 10
T = TypeVar("T")
DEFAULT_RETRY_AFTER = 1.0


class ProviderBudget:
    """Waits for a grant's slot before each request; turns 429s into a shared hold."""

    def __init__(self, pool: asyncpg.Pool, rate: float, burst: float = 1.0, *,
                 api_delay_ms: int = 0) -> None:
        self.pool = pool
        self.rate = rate
        self.burst = max(1.0, burst)
        self.api_delay = api_delay_ms / 1000
        self.waited = 0.0  # seconds spent waiting for slots (for logs and benchmarks)
        self.throttled = 0  # 429 answers seen by this process

    @classmethod
    def from_settings(cls, pool: asyncpg.Pool, settings: Settings) -> ProviderBudget:
        return cls(pool, settings.provider_rate_limit, settings.provider_burst,
                   api_delay_ms=settings.api_delay_ms)

    async def acquire(self, grant_id: str) -> float:
        """Reserve the grant's next slot and sleep until it; returns the seconds waited."""
        wait = float(await self.pool.fetchval(ACQUIRE, grant_id, self.rate, self.burst))
        wait += self.api_delay
        if wait > 0:
            self.waited += wait
            await asyncio.sleep(wait)
        return wait

    async def hold(self, grant_id: str, retry_after: float | None) -> None:
        """Make every worker wait `retry_after` seconds before the grant's next request."""
        seconds = DEFAULT_RETRY_AFTER if retry_after is None else retry_after
        self.throttled += 1
        until = datetime.now(UTC) + timedelta(seconds=seconds)
        await self.pool.execute(HOLD, grant_id, until)
        log.warning("[RateLimit] 429 from provider grant=%s hold=%.1fs", grant_id, seconds)

    # --- httpx event hooks -------------------------------------------------------------------

    async def on_request(self, request: httpx.Request) -> None:
        grant_id = grant_of(request.url.raw_path.decode("ascii", "replace"))
        if grant_id is not None:
            await self.acquire(grant_id)

    async def on_response(self, response: httpx.Response) -> None:
        if response.status_code != 429:
            return
        grant_id = grant_of(response.request.url.raw_path.decode("ascii", "replace"))
        if grant_id is not None:
            await self.hold(grant_id, parse_retry_after(response.headers.get("retry-after")))


def grant_of(path: str) -> str | None:
    """The grant of a grant-scoped Nylas path (/v3/grants/{grant}/...); None otherwise."""
    parts = path.split("?", 1)[0].split("/")
    if len(parts) >= 5 and parts[1] == "v3" and parts[2] == "grants" and parts[3]:
        return unquote(parts[3])
    return None


def budgeted_client(budget: ProviderBudget, *, timeout: float = 30.0,
                    max_connections: int = 20) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(max_connections=max_connections,
                            max_keepalive_connections=max_connections),
        headers={"User-Agent": "nova"},
        event_hooks={"request": [budget.on_request], "response": [budget.on_response]})


def budgeted_nylas(budget: ProviderBudget, api_key: str, api_uri: str, *,
                   transient_retries: int = 0, timeout: float = 30.0,
                   max_connections: int = 20) -> tuple[NylasProvider, httpx.AsyncClient]:
    """A NylasProvider whose every request goes through the budget, and its client (the
    caller closes it: a provider does not close a client it was given)."""
    client = budgeted_client(budget, timeout=timeout, max_connections=max_connections)
    provider = NylasProvider(api_key, api_uri, client=client, timeout=timeout,
                             transient_retries=transient_retries)
    return provider, client


def provider_from_settings(settings: Settings, budget: ProviderBudget, *,
                           transient_retries: int = 0,
                           ) -> tuple[NylasProvider, httpx.AsyncClient]:
    if settings.nylas_api_key is None:
        raise SystemExit("NYLAS_API_KEY is not set")
    return budgeted_nylas(budget, settings.nylas_api_key.get_secret_value(),
                          settings.nylas_api_uri, transient_retries=transient_retries,
                          max_connections=max(20, settings.batch_size * 2))


class ProviderProcessor(Processor):
    """A processor that calls the provider: it builds a budgeted provider from the settings
    when none is given, and closes what it built."""

    transient_retries: int = 0

    def __init__(self, settings: Settings, provider: MailProvider | None = None, *,
                 retry_base_delay: float = 2.0, retry_max_delay: float = 300.0) -> None:
        self.settings = settings
        self.provider = provider
        self.retry_base_delay = retry_base_delay
        self.retry_max_delay = retry_max_delay
        self._client: httpx.AsyncClient | None = None

    @property
    def budgeted(self) -> bool:
        """True when requests go through the shared budget (which waits out 429s)."""
        return self._client is not None

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts, self.retry_base_delay, self.retry_max_delay)

    async def setup(self, worker: Worker) -> None:
        if self.provider is None:
            budget = ProviderBudget.from_settings(worker.pool, self.settings)
            self.provider, self._client = provider_from_settings(
                self.settings, budget, transient_retries=self.transient_retries)

    async def teardown(self) -> None:
        if self.provider is not None:
            await self.provider.aclose()
        if self._client is not None:
            await self._client.aclose()

    @classmethod
    def main(cls) -> int:
        """`python -m nova.<processor>`: this processor alone, until SIGTERM/SIGINT."""
        settings = settings_or_exit()
        setup_logging(settings.log_level, settings.log_format)
        if settings.nylas_api_key is None:
            print("NYLAS_API_KEY is not set (python -m nova runs a sandbox without it)",
                  file=sys.stderr)
            return 2
        asyncio.run(run_parts([Worker(cls(settings), settings)]))
        return 0

    @property
    def api(self) -> MailProvider:
        assert self.provider is not None, "processor not set up"
        return self.provider

    async def call(self, request: Callable[[], Awaitable[T]]) -> T:
        """Run a provider request, trying again after a 429. The budget holds the grant for
        its Retry-After, so the next try waits by itself; too many 429s in a row become a
        retry of the whole job."""
        limited = 0
        while True:
            try:
                return await request()
            except RateLimited as exc:
                limited += 1
                if limited >= MAX_RATE_LIMITED_IN_A_ROW:
                    raise RetryLater(f"rate limited {limited} times in a row",
                                     exc.retry_after) from exc
                if not self.budgeted:  # nothing else will wait: do it here
                    await asyncio.sleep(min(exc.retry_after or 1.0, 60.0))
