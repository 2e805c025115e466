"""The one logging setup: plain text for people, JSON lines for log shippers (``UNIRS_LOG_FORMAT=json``).

JSON lines come from python-json-logger: one object per record with ``ts`` (ISO 8601 UTC), ``level``,
``logger``, ``msg``, every ``extra={...}`` field as a top-level key, and ``exc_info`` when there is one.

Levels: long-running services (scheduler, workers, servers) log INFO by default; one-shot commands log
WARNING, so their normal output is not repeated on stderr. ``UNIRS_LOG_LEVEL`` or ``--log-level`` override both.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

SERVICE_LEVEL = "INFO"
COMMAND_LEVEL = "WARNING"
# Library chatter that drowns what the service itself says. alembic.runtime.plugins logs one INFO line per
# plugin when alembic is first imported, which the CLI does lazily, after logging is set up.
NOISY = ("urllib3", "rasterio", "botocore", "httpx", "pystac_client", "alembic.runtime.plugins")


def json_formatter() -> logging.Formatter:
    return JsonFormatter(
        "{levelname}{name}{message}",
        style="{",
        rename_fields={"levelname": "level", "name": "logger", "message": "msg"},
        timestamp="ts",  # ISO 8601 in UTC from record.created
    )


def setup_logging(level: str | None = None, fmt: str = "text", *, default: str = SERVICE_LEVEL) -> None:
    """Send every log record to stderr at ``level`` (``default`` when None), as text or JSON lines.

    Raises ValueError for a level name logging does not know (the message lists the known ones).
    """
    name = (level or default).upper()
    if not isinstance(logging.getLevelName(name), int):
        raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING, ERROR or CRITICAL")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(json_formatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(name)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
