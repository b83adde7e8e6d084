"""Nylas v3 sandbox: a deterministic, fault-injecting Nylas look-alike served over HTTP.

Usage::

    with SandboxNylas(threads=1000, seed=1, api_key="k") as sb:
        provider = NylasProvider("k", sb.base_url)
        ...

CLI: ``python -m nova.sandbox.nylas --port 8765 --threads 10000 --seed 1``.
"""

from .server import Mutation, SandboxNylas
from .state import FAULT_KINDS
from .webhooks import Notification, sign

__all__ = ["FAULT_KINDS", "Mutation", "Notification", "SandboxNylas", "sign"]
