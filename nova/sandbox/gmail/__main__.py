"""``python -m nova.sandbox.gmail``: serve sandbox mailboxes until SIGINT/SIGTERM.

Prints ``GMAIL_API_ENDPOINT=<base url>``, ``GMAIL_TOKEN_URI=``, ``GMAIL_BATCH_URI=``, then one
line per user: ``user <email> threads=<n> <authorized_user JSON>``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from .server import SandboxGmail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nova.sandbox.gmail", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--threads", type=int, default=200, help="threads of the first user")
    ap.add_argument("--other-threads", type=int, default=None)
    ap.add_argument("--users", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hostile", type=float, default=0.0, help="share of hostile threads")
    ap.add_argument("--quota-per-minute", type=int, default=15_000,
                    help="units per user per minute (0: off)")
    ap.add_argument("--quota-error", choices=["mixed", "429", "403"], default="mixed")
    ap.add_argument("--max-concurrent", type=int, default=50, help="0: off")
    ap.add_argument("--latency-ms", type=int, default=0)
    ap.add_argument("--access-token-ttl", type=int, default=3599)
    ap.add_argument("--push-endpoint", default=None)
    ap.add_argument("--push-auth", choices=["oidc", "token", "both", "none"], default="oidc")
    ap.add_argument("--push-audience", default=None)
    args = ap.parse_args(argv)
    sb = SandboxGmail(threads=args.threads, other_threads=args.other_threads, users=args.users,
                      seed=args.seed, hostile=args.hostile,
                      quota_per_minute=args.quota_per_minute or None,
                      quota_error=args.quota_error, max_concurrent=args.max_concurrent or None,
                      latency_ms=args.latency_ms, access_token_ttl=args.access_token_ttl,
                      push_endpoint=args.push_endpoint, push_auth=args.push_auth,
                      push_audience=args.push_audience, host=args.host, port=args.port)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    sb.start()
    print(f"GMAIL_API_ENDPOINT={sb.api_endpoint}", flush=True)
    print(f"GMAIL_TOKEN_URI={sb.token_uri}", flush=True)
    print(f"GMAIL_BATCH_URI={sb.batch_uri}", flush=True)
    for email in sb.users:
        n = sb.mailbox.user(email).n_threads
        print(f"user {email} threads={n} {json.dumps(sb.credentials(email))}", flush=True)
    done.wait()
    sb.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
