"""What `serve` logs: uvicorn's warnings and errors, one line each on stderr, with no traceback
and no access log (LOG_CONFIG, handed to uvicorn by lifecycle.py)."""

from __future__ import annotations

import asyncio
import logging


class OneLine(logging.Formatter):
    """uvicorn's log records as one line each, with the exception's type and message and no
    traceback: a bug met by a request is a 500 for its client and one line here."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().strip()
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            message = f"{message}: {type(error).__name__}" + (f": {error}" if str(error) else "")
        return f"{record.levelname.lower()}: {message}"


class NotCancelled(logging.Filter):
    """Drops the record of each request cancelled at the end of the grace on Ctrl-C: uvicorn's
    line before them says how many it cancelled."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


LOG_CONFIG = {  # what uvicorn logs (warnings and errors; no access log), through OneLine to stderr
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"one_line": {"()": OneLine}},
    "filters": {"not_cancelled": {"()": NotCancelled}},
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "one_line",
            "filters": ["not_cancelled"],
            "stream": "ext://sys.stderr",
        },
        "nowhere": {"class": "logging.NullHandler"},
    },
    "loggers": {
        "uvicorn": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
        # a warning for each malformed form, which its client hears about (a 400) already
        "python_multipart": {"handlers": ["nowhere"], "propagate": False},
    },
}
