"""Provider requests paced by a per-grant budget that every worker shares through Postgres.

Each HTTP request to the provider first reserves a slot of its grant with
`acquire_provider_budget` (sql/050_rate_limits.sql) and sleeps until that slot. The grant's rate
is learned there, shared by every worker on every machine and kept across restarts: it grows
while requests succeed and callers queue for slots, and a 429 (`provider_rate_limited`) cuts it
to a little under what the provider really answered, its Retry-After holding the grant for
every worker. The pacing hooks into httpx's request/response events, so every request counts,
including the pages the provider fetches inside one call and its own transient retries.

    budget = ProviderBudget(pool, rate=10, burst=5, ceiling=200)
    provider = budgeted_nylas(budget, api_key, api_uri)
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import asyncpg
import httpx

from nova import metrics
from nova.config import Settings, settings_or_exit
from nova.logs import setup_logging
from nova.providers import (
    AuthExpired,
    GrantNotFound,
    InvalidApiKey,
    MailProvider,
    ProviderError,
    RateLimited,
    Transient,
    Unauthorized,
)
from nova.providers.nylas import NylasProvider, grant_of, parse_retry_after
from nova.providers.nylas import budget_key as nylas_budget_key
from nova.providers.registry import KINDS, configured
from nova.runtime import (
    Fatal,
    GiveUp,
    Processor,
    RetryLater,
    RetryPolicy,
    Runnable,
    Worker,
    run_parts,
)

log = logging.getLogger("nova.ratelimit")

__all__ = ["ProviderBudget", "ProviderProcessor", "budgeted_client", "budgeted_nylas",
           "grant_of", "provider_from_settings"]

ACQUIRE = "SELECT acquire_provider_budget($1, $2, $3, $4, $5, $6)"
LIMITED = "SELECT provider_rate_limited($1, $2, $3, $4, $5)"
MAX_RATE_LIMITED_IN_A_ROW = 10
T = TypeVar("T")


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
        self._answered: dict[str, int] = {}  # per grant, not reported yet

    @classmethod
    def from_settings(cls, pool: asyncpg.Pool, settings: Settings,
                      kind: str = "nylas") -> ProviderBudget:
        plan = KINDS[kind].budget(settings)
        return cls(pool, plan.rate, plan.burst, ceiling=plan.ceiling, floor=plan.floor,
                   api_delay_ms=settings.api_delay_ms, provider=kind, key=plan.key,
                   refused=plan.refused, hold=plan.hold)

    async def acquire(self, grant_id: str, cost: float = 1.0) -> float:
        """Reserve the grant's next slot (``cost`` units of its rate) and sleep until it;
        returns the seconds waited."""
        answered = self._answered.pop(grant_id, 0)
        try:
            wait = float(await self.pool.fetchval(ACQUIRE, grant_id, self.rate, self.burst,
                                                  answered, self.ceiling, cost))
        except BaseException:
            self._answered[grant_id] = self._answered.get(grant_id, 0) + answered
            raise
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
            await self.acquire(*key)
            request.extensions["nova_sent_at"] = datetime.now(UTC)

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
            await self.limited(grant_id, request.extensions.get("nova_sent_at")
                               or datetime.now(UTC),
                               parse_retry_after(response.headers.get("retry-after")))
        elif status < 500:
            self._answered[grant_id] = self._answered.get(grant_id, 0) + 1


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


async def refuse_inbox(conn: asyncpg.Connection | asyncpg.Pool, inbox_id: object,
                       status: str) -> None:
    """The grant itself confirmed a refusal: the inbox becomes `status` (auth_expired or
    revoked) through the one function that changes an inbox's status (nova_set_inbox_status,
    sql/020_webhooks.sql), at this moment."""
    await conn.execute("SELECT 1 FROM nova_set_inbox_status($1, $2)", inbox_id, status)


class ProviderProcessor(Processor):
    """A processor that calls providers: it builds one budgeted provider per configured kind
    (nova.providers.registry) when none is given, hands out the one an inbox's `provider`
    names, and closes what it built."""

    transient_retries: int = 0

    def __init__(self, settings: Settings, provider: MailProvider | None = None, *,
                 retry_base_delay: float = 2.0, retry_max_delay: float = 300.0) -> None:
        self.settings = settings
        self.provider = provider  # given (tests): used for every kind, not budgeted
        self.retry_base_delay = retry_base_delay
        self.retry_max_delay = retry_max_delay
        self.providers: dict[str, MailProvider] = {}
        self._clients: list[httpx.AsyncClient] = []

    @property
    def budgeted(self) -> bool:
        """True when requests go through the shared budget (which waits out 429s)."""
        return bool(self._clients)

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts, self.retry_base_delay, self.retry_max_delay)

    async def setup(self, worker: Worker) -> None:
        if self.provider is not None:
            return
        for kind in configured(self.settings):
            budget = ProviderBudget.from_settings(worker.pool, self.settings, kind.name)
            provider, client = provider_from_settings(
                self.settings, budget, transient_retries=self.transient_retries,
                kind=kind.name)
            self.providers[kind.name] = provider
            self._clients.append(client)

    async def teardown(self) -> None:
        for provider in [*self.providers.values(),
                         *([self.provider] if self.provider is not None else [])]:
            await provider.aclose()
        for client in self._clients:
            await client.aclose()

    @classmethod
    def main(cls) -> int:
        """`python -m nova.<processor>`: this processor alone, until SIGTERM/SIGINT."""
        settings = settings_or_exit()
        setup_logging(settings.log_level, settings.log_format)
        if not configured(settings):
            names = " or ".join(kind.setting for kind in KINDS.values())
            print(f"no provider is configured: set {names}"
                  " (python -m nova runs a sandbox without it)", file=sys.stderr)
            return 2
        parts: list[Runnable] = [Worker(cls(settings), settings),
                                 *metrics.server_parts(settings, cls.component)]
        return asyncio.run(run_parts(parts))  # 2 on runtime.Fatal

    def provider_for(self, kind: str) -> MailProvider:
        """The provider of an inbox whose `provider` is ``kind``."""
        if self.provider is not None:
            return self.provider
        try:
            return self.providers[kind]
        except KeyError:
            setting = KINDS[kind].setting if kind in KINDS else "its settings"
            raise GiveUp(f"provider {kind} is not configured ({setting})") from None

    @property
    def api(self) -> MailProvider:
        """The Nylas provider (webhooks and attachments of Nylas inboxes)."""
        return self.provider_for("nylas")

    async def call(self, request: Callable[[], Awaitable[T]], grant_id: str | None = None,
                   kind: str = "nylas") -> T:
        """Run a provider request, trying again after a 429. The budget holds the grant for
        its Retry-After, so the next try waits by itself; too many 429s in a row become a
        retry of the whole job.

        A 401/403 says nothing certain (Nylas answers api.authentication_error for a bad API
        key, a grant of another region and an expired grant alike), so with ``grant_id`` it is
        confirmed with the grant itself (`confirm_unauthorized`). An API key the provider
        refuses stops the processor (runtime.Fatal): every job would fail the same way."""
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
            except Unauthorized as exc:
                if grant_id is None:
                    raise AuthExpired(str(exc), status=exc.status,
                                      error_type=exc.error_type) from exc
                raise await self.confirm_unauthorized(grant_id, exc, kind) from exc
            except InvalidApiKey as exc:
                raise Fatal(f"the provider refused the API key: {exc}") from exc

    async def confirm_unauthorized(self, grant_id: str, error: Unauthorized,
                                   kind: str = "nylas") -> Exception:
        """What a 401/403 for ``grant_id`` means, asked of the grant (for Nylas GET
        /v3/grants/{id}, https://developer.nylas.com/docs/reference/api/manage-grants/): the
        error to raise."""
        try:
            grant = await self.provider_for(kind).get_grant(grant_id)
        except (Unauthorized, InvalidApiKey) as exc:
            # Application calls fail too: the key (or its region) is wrong, not the grant.
            return Fatal(f"the provider refused the application's credentials "
                         f"({KINDS[kind].setting}, and its API URI): {exc}")
        except GrantNotFound as exc:
            return exc
        except ProviderError as exc:  # could not confirm: try the job again later
            return Transient(f"{error} (grant check failed: {exc})")
        if grant.is_valid:
            return Transient(f"{error} (the grant is valid: not an expiry)")
        log.warning("[RateLimit] grant=%s confirmed %s after a %s", grant_id,
                    grant.status or "not valid", error.status)
        return AuthExpired(f"grant is {grant.status or 'not valid'}: {error}",
                           status=error.status, error_type=error.error_type)
