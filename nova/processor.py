"""The base of every processor that calls providers (backfill, threads, webhooks,
attachments): one budgeted provider per configured kind (nova.providers.registry), the one an
inbox's `provider` names handed out, 429s waited out through the shared budget
(nova.ratelimit), and a 401/403 confirmed with the grant itself before an inbox is stopped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
from collections.abc import Awaitable, Callable
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
from nova.providers.registry import KINDS, configured
from nova.ratelimit import BudgetWait, ProviderBudget, provider_from_settings
from nova.ratelimit import patience as waiting_at_most
from nova.runtime import (
    Defer,
    Fatal,
    GiveUp,
    Processor,
    RetryLater,
    RetryPolicy,
    Runnable,
    Worker,
    run_parts,
    run_process,
)

log = logging.getLogger("nova.processor")


def lower_priority(nice: int, component: str) -> None:
    """Run this process at nice value `nice` at least (Unix; a higher value only: raising a
    priority needs privileges). Under CPU contention the scheduler then serves the others
    first; an idle host gives the process all the CPU it asks for either way."""
    if nice <= 0 or not hasattr(os, "nice"):
        return
    current = os.nice(0)
    if nice > current:
        os.nice(nice - current)
        log.info("[%s] CPU priority: nice %d (NOVA_THREADS_NICE): live work in the other "
                 "processes goes first when the CPU is short", component, nice)

MAX_RATE_LIMITED_IN_A_ROW = 10
# A job of an inbox whose provider this process has no settings for comes back this often
# (another process, or this one restarted with the setting, may take it meanwhile).
UNCONFIGURED_DEFER_SECONDS = 60.0
T = TypeVar("T")


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
    # How many times NOVA_BUDGET_PATIENCE_SECONDS a request of this processor waits for its
    # grant's slot before its job goes back to the queue (None: it waits; live mail does).
    patience_factor: float | None = 1.0

    def __init__(self, settings: Settings, provider: MailProvider | None = None, *,
                 retry_base_delay: float = 2.0, retry_max_delay: float = 300.0) -> None:
        self.settings = settings
        self.provider = provider  # given (tests): used for every kind, not budgeted
        self.retry_base_delay = retry_base_delay
        self.retry_max_delay = retry_max_delay
        self.providers: dict[str, MailProvider] = {}
        self._clients: list[httpx.AsyncClient] = []
        self._budgets: list[ProviderBudget] = []

    @property
    def patience(self) -> float | None:
        """Seconds a request waits for its grant's slot before the job is deferred."""
        if self.patience_factor is None or not self.budgeted:
            return None
        return self.patience_factor * self.settings.budget_patience_seconds

    @property
    def budgeted(self) -> bool:
        """True when requests go through the shared budget (which waits out 429s)."""
        return bool(self._clients)

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts, self.retry_base_delay, self.retry_max_delay)

    async def setup(self, worker: Worker) -> None:
        if self.provider is not None:
            return
        kinds = configured(self.settings)
        for kind in KINDS.values():
            if kind not in kinds:
                log.info("[%s] %s is not configured (%s unset): jobs of its inboxes wait, "
                         "untouched", self.component, kind.name, kind.setting)
        for kind in kinds:
            budget = ProviderBudget.from_settings(worker.pool, self.settings, kind.name)
            provider, client = provider_from_settings(
                self.settings, budget, transient_retries=self.transient_retries,
                kind=kind.name)
            self.providers[kind.name] = provider
            self._clients.append(client)
            self._budgets.append(budget)

    async def teardown(self) -> None:
        for provider in [*self.providers.values(),
                         *([self.provider] if self.provider is not None else [])]:
            await provider.aclose()
        for client in self._clients:
            await client.aclose()
        for budget in self._budgets:
            await budget.aclose()

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
        lower_priority(cls.niceness(settings), cls.component)
        parts: list[Runnable] = [Worker(cls(settings), settings),
                                 *metrics.server_parts(settings, cls.component)]
        return run_process(run_parts(parts))  # 2 on runtime.Fatal

    @classmethod
    def niceness(cls, settings: Settings) -> int:
        """The Unix nice value this processor's process runs at, at least (0: as started)."""
        return 0

    def provider_for(self, kind: str) -> MailProvider:
        """The provider of an inbox whose `provider` is ``kind``. A kind this process has no
        settings for defers the job (no attempt counted, nothing written): a deployment that
        configures only Gmail leaves its Nylas inboxes exactly as they are."""
        if self.provider is not None:
            return self.provider
        if kind not in KINDS:
            raise GiveUp(f"unknown provider {kind!r}")
        try:
            return self.providers[kind]
        except KeyError:
            raise Defer(f"provider {kind} is not configured ({KINDS[kind].setting})",
                        UNCONFIGURED_DEFER_SECONDS) from None

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
        refuses stops the processor (runtime.Fatal): every job would fail the same way.

        A grant whose next slot is further off than this processor's patience (a busy grant,
        or one held after a 429) defers the job (runtime.Defer, no attempt counted) until about
        when the slot frees: the worker takes other inboxes' jobs meanwhile."""
        limited = 0
        while True:
            try:
                with waiting_at_most(self.patience):
                    return await request()
            except BudgetWait as exc:
                # A little spread, so that the jobs of one grant do not all come back at once.
                raise Defer(str(exc), exc.delay + random.uniform(0, self.patience or 1.0),
                            grant=grant_id) from None
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
            except GrantNotFound as exc:
                if grant_id is None:
                    raise
                confirmed = await self.confirm_gone(grant_id, exc, kind)
                if confirmed is exc:
                    raise
                raise confirmed from exc
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
            return await self.confirm_gone(grant_id, exc, kind)
        except ProviderError as exc:  # could not confirm: try the job again later
            return Transient(f"{error} (grant check failed: {exc})")
        if grant.is_valid:
            return Transient(f"{error} (the grant is valid: not an expiry)")
        log.warning("[RateLimit] grant=%s confirmed %s after a %s", grant_id,
                    grant.status or "not valid", error.status)
        return AuthExpired(f"grant is {grant.status or 'not valid'}: {error}",
                           status=error.status, error_type=error.error_type)

    async def confirm_gone(self, grant_id: str, error: GrantNotFound,
                           kind: str = "nylas") -> Exception:
        """A 404 for the grant is final only when the grant answers 404 again after
        NOVA_REVOKE_CONFIRM_SECONDS: `revoked` stops every sync of the inbox, and one answer of
        a provider (or of a misconfigured endpoint) is not enough for that. Returns the error to
        raise: the GrantNotFound when confirmed, else a retry (or an expiry)."""
        return await grant_gone(self.provider_for(kind), grant_id, error,
                                self.settings.revoke_confirm_seconds)


async def grant_gone(provider: MailProvider, grant_id: str, error: GrantNotFound,
                     delay: float) -> Exception:
    """Ask the grant once more, ``delay`` seconds after ``error``: GrantNotFound again
    confirms it (returned as is); a grant that answers is not revoked."""
    await asyncio.sleep(delay)
    try:
        grant = await provider.get_grant(grant_id)
    except GrantNotFound:
        log.warning("[RateLimit] grant=%s not found twice %.0fs apart: revoked", grant_id, delay)
        return error
    except ProviderError as exc:
        return Transient(f"{error} (the grant check that would confirm it failed: {exc})")
    if grant.is_valid:
        return Transient(f"{error} (the grant answers and is valid: not revoked)")
    return AuthExpired(f"grant is {grant.status or 'not valid'}: {error}")
