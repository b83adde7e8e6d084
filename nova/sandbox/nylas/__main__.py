"""``python -m nova.sandbox.nylas``: serve a sandbox mailbox until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .server import SandboxNylas
from .webhooks import DEFAULT_RETRY_DELAYS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nova.sandbox.nylas", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--threads", type=int, default=200, help="threads in the first grant")
    ap.add_argument("--other-threads", type=int, default=None)
    ap.add_argument("--grants", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate-limit", type=float, default=None, help="requests/s per grant")
    ap.add_argument("--latency-ms", type=int, default=0)
    ap.add_argument("--api-key", default="sandbox-api-key")
    ap.add_argument("--webhook-url", default=None)
    ap.add_argument("--webhook-secret", default="sandbox-webhook-secret")
    ap.add_argument("--rate-limit-kind", choices=["nylas", "provider"], default="nylas")
    ap.add_argument("--webhook-gzip", action="store_true")
    ap.add_argument("--webhook-retry-delays", type=float, nargs="*", default=None,
                    help="seconds before attempt 2, 3 (default 300 600, as Nylas)")
    ap.add_argument("--message-variant", choices=["transformed", "metadata", "cleaned"],
                    default=None)
    ap.add_argument("--hostile", type=float, default=0.0, help="share of hostile threads")
    ap.add_argument("--cursor-ttl", type=float, default=None, help="page token lifetime, s")
    args = ap.parse_args(argv)
    delays = (DEFAULT_RETRY_DELAYS if args.webhook_retry_delays is None
              else tuple(args.webhook_retry_delays))
    sb = SandboxNylas(threads=args.threads, other_threads=args.other_threads,
                      grants=args.grants, seed=args.seed, rate_limit=args.rate_limit,
                      latency_ms=args.latency_ms, api_key=args.api_key,
                      webhook_url=args.webhook_url, webhook_secret=args.webhook_secret,
                      host=args.host, port=args.port, rate_limit_kind=args.rate_limit_kind,
                      webhook_gzip=args.webhook_gzip, message_variant=args.message_variant,
                      hostile=args.hostile, cursor_ttl_seconds=args.cursor_ttl,
                      webhook_retry_delays=delays)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    sb.start()
    print(f"NYLAS_API_URI={sb.base_url}", flush=True)
    for gid in sb.grant_ids:
        g = sb.mailbox.grants[gid]
        print(f"grant {gid} {g.provider} {g.email} threads={g.n_threads}", flush=True)
    done.wait()
    sb.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
