"""vLLM's failures in the service's error vocabulary: its exceptions and the
finish reasons that mean the request did not complete.

The engine calls `translate` on whatever AsyncLLM.generate raised, and
outputs.py calls `finish_reason` on each finished output. Only vLLM's client
errors become INVALID_ARGUMENT; anything else not listed in VLLM_ERRORS is
returned unchanged, so the interceptor answers INTERNAL with a generic
message and logs the trace.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from vllm.exceptions import (
    GenerationError,
    MaxQueuedTokensError,
    QueueOverflowError,
    RetryableRequestError,
    VLLMClientError,
    VLLMNotFoundError,
)
from vllm.outputs import RequestOutput
from vllm.v1.engine.exceptions import EngineDeadError

from llmgrpc_server import domain
from llmgrpc_server.errors import (
    EngineFailed,
    InvalidArgument,
    NotFound,
    Overloaded,
    ServiceError,
    Unavailable,
)
from llmgrpc_server.vllm_adapter.sampling import client_message

log = logging.getLogger(__name__)

ENGINE_DEAD = "the engine has stopped; retry on another replica"
# vLLM's queue limits suggest no delay: the same 1 s as our own admission limit.
QUEUE_RETRY_AFTER = 1.0
_FAILED = "the engine failed this request; the server log has the details"
_RETRYABLE = "the engine failed this request for a transient reason; retry"

_Translate = Callable[[Exception], ServiceError]

# vLLM exception class -> our error. translate() uses the nearest class in the
# exception's MRO; docs/api.md lists these rows (render_vllm_table).
VLLM_ERRORS: dict[type[Exception], tuple[str, _Translate]] = {
    VLLMClientError: (
        "vLLM rejected the request's parameters (the message is vLLM's)",
        lambda e: InvalidArgument("request", client_message(e)),
    ),
    VLLMNotFoundError: (
        "an adapter vLLM cannot find",
        lambda e: NotFound(client_message(e)),
    ),
    QueueOverflowError: (
        "vLLM's `--max-num-queued-reqs` is full",
        lambda e: Overloaded(
            "the engine's queue is full (its --max-num-queued-reqs); retry after the "
            "delay or on another replica",
            QUEUE_RETRY_AFTER,
            reason="ENGINE_QUEUE_FULL",
        ),
    ),
    MaxQueuedTokensError: (
        "vLLM's `--max-num-queued-tokens` is reached",
        lambda e: Overloaded(
            "the engine's backlog of prompt tokens is full (its --max-num-queued-tokens); "
            "retry after the delay or on another replica",
            QUEUE_RETRY_AFTER,
            reason="ENGINE_QUEUE_FULL",
        ),
    ),
    EngineDeadError: ("the engine process died", lambda e: Unavailable(ENGINE_DEAD)),
    GenerationError: (
        "vLLM's own error for a request that failed",
        lambda e: EngineFailed(_FAILED, reason="ENGINE_ERROR"),
    ),
    RetryableRequestError: (
        "vLLM's transient request failure",
        lambda e: Unavailable(_RETRYABLE, reason="ENGINE_ERROR_RETRYABLE"),
    ),
}


def translate(error: Exception) -> BaseException:
    """The service error for an exception vLLM raised, or `error` itself
    (INTERNAL with a logged trace) when it is not one vLLM documents."""
    for cls in type(error).__mro__:
        entry = VLLM_ERRORS.get(cls)
        if entry is not None:
            failure = entry[1](error)
            if isinstance(failure, EngineFailed | Unavailable):
                # The caller is told the log has the details: here they are.
                log.error("vLLM failed a request: %s", failure.message, exc_info=error)
            return failure
    return error


def render_vllm_table() -> str:
    """VLLM_ERRORS as the Markdown table docs/api.md carries."""
    lines = ["| vLLM exception | When | Error | Code |", "|---|---|---|---|"]
    for cls, (when, make) in VLLM_ERRORS.items():
        error = make(_sample(cls))
        lines.append(
            f"| `{cls.__name__}` | {when} | `{type(error).__name__}` | `{error.code.name}` |"
        )
    return "\n".join(lines)


def _sample(cls: type[Exception]) -> Exception:
    return cls.__new__(cls)  # the translations never read the instance's state


_FINISHED = {"stop": domain.FinishReason.STOP, "length": domain.FinishReason.LENGTH}


def finish_reason(output: RequestOutput, reason: str | None) -> domain.FinishReason:
    """The domain finish reason of a finished output, or the error it means.

    - "abort": our own aborts only happen once the caller is gone (cancellation),
      so an abort we see is the engine's (shutting down, paused): the answer is
      cut short, and another replica can serve it: UNAVAILABLE, never OK.
    - "error": vLLM failed the request: INTERNAL, not UNAVAILABLE. The causes
      reachable here (a grammar that fails to compile in the engine, an error
      preparing the request, a grammar that rejects a sampled token) fail the
      same way on retry, a generation output says nothing of retryability
      (only pooling outputs carry RequestError.retryable), and vLLM's own
      server answers it 500.
    - anything else (None, "repetition" which we never ask for, a reason a
      later vLLM adds): INTERNAL, never a default.
    """
    if reason in _FINISHED:
        return _FINISHED[reason]
    request_id = output.request_id
    if reason == "abort":
        log.warning("the engine aborted request %s before it finished", request_id)
        raise Unavailable(
            "the engine aborted the request before it finished (shutting down or paused); "
            "retry on another replica",
            reason="ENGINE_ABORT",
        )
    if reason == "error":
        log.error("the engine failed request %s (finish reason 'error')", request_id)
        raise EngineFailed(_FAILED, reason="ENGINE_ERROR")
    log.error("the engine ended request %s with an unknown finish reason %r", request_id, reason)
    raise EngineFailed(
        f"the engine ended the request with an unknown finish reason {reason!r}",
        reason="UNKNOWN_FINISH_REASON",
    )
