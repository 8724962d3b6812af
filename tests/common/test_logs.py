"""common.logs: the JSON log handler follows sys.stderr instead of keeping the stream it was
made with (an in-process main() under pytest once left a handler on a closed capture stream)."""

from __future__ import annotations

import io
import json
import logging
import sys

from common.logs import StderrHandler, setup_logging


def test_setup_logging_writes_to_the_current_stderr_after_the_old_one_closed(monkeypatch):
    # (tests/conftest.py restores the root logger's handlers afterwards)
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    log = setup_logging("svc", "info")
    log.info("one")
    assert json.loads(first.getvalue())["msg"] == "one"
    first.close()  # what pytest does to its capture stream after the test
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    monkeypatch.setattr(logging, "raiseExceptions", True)  # a failed emit prints "--- Logging error ---"
    log.info("two")
    assert "Logging error" not in second.getvalue()  # handleError writes there
    assert json.loads(second.getvalue())["msg"] == "two"
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler, StderrHandler)


def test_a_handler_bound_to_a_closed_stream_is_what_failed(monkeypatch):
    """The failure the handler avoids, shown with a plain StreamHandler (the old setup)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    stream.close()
    reported = []
    monkeypatch.setattr(handler, "handleError", lambda record: reported.append(sys.exc_info()[0]))
    handler.emit(logging.LogRecord("x", logging.INFO, __file__, 1, "lost", None, None))
    assert reported == [ValueError]
