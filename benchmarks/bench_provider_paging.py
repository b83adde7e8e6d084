"""Page through a 10,000-thread sandbox mailbox with NylasProvider over loopback HTTP.

    python benchmarks/bench_provider_paging.py [--threads 10000] [--limit 200] [--latency-ms 0]

Prints threads/s, pages, and the sandbox's own request counters, and checks that every page
token was requested exactly once and every thread was seen exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from nova.providers.nylas import NylasProvider
from nova.sandbox.nylas import SandboxNylas

API_KEY = "bench-key"


async def page_all(base_url: str, grant_id: str, limit: int) -> tuple[list[str], int, float]:
    seen: list[str] = []
    pages = 0
    async with NylasProvider(API_KEY, base_url, timeout=30) as provider:
        started = time.perf_counter()
        token: str | None = None
        while True:
            page = await provider.list_threads_page(grant_id, page_token=token, limit=limit)
            seen.extend(t.id for t in page.items)
            pages += 1
            if page.next_page_token is None:
                break
            token = page.next_page_token
        elapsed = time.perf_counter() - started
    return seen, pages, elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=10_000)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--latency-ms", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    t0 = time.perf_counter()
    with SandboxNylas(threads=args.threads, seed=args.seed, api_key=API_KEY,
                      latency_ms=args.latency_ms) as sb:
        startup = time.perf_counter() - t0
        gid = sb.grant_ids[0]
        seen, pages, elapsed = asyncio.run(page_all(sb.base_url, gid, args.limit))
        stats = sb.get_stats()
        expected = sb.thread_ids(gid)

    per_token = stats["thread_pages"][gid]
    exactly_once = all(n == 1 for n in per_token.values())
    print(f"sandbox startup           {startup:8.3f} s  ({args.threads} threads)")
    print(f"threads paged             {len(seen):8d}  (unique {len(set(seen))}, "
          f"expected {len(expected)}, order matches: {seen == expected})")
    print(f"pages (limit={args.limit:<3})         {pages:8d}")
    print(f"elapsed                   {elapsed:8.3f} s")
    print(f"throughput                {len(seen) / elapsed:8.0f} threads/s, "
          f"{pages / elapsed:6.1f} pages/s, {1000 * elapsed / pages:6.1f} ms/page")
    print(f"sandbox requests          {stats['requests']}")
    print(f"sandbox statuses          {stats['statuses']}")
    print(f"distinct page tokens      {len(per_token)}; each fetched exactly once: {exactly_once}")
    ok = (exactly_once and len(per_token) == pages and seen == expected
          and stats["requests"].get("list_threads") == pages)
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
