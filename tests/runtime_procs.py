"""Processors for runtime tests; also runnable as a script for the signal tests:

    python tests/runtime_procs.py DB_URL SLEEP_SECONDS
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nova.runtime import GiveUp, Job, JobContext, Processor, RetryPolicy, Worker  # noqa: E402

TEST_QUEUE = "thread_sync_jobs"  # any migrated queue will do; tests own their database

LOG_TABLE = """
CREATE TABLE IF NOT EXISTS runtime_log (
    msg_id bigint NOT NULL, attempt int NOT NULL, note text,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS runtime_done (msg_id bigint PRIMARY KEY);
CREATE TABLE IF NOT EXISTS runtime_failures (msg_id bigint, final boolean, error text);
"""


class Recorder(Processor):
    """Logs every attempt (outside the job transaction) and writes a done row inside it.

    The message's "fail" says how many first attempts raise; "sleep" how long each attempt
    takes; "give_up" raises GiveUp.
    """

    queue: ClassVar[str] = TEST_QUEUE
    component: ClassVar[str] = "Test"
    max_attempts: ClassVar[int] = 3

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts, base_delay=0.2, max_delay=1)

    async def process(self, job: Job, ctx: JobContext) -> str | None:
        await ctx.pool.execute("INSERT INTO runtime_log (msg_id, attempt) VALUES ($1, $2)",
                               job.msg_id, job.read_ct)
        await asyncio.sleep(float(job.message.get("sleep", 0)))
        if job.message.get("give_up"):
            raise GiveUp("bad payload")
        if job.read_ct <= int(job.message.get("fail", 0)):
            raise RuntimeError(f"boom {job.read_ct}")
        async with ctx.transaction() as conn:
            await conn.execute("INSERT INTO runtime_done (msg_id) VALUES ($1)", job.msg_id)
        return "ok"

    async def record_failure(self, conn: Any, job: Job, error: BaseException,
                             final: bool) -> None:
        await conn.execute("INSERT INTO runtime_failures VALUES ($1, $2, $3)", job.msg_id,
                           final, str(error))


async def _main(url: str) -> None:
    from nova.config import load_settings
    from nova.logs import setup_logging
    from nova.runtime import run_parts

    settings = load_settings()
    setup_logging("info")
    worker = Worker(Recorder(), settings, database_url=url)
    print("READY", flush=True)
    await run_parts([worker])


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1]))
