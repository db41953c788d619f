"""A call's metadata: the request id a proxy or caller sets, and the W3C trace
context (traceparent, tracestate) to hand the engine. Pure functions."""

from __future__ import annotations

import re
from collections.abc import Iterable
from contextvars import ContextVar

# The request id a proxy or caller sets, used when the message's own is empty,
# and echoed in the answer's initial metadata.
REQUEST_ID_KEY = "x-request-id"
# W3C Trace Context, version 00: 55 characters of lowercase hex and dashes.
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
# W3C: a tracestate of 32 members of at most 256 characters; vendors may drop
# one over 512 characters rather than carry it.
MAX_TRACESTATE_CHARS = 512
# An ASCII metadata value gRPC sends: printable characters, no leading or trailing space.
_METADATA_VALUE = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")
# Set by the interceptor while a traced call runs (tracing.py): the W3C context of
# the call's own span, handed to the engine instead of the caller's so that vLLM's
# spans are children of ours (caller -> our RPC span -> vLLM's llm_request).
SERVER_SPAN_CONTEXT: ContextVar[tuple[tuple[str, str], ...] | None] = ContextVar(
    "server_span_context", default=None
)


def _values(metadata: Iterable[tuple[str, str | bytes]], key: str) -> list[str]:
    return [v if isinstance(v, str) else v.decode("latin-1") for k, v in metadata if k == key]


def value(metadata: Iterable[tuple[str, str | bytes]], key: str) -> str:
    """The first value of `key` ("" when absent)."""
    values = _values(metadata, key)
    return values[0] if values else ""


def echo(request_id: str) -> tuple[tuple[str, str], ...]:
    """The initial metadata that echoes the request id in use: none for an id that
    is not a valid metadata value (printable ASCII), which a client would refuse
    as "Invalid metadata" and fail the whole call."""
    if _METADATA_VALUE.fullmatch(request_id):
        return ((REQUEST_ID_KEY, request_id),)
    return ()


def trace_headers(metadata: Iterable[tuple[str, str | bytes]]) -> tuple[tuple[str, str], ...]:
    """The caller's W3C trace context to hand the engine (vLLM's trace_headers).

    As W3C Trace Context says: a missing, repeated or malformed `traceparent`
    (or one with an all-zero trace or parent id, or version ff) means no
    context, and `tracestate` is not read without one; a `tracestate` over
    512 characters is dropped. Nothing here fails the call."""
    metadata = tuple(metadata)
    parents = _values(metadata, "traceparent")
    if len(parents) != 1 or not _valid_traceparent(parents[0]):
        return ()
    headers = [("traceparent", parents[0])]
    state = ",".join(_values(metadata, "tracestate"))
    if state and len(state) <= MAX_TRACESTATE_CHARS:
        headers.append(("tracestate", state))
    return tuple(headers)


def engine_trace_headers(
    metadata: Iterable[tuple[str, str | bytes]],
) -> tuple[tuple[str, str], ...]:
    """The trace context to hand the engine: our call's span when tracing is on,
    else the caller's (trace_headers)."""
    server_span = SERVER_SPAN_CONTEXT.get()
    return server_span if server_span is not None else trace_headers(metadata)


def _valid_traceparent(value: str) -> bool:
    if not _TRACEPARENT.fullmatch(value):
        return False
    version, trace_id, parent_id, _ = value.split("-")
    return version != "ff" and trace_id != "0" * 32 and parent_id != "0" * 16
