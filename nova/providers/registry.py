"""The providers Nova talks to, by the name `flux_inboxes.provider` holds.

A provider is one module (its MailProvider) plus one entry here: the setting that configures
it, how it is built on a budgeted httpx client, and its budget: whose budget a request spends
and how much (a Nylas request costs 1 of its grant's requests; a Gmail call costs its method's
quota units of its user), at what rate, and which answers are refusals. The processors, the
budget and the store know no provider's URLs or shapes; a third provider is one more module
and one more entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from nova.config import Settings

from . import gmail, nylas
from .base import MailProvider


@dataclass(frozen=True)
class BudgetPlan:
    """How a kind's requests are paced (nova.ratelimit.ProviderBudget)."""

    rate: float  # per second: requests (Nylas) or quota units (Gmail)
    burst: float
    ceiling: float | None  # None: the rate is fixed, not learned
    floor: float
    key: Callable[[httpx.Request], tuple[str, float] | None]
    refused: Callable[[int, bytes], bool]  # a rate refusal, from status and body
    hold: float | None = None  # seconds every worker waits after a refusal without Retry-After


@dataclass(frozen=True)
class ProviderKind:
    name: str
    setting: str  # what configures it, for messages
    configured: Callable[[Settings], bool]
    budget: Callable[[Settings], BudgetPlan]
    # (settings, budgeted client, transient retries, database pool) -> provider
    build: Callable[[Settings, httpx.AsyncClient, int, Any], MailProvider]


def _nylas(settings: Settings, client: httpx.AsyncClient, transient_retries: int,
           pool: Any) -> MailProvider:
    assert settings.nylas_api_key is not None
    return nylas.NylasProvider(settings.nylas_api_key.get_secret_value(),
                               settings.nylas_api_uri, client=client,
                               transient_retries=transient_retries)


def _nylas_budget(settings: Settings) -> BudgetPlan:
    return BudgetPlan(settings.provider_rate_limit, settings.provider_burst,
                      settings.provider_rate_ceiling, settings.provider_rate_floor,
                      nylas.budget_key, lambda status, body: status == 429)


def _gmail(settings: Settings, client: httpx.AsyncClient, transient_retries: int,
           pool: Any) -> MailProvider:
    from nova.credentials import TokenSource, cipher

    tokens = TokenSource(pool, cipher(settings), client, token_uri=settings.gmail_token_uri)
    return gmail.GmailProvider(tokens, settings.gmail_api_uri, client=client,
                               costs=settings.gmail_costs, transient_retries=transient_retries)


def gmail_budget(settings: Settings) -> BudgetPlan:
    """The user's quota, fixed: units per second such that no sliding minute ever holds more
    than GMAIL_QUOTA_UNITS_PER_MINUTE. A GCRA bucket admits at most rate x 60 s + burst in any
    minute, so the rate leaves the burst (two threads.get) out, and 2% for requests that
    reach Google in another order than they were paced."""
    units = settings.gmail_quota_units_per_minute
    costs = {**gmail.DEFAULT_COSTS, **settings.gmail_costs}
    burst = float(2 * costs["threads.get"])
    return BudgetPlan(0.98 * (units - burst - max(costs.values())) / 60, burst, None, 1.0,
                      gmail.budget_key, gmail.is_rate_refusal, gmail.QUOTA_HOLD_SECONDS)


KINDS: dict[str, ProviderKind] = {
    "nylas": ProviderKind("nylas", "NYLAS_API_KEY", lambda s: s.nylas_api_key is not None,
                          _nylas_budget, _nylas),
    "gmail": ProviderKind("gmail", "NOVA_CREDENTIALS_KEY",
                          lambda s: s.credentials_key is not None, gmail_budget, _gmail),
}


def configured(settings: Settings) -> list[ProviderKind]:
    return [kind for kind in KINDS.values() if kind.configured(settings)]
