"""Nylas v3 sandbox: a deterministic, fault-injecting Nylas look-alike served over HTTP.

Usage::

    with SandboxNylas(threads=1000, seed=1, api_key="k") as sb:
        provider = NylasProvider("k", sb.base_url)
        ...

It models the documented API harshly (each module cites the developer.nylas.com pages):
webhook delivery with Nylas's retry rules, per-attempt signatures and optional gzip
(:mod:`.webhooks`); the two kinds of 429 (:mod:`.errors`, :mod:`.state`); downloads that are
bare ``application/octet-stream`` (:mod:`.app`); ``thread.replied`` only for tracked replies,
``grant.updated`` on re-authentication, message trigger variants (:mod:`.server`); expiring
page tokens (:mod:`.mailbox`); and, on request, hostile mail (:mod:`.generate`).

CLI: ``python -m nova.sandbox.nylas --port 8765 --threads 10000 --seed 1``.
"""

from .server import Mutation, SandboxNylas
from .state import FAULT_KINDS, RATE_LIMIT_KINDS
from .webhooks import MESSAGE_VARIANTS, RETRY_STATUSES, Notification, sign

__all__ = ["FAULT_KINDS", "MESSAGE_VARIANTS", "RATE_LIMIT_KINDS", "RETRY_STATUSES", "Mutation",
           "Notification", "SandboxNylas", "sign"]
