"""The providers Nova talks to, by the name `flux_inboxes.provider` holds.

A provider is one module (its MailProvider) plus one entry here: the setting that configures
it, how it is built on a budgeted httpx client, and how the shared budget reads one of its
requests (whose budget it spends, and how much: a Nylas request costs 1 of its grant's
requests; a Gmail call costs its method's quota units of its user). The processors, the budget
and the store know no provider's URLs or shapes; a third provider is one more module and one
more entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import httpx

from nova.config import Settings

from . import nylas
from .base import MailProvider


@dataclass(frozen=True)
class ProviderKind:
    name: str
    setting: str  # what configures it, for messages
    configured: Callable[[Settings], bool]
    budget_key: Callable[[httpx.Request], tuple[str, float] | None]
    build: Callable[[Settings, httpx.AsyncClient, int], MailProvider]


def _nylas(settings: Settings, client: httpx.AsyncClient,
           transient_retries: int) -> MailProvider:
    assert settings.nylas_api_key is not None
    return nylas.NylasProvider(settings.nylas_api_key.get_secret_value(),
                               settings.nylas_api_uri, client=client,
                               transient_retries=transient_retries)


KINDS: dict[str, ProviderKind] = {
    "nylas": ProviderKind("nylas", "NYLAS_API_KEY", lambda s: s.nylas_api_key is not None,
                          nylas.budget_key, _nylas),
}


def configured(settings: Settings) -> list[ProviderKind]:
    return [kind for kind in KINDS.values() if kind.configured(settings)]
