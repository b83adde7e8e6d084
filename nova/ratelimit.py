"""Provider requests paced by a per-grant budget that every worker shares through Postgres.

A request spends its cost of its grant's budget (a Nylas request 1, a Gmail call its method's
quota units; the provider registry says whose budget and how much). Each HTTP request first
reserves a slot with `acquire_provider_budget` (sql/050_rate_limits.sql) and sleeps until it.
For Nylas the grant's rate is learned there (for Gmail it is fixed by the quota), shared by
every worker on every machine and kept across restarts: it grows while requests succeed and
callers queue for slots, and a 429 (`provider_rate_limited`) cuts it to a little under what
the provider really answered, its Retry-After holding the grant for every worker. The pacing
hooks into httpx's request/response events, so every request counts, including the pages the
provider fetches inside one call and its own transient retries.

    budget = ProviderBudget(pool, rate=10, burst=5, ceiling=200)
    provider = budgeted_nylas(budget, api_key, api_uri)

A caller may say how long it is willing to wait (`patience`, set around its requests): when
the grant's next slot is further off, no slot is taken and `BudgetWait` says when one frees,
so that a job of a busy grant goes back to its queue instead of holding a worker's slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx

from nova import metrics, store
from nova.config import Settings
from nova.providers import MailProvider
from nova.providers.nylas import NylasProvider, grant_of, parse_retry_after
from nova.providers.nylas import budget_key as nylas_budget_key
from nova.providers.registry import KINDS

log = logging.getLogger("nova.ratelimit")

__all__ = ["BudgetWait", "ProviderBudget", "budgeted_client", "budgeted_nylas",
           "grant_of", "patience", "provider_from_settings"]

ACQUIRE = "SELECT acquire_provider_budget($1, $2, $3, $4, $5, $6, $7)"
REPORT = "SELECT provider_answers_reported($1::text[], $2::int[])"
# Answers ride on the grant's next slot request; those still unreported this long after they
# came (no request followed: the grant's jobs were deferred, or the work ran out) are reported
# on their own, so the rate the provider answered is measured when it happened.
REPORT_AFTER = 0.5

# How long a request of the current task may wait for its grant's slot (None: as long as it
# takes). Set by the processors around their requests (nova.processor).
_PATIENCE: contextvars.ContextVar[float | None] = contextvars.ContextVar("nova_budget_patience",
                                                                         default=None)


@contextlib.contextmanager
def patience(seconds: float | None) -> Iterator[None]:
    """Requests made inside wait at most ``seconds`` for a slot, else raise `BudgetWait`."""
    token = _PATIENCE.set(seconds)
    try:
        yield
    finally:
        _PATIENCE.reset(token)


class BudgetWait(Exception):  # noqa: N818 - it is a decision, not a failure
    """The grant's next slot is `delay` seconds away, longer than the caller's patience: no
    slot was taken and nothing was sent."""

    def __init__(self, grant_id: str, delay: float) -> None:
        super().__init__(f"grant {grant_id}: no budget for {delay:.1f}s")
        self.grant_id = grant_id
        self.delay = delay
LIMITED = "SELECT provider_rate_limited($1, $2, $3, $4, $5)"


class ProviderBudget:
    """Waits for a grant's slot before each request; reports every answer so the grant's rate
    is learned (sql/050_rate_limits.sql): successes ride on the next slot request, a 429 cuts
    the rate at once and its Retry-After holds the grant for every worker.

    ``ceiling=None`` keeps the rate fixed at ``rate``."""

    def __init__(self, pool: asyncpg.Pool, rate: float, burst: float = 1.0, *,
                 ceiling: float | None = None, floor: float = 1.0,
                 api_delay_ms: int = 0, provider: str = "nylas",
                 key: Callable[[httpx.Request], tuple[str, float] | None] = nylas_budget_key,
                 refused: Callable[[int, bytes], bool] | None = None,
                 hold: float | None = None) -> None:
        self.pool = pool
        self.provider = provider  # the label of its requests in nova_provider_requests_total
        self.key = key  # whose budget a request spends, and its cost
        self.refused = refused  # a refusal other than a plain 429 (Gmail's 403 quota reasons)
        self.hold = hold  # after a refusal without Retry-After, every worker waits this long
        self.rate = rate
        self.burst = max(1.0, burst)
        self.ceiling = ceiling
        self.floor = floor
        self.api_delay = api_delay_ms / 1000
        self.waited = 0.0  # seconds spent waiting for slots (for logs and benchmarks)
        self.throttled = 0  # 429 answers seen by this process
        self.deferred = 0  # requests not sent: their slot was further off than the patience
        self._answered: dict[str, int] = {}  # per grant, not reported yet
        self._reporter: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, pool: asyncpg.Pool, settings: Settings,
                      kind: str = "nylas") -> ProviderBudget:
        plan = KINDS[kind].budget(settings)
        return cls(pool, plan.rate, plan.burst, ceiling=plan.ceiling, floor=plan.floor,
                   api_delay_ms=settings.api_delay_ms, provider=kind, key=plan.key,
                   refused=plan.refused, hold=plan.hold)

    async def acquire(self, grant_id: str, cost: float = 1.0) -> float:
        """Reserve the grant's next slot (``cost`` units of its rate) and sleep until it;
        returns the seconds waited. Under a `patience` the slot is taken only when it comes
        within it, else `BudgetWait`."""
        answered = self._answered.pop(grant_id, 0)
        limit = _PATIENCE.get()
        try:
            wait = float(await self.pool.fetchval(ACQUIRE, grant_id, self.rate, self.burst,
                                                  answered, self.ceiling, cost, limit))
        except BaseException:
            self._answered[grant_id] = self._answered.get(grant_id, 0) + answered
            raise
        if wait < 0:  # further off than the patience: not taken
            self.deferred += 1
            raise BudgetWait(grant_id, -wait)
        wait += self.api_delay
        if wait > 0:
            self.waited += wait
            await asyncio.sleep(wait)
        return wait

    async def limited(self, grant_id: str, sent_at: datetime,
                      retry_after: float | None) -> None:
        """A 429: cut the grant's rate (once per congestion event) and hold it for
        Retry-After, when the provider said how long."""
        self.throttled += 1
        if retry_after is None:
            retry_after = self.hold
        rate = await self.pool.fetchval(LIMITED, grant_id, sent_at, retry_after, self.rate,
                                        self.floor)
        log.warning("[RateLimit] 429 from provider grant=%s rate=%.1f/s%s", grant_id, rate,
                    f" hold={retry_after:.1f}s" if retry_after is not None else "")

    # --- httpx event hooks -------------------------------------------------------------------

    async def on_request(self, request: httpx.Request) -> None:
        key = self.key(request)
        if key is not None:
            waited = await self.acquire(*key)
            sent = datetime.now(UTC)
            # A 429 is a new congestion event only for a slot granted after the last cut:
            # slots handed out ahead at the old rate are sent after it, and each of their
            # 429s cut the rate again (from a 60/s limit down to 27/s in one burst).
            request.extensions["nova_granted_at"] = sent - timedelta(seconds=waited)
            store.request_sent(sent)  # a fetch's version is of this moment, not before the wait

    async def on_response(self, response: httpx.Response) -> None:
        metrics.provider_answer(self.provider, response.status_code)
        request = response.request
        key = self.key(request)
        if key is None:
            return
        grant_id = key[0]
        status = response.status_code
        if status == 429 or (status == 403 and self.refused is not None
                             and self.refused(status, await response.aread())):
            await self.limited(grant_id, request.extensions.get("nova_granted_at")
                               or datetime.now(UTC),
                               parse_retry_after(response.headers.get("retry-after")))
        elif status < 500:
            self._answered[grant_id] = self._answered.get(grant_id, 0) + 1
            if self._reporter is None:
                self._reporter = asyncio.create_task(self._report_later(),
                                                     name="budget:answers")

    async def _report_later(self) -> None:
        """Report the answers that no slot request carried within REPORT_AFTER."""
        try:
            await asyncio.sleep(REPORT_AFTER)
        finally:
            self._reporter = None
        pending, self._answered = self._answered, {}
        if not pending:
            return
        try:
            await self.pool.execute(REPORT, list(pending), list(pending.values()))
        except Exception as exc:  # the next slot request carries them
            for grant_id, n in pending.items():
                self._answered[grant_id] = self._answered.get(grant_id, 0) + n
            log.debug("[RateLimit] answers not reported (%s)", exc)

    async def aclose(self) -> None:
        """Stop the pending report (its answers are only a measurement)."""
        reporter, self._reporter = self._reporter, None
        if reporter is not None:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)


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
                           transient_retries: int = 0, kind: str = "nylas",
                           ) -> tuple[MailProvider, httpx.AsyncClient]:
    """The provider of ``kind`` on a client whose every request spends ``budget`` (a provider
    with per-inbox credentials reads them through the budget's pool)."""
    provider_kind = KINDS[kind]
    if not provider_kind.configured(settings):
        raise SystemExit(f"{provider_kind.setting} is not set")
    client = budgeted_client(budget, max_connections=max(20, settings.batch_size * 2))
    return provider_kind.build(settings, client, transient_retries, budget.pool), client
