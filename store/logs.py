"""Log output: readable text by default, or one JSON object a line.

``CLAYPOT_LOG_FORMAT=json`` makes each record a JSON object with the time,
level, logger, message, the backend id, and, for a record logged while a
call is served, its object id, call id and (with tracing on) trace id, so
logs can be joined with traces and searched by object. ``CLAYPOT_LOG`` sets
the level (default WARNING).
"""

from __future__ import annotations

from typing import Any
import json
import logging
import os
import threading
import time

from . import tracing

_TEXT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_call = threading.local()
json_on = False  # read by the server before it records which call a thread serves


def set_call(object_id: str, call_id: str) -> None:
    """The call this thread serves now (shown in JSON records); empty strings: none."""
    _call.object_id = object_id
    _call.call_id = call_id


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object (a line of its own)."""

    def __init__(self, backend_id: str = ""):
        super().__init__()
        self.backend_id = backend_id

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if self.backend_id:
            out["backend_id"] = self.backend_id
        for key in ("object_id", "call_id"):
            value = getattr(record, key, None) or getattr(_call, key, "")
            if value:
                out[key] = value
        trace_id, span_id = tracing.current_ids()
        if trace_id:
            out["trace_id"] = trace_id
            out["span_id"] = span_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(
    log_format: str = "text", level: str | None = None, backend_id: str = "", stream: Any = None
) -> logging.Handler:
    """Send this process's logs to ``stream`` (stderr) as ``text`` or ``json``; returns
    the handler installed on the root logger (replacing handlers installed before)."""
    global json_on
    handler = logging.StreamHandler(stream)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(backend_id))
    else:
        handler.setFormatter(logging.Formatter(_TEXT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level or os.environ.get("CLAYPOT_LOG", "WARNING"))
    json_on = log_format == "json"
    return handler


def set_backend_id(backend_id: str) -> None:
    """Name the backend in the JSON records of this process (known once storage opened)."""
    for h in logging.getLogger().handlers:
        if isinstance(h.formatter, JsonFormatter):
            h.formatter.backend_id = backend_id


__all__ = ["configure", "set_call", "set_backend_id", "JsonFormatter"]
