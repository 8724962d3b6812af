"""Structured one-line logs with a request id that follows a request across services.

The gateway receives or creates an ``x-request-id``; it is kept in a context variable while the
request is handled, written into every log line, and sent as metadata on downstream calls, so one
failed request can be traced through embedder and indexer logs.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import uuid

REQUEST_ID_KEY = "x-request-id"
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def current_request_id() -> str:
    return _request_id.get()


def set_request_id(value: str) -> contextvars.Token:
    return _request_id.set(value)


def reset_request_id(token: contextvars.Token) -> None:
    _request_id.reset(token)


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata for a downstream call made while handling the current request."""
    rid = _request_id.get()
    return ((REQUEST_ID_KEY, rid),) if rid != "-" else ()


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "request_id": _request_id.get(),
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            entry.update(extra)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted, not to the
    stream it was when the handler was made: a main function called in-process (a test, a
    command run from another) must not leave a handler on a stream its caller later closes
    (pytest's captured stderr: "--- Logging error --- ... I/O operation on closed file")."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # noqa: D102 - read by StreamHandler.emit / flush
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.setStream; the stream is always sys.stderr
        pass


def setup_logging(service: str, level: str = "info") -> logging.Logger:
    """Send JSON lines for this process to stderr at the given level."""
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return logging.getLogger(service)
