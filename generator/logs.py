"""Log lines of the gateway and its workers: one JSON object per line, with the request id of the work.

Here, not in gateway/, because the worker imports it too (gateway/settings.py is the only gateway module it may).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_fields: ContextVar[dict[str, str] | None] = ContextVar("log_fields", default=None)


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, with the request id and any extra fields."""

    RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None)))

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
                                 "logger": record.name, "message": record.getMessage()}
        entry.update({k: v for k, v in vars(record).items() if k not in self.RESERVED and not k.startswith("_")})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class ContextFilter(logging.Filter):
    """Puts the fields of the enclosing `log_context` on each record; a field given as `extra=` wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_fields.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


@contextmanager
def log_context(**fields: str) -> Iterator[None]:
    """Within the block (this thread or task only), every log record carries `fields`, e.g. the job's request_id."""
    token = _fields.set({**(_fields.get() or {}), **fields})
    try:
        yield
    finally:
        _fields.reset(token)


def configure_logging(json_logs: bool, level: int = logging.INFO) -> None:
    """The root logger writes to stderr, as JSON lines or as plain text; other loggers and warnings go to it."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)  # e.g. Celery's warning at start-up, as a log line rather than raw text
