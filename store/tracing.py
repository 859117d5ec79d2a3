"""OpenTelemetry traces (the optional ``claypot[otel]`` extra).

With tracing on, each client call, task submission and result stream is a
client span, and the backend method, task, stream or checkpoint that serves
it is a server span whose parent is the caller's span: the W3C trace
context travels in the call's gRPC metadata (``traceparent``). A method
that calls another object from inside a backend opens its client span under
the server span it runs in, so a nested call A -> B -> A, or the calls a
task makes, form one trace.

Tracing is off unless ``CLAYPOT_TRACING=1`` (or :func:`enable`); off, each
hook is one flag check and the core never imports OpenTelemetry. A process
that turns it on without the extra installed gets a
:class:`~store.errors.ConfigurationError`.

Where spans go: an application configures its own ``TracerProvider`` (any
exporter); a backend process sets one up itself, exporting to
``CLAYPOT_TRACE_FILE`` (one JSON object a line, appended; several processes
may share the file) or, when that is empty and ``opentelemetry-exporter-otlp``
is installed, to the OTLP endpoint named by the standard ``OTEL_*`` variables.
"""

from __future__ import annotations

from typing import Any
import contextlib
import json
import logging
import os
import threading

from .errors import ConfigurationError

log = logging.getLogger("claypot.tracing")

_on = False
_tracer = None
_NULL = contextlib.nullcontext()
_provider = None


def enabled() -> bool:
    """Whether this process makes spans."""
    return _on


def _require():
    try:
        from opentelemetry import trace

        return trace
    except ImportError:
        raise ConfigurationError("tracing needs OpenTelemetry: pip install 'claypot[otel]'") from None


def enable() -> None:
    """Make spans in this process with the global ``TracerProvider``."""
    global _on, _tracer
    trace = _require()
    _tracer = trace.get_tracer("claypot")
    _on = True


def disable() -> None:
    """Stop making spans (spans already open finish normally)."""
    global _on
    _on = False


def start_backend(settings: Any, backend_id: str) -> None:
    """Set up tracing in a backend process, if ``settings.tracing`` asks for it."""
    global _provider
    if not settings.tracing:
        return
    _require()
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(
        resource=Resource.create({"service.name": "claypot-backend", "claypot.backend_id": backend_id})
    )
    if settings.trace_file:
        # Written as each span ends: a file is for reading right away (tests, debugging).
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(settings.trace_file)))
    else:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        except ImportError:
            log.warning(
                "tracing is on but spans go nowhere: set CLAYPOT_TRACE_FILE or install opentelemetry-exporter-otlp"
            )
    trace.set_tracer_provider(provider)
    _provider = provider
    enable()


def stop_backend() -> None:
    """Flush and close what :func:`start_backend` set up."""
    global _provider
    disable()
    if _provider is not None:
        _provider.shutdown()
        _provider = None


# -- hooks the core calls ------------------------------------------------------------------


def metadata(base: tuple) -> tuple:
    """``base`` call metadata plus the current trace context (unchanged when off)."""
    if not _on:
        return base
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return base + tuple(carrier.items())


def client_span(name: str, **attributes: Any) -> Any:
    """A context manager: a client span around one outgoing call (a no-op when off)."""
    if not _on:
        return _NULL
    from opentelemetry.trace import SpanKind

    return _tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=_clean(attributes))


def server_span(name: str, grpc_context: Any, **attributes: Any) -> Any:
    """A context manager: the span of a call served, child of the caller's span."""
    if not _on:
        return _NULL
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    carrier = {}
    try:
        carrier = {k: v for k, v in grpc_context.invocation_metadata() or () if isinstance(v, str)}
    except Exception:  # a context without metadata: the span starts a trace of its own
        pass
    return _tracer.start_as_current_span(
        name, context=extract(carrier), kind=SpanKind.SERVER, attributes=_clean(attributes)
    )


def span(name: str, **attributes: Any) -> Any:
    """A context manager: an internal span (checkpoints), under the current one if any."""
    if not _on:
        return _NULL
    return _tracer.start_as_current_span(name, attributes=_clean(attributes))


def current_ids() -> tuple[str, str]:
    """(trace id, span id) in hex of the current span; empty strings when none."""
    if not _on:
        return "", ""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return "", ""
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def _clean(attributes: dict) -> dict:
    return {f"claypot.{k}": v for k, v in attributes.items() if v not in (None, "")}


class JsonLinesExporter:
    """Appends each finished span to a file as one JSON object a line.

    One ``write`` per span on an ``O_APPEND`` descriptor, so processes sharing
    the file do not interleave their lines.
    """

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._lock = threading.Lock()

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = []
        for s in spans:
            ctx = s.get_span_context()
            lines.append(
                json.dumps(
                    {
                        "name": s.name,
                        "trace_id": format(ctx.trace_id, "032x"),
                        "span_id": format(ctx.span_id, "016x"),
                        "parent_id": format(s.parent.span_id, "016x") if s.parent else "",
                        "kind": s.kind.name,
                        "start": s.start_time,
                        "end": s.end_time,
                        "pid": os.getpid(),
                        "attributes": dict(s.attributes or {}),
                        "status": s.status.status_code.name,
                    }
                )
                + "\n"
            )
        with self._lock:
            if self._fd < 0:
                return SpanExportResult.FAILURE
            for line in lines:
                os.write(self._fd, line.encode())
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def read_trace_file(path: str) -> list[dict]:
    """The spans a :class:`JsonLinesExporter` wrote to ``path``."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


__all__ = [
    "enabled",
    "enable",
    "disable",
    "start_backend",
    "stop_backend",
    "metadata",
    "client_span",
    "server_span",
    "span",
    "current_ids",
    "JsonLinesExporter",
    "read_trace_file",
]
