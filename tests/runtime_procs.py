"""Processors for runtime tests; also runnable as a script for the signal and crash tests:

    python tests/runtime_procs.py DB_URL

(settings from the environment; exits with run_parts' status: 0, or 2 on Fatal).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nova.runtime import (  # noqa: E402
    Defer,
    Fatal,
    GiveUp,
    Job,
    JobContext,
    Processor,
    RetryPolicy,
    Worker,
)

TEST_QUEUE = "thread_sync_jobs"  # any migrated queue will do; tests own their database

LOG_TABLE = """
CREATE TABLE IF NOT EXISTS runtime_log (
    msg_id bigint NOT NULL, attempt int NOT NULL, note text,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS runtime_done (msg_id bigint PRIMARY KEY);
CREATE TABLE IF NOT EXISTS runtime_failures (msg_id bigint, final boolean, error text);
-- the done row written by one statement (JobContext.commit); p_fail: it raises after writing
CREATE OR REPLACE FUNCTION runtime_record(p_msg bigint, p_fail boolean) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO runtime_done (msg_id) VALUES (p_msg);
    IF p_fail THEN
        RAISE EXCEPTION 'boom in the statement';
    END IF;
    RETURN p_msg;
END;
$$;
"""


class Recorder(Processor):
    """Logs every attempt (outside the job transaction, with the worker's pid as its note) and
    writes a done row inside it.

    The message says what each attempt does: "fail" how many first attempts raise; "sleep" how
    long each attempt takes, "sleep_first" how long the first one takes (before its
    transaction), "sleep_in_tx" how long it waits inside its transaction after writing;
    "give_up" raises GiveUp; "fatal" raises Fatal; "die" kills the worker's process (SIGKILL,
    as the OOM killer would); "defer" defers the first run that long, for the message's
    "grant_id" (a grant without budget); "one_statement" commits with `JobContext.commit`
    instead of a transaction, and "fail_in_statement" makes that many first attempts' statement
    raise after its write.
    """

    queue: ClassVar[str] = TEST_QUEUE
    component: ClassVar[str] = "Test"
    max_attempts: ClassVar[int] = 3

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts, base_delay=0.2, max_delay=1)

    async def process(self, job: Job, ctx: JobContext) -> str | None:
        message = job.message
        await ctx.pool.execute(
            "INSERT INTO runtime_log (msg_id, attempt, note) VALUES ($1, $2, $3)",
            job.msg_id, job.read_ct, str(os.getpid()))
        if message.get("die"):
            os.kill(os.getpid(), signal.SIGKILL)
        if message.get("fatal"):
            raise Fatal(str(message["fatal"]))
        if message.get("defer") and await ctx.pool.fetchval(
                "SELECT count(*) FROM runtime_log WHERE msg_id = $1", job.msg_id) == 1:
            raise Defer("no budget", float(message["defer"]), grant=message.get("grant_id"))
        await asyncio.sleep(float(message.get("sleep", 0)))
        if job.read_ct == 1:
            await asyncio.sleep(float(message.get("sleep_first", 0)))
        if message.get("give_up"):
            raise GiveUp("bad payload")
        if job.read_ct <= int(message.get("fail", 0)):
            raise RuntimeError(f"boom {job.read_ct}")
        if message.get("one_statement"):
            done = await ctx.commit("SELECT runtime_record($1, $2)", job.msg_id,
                                    job.read_ct <= int(message.get("fail_in_statement", 0)))
            return f"recorded {done}"
        async with ctx.transaction() as conn:
            await conn.execute("INSERT INTO runtime_done (msg_id) VALUES ($1)", job.msg_id)
            await asyncio.sleep(float(message.get("sleep_in_tx", 0)))
        return "ok"

    async def record_failure(self, conn: Any, job: Job, error: BaseException,
                             final: bool) -> None:
        await conn.execute("INSERT INTO runtime_failures VALUES ($1, $2, $3)", job.msg_id,
                           final, str(error))


async def _main(url: str) -> int:
    from nova.config import load_settings
    from nova.logs import setup_logging
    from nova.runtime import run_parts

    settings = load_settings()
    setup_logging("info")
    worker = Worker(Recorder(), settings, database_url=url)
    print("READY", flush=True)
    return await run_parts([worker])


if __name__ == "__main__":
    raise SystemExit(asyncio.run(_main(sys.argv[1])))
