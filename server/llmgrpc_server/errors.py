"""The service's error vocabulary and the one table mapping it to gRPC status.

Every layer raises these; only the error interceptor (interceptors.py) turns
them into a status. Anything not in this vocabulary becomes INTERNAL with a
generic message, and its traceback goes to the log, never to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "llmgrpc.dev"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class ServiceError(Exception):
    """Base of every error a caller can act on; its status code is its row in
    STATUS_TABLE (the nearest class in its MRO)."""

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        # Why the engine failed the request (ErrorInfo reason and the
        # llmgrpc_engine_failures_total label); empty for every other error.
        self.reason = reason

    @property
    def code(self) -> grpc.StatusCode:
        return status_row(type(self)).code

    def details(self) -> list[object]:
        """google.rpc detail messages attached to the status."""
        if not self.reason:
            return []
        return [error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN)]


class InvalidArgument(ServiceError):
    """Bad input: the message names the field and the limit."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.violations = [FieldViolation(field, description)]

    def details(self) -> list[object]:
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in self.violations
                ]
            )
        ]


class PromptTooLong(InvalidArgument):
    """The prompt (plus max_tokens) does not fit in the model's context."""

    def __init__(
        self, field: str, limit: int, actual: int, what: str = "prompt tokens",
        by: str = "the model's limit",
    ) -> None:  # fmt: skip
        super().__init__(field, f"{actual} {what} exceed {by} of {limit}")
        self.limit = limit
        self.actual = actual

    def details(self) -> list[object]:
        return [
            *super().details(),
            error_details_pb2.ErrorInfo(
                reason="PROMPT_TOO_LONG",
                domain=ERROR_DOMAIN,
                metadata={"limit": str(self.limit), "actual": str(self.actual)},
            ),
        ]


class FailedPrecondition(ServiceError):
    """The request is valid but this model cannot serve it (e.g. no chat template)."""


class AlreadyExists(ServiceError):
    """A request with the same client-chosen id is in flight."""


class NotFound(ServiceError):
    """An unknown model (or, with vLLM, an unknown adapter)."""


class Overloaded(ServiceError):
    """Admission control (ours or vLLM's queue limits) refused the request;
    retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0, *, reason: str = "") -> None:
        super().__init__(message, reason=reason)
        self.retry_after = retry_after

    def details(self) -> list[object]:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(self.retry_after * 1000))
        return [*super().details(), error_details_pb2.RetryInfo(retry_delay=delay)]


class Unavailable(ServiceError):
    """Starting, draining, the engine died, or it gave up on the request for a
    reason outside it: try another replica."""


class DeadlineExceeded(ServiceError):
    """The call's deadline passed before the engine started it."""


class EngineFailed(ServiceError):
    """The engine ended the request with an error it does not call retryable,
    or with a finish reason this server does not know. The message is ours and
    generic; the server log has the engine's side."""


@dataclass(frozen=True)
class StatusRow:
    code: grpc.StatusCode
    meaning: str
    retry: str = "no"


# The one table: every ServiceError's code is read from here (status_row),
# and docs/api.md's "Error vocabulary" table is this table rendered
# (render_status_table; tests/unit/test_status_table.py compares them).
STATUS_TABLE: dict[type[ServiceError], StatusRow] = {
    InvalidArgument: StatusRow(grpc.StatusCode.INVALID_ARGUMENT, "bad input; fix the request"),
    PromptTooLong: StatusRow(
        grpc.StatusCode.INVALID_ARGUMENT, "prompt (+ max_tokens) longer than allowed"
    ),
    FailedPrecondition: StatusRow(
        grpc.StatusCode.FAILED_PRECONDITION, "the model cannot serve this (no chat template)"
    ),
    AlreadyExists: StatusRow(
        grpc.StatusCode.ALREADY_EXISTS, "request_id already in flight", "with another id"
    ),
    NotFound: StatusRow(grpc.StatusCode.NOT_FOUND, "unknown model or adapter"),
    Overloaded: StatusRow(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "our admission limit or vLLM's queue limits are full",
        "yes, after RetryInfo's delay or on another replica",
    ),
    Unavailable: StatusRow(
        grpc.StatusCode.UNAVAILABLE,
        "starting, draining, engine dead, or the engine gave up on the request",
        "yes, on another replica",
    ),
    DeadlineExceeded: StatusRow(
        grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed", "with a longer deadline"
    ),
    EngineFailed: StatusRow(
        grpc.StatusCode.INTERNAL,
        "the engine failed the request (finish reason error, or one unknown)",
        "maybe; the server log has the cause",
    ),
}

GENERIC_INTERNAL_MESSAGE = "internal error; the server log has the details"


def status_row(error_type: type[ServiceError]) -> StatusRow:
    """The row of `error_type`: its own, or its nearest ancestor's."""
    for cls in error_type.__mro__:
        row = STATUS_TABLE.get(cls)
        if row is not None:
            return row
    raise LookupError(f"{error_type.__name__} has no row in STATUS_TABLE")


def render_status_table() -> str:
    """STATUS_TABLE as the Markdown table docs/api.md carries."""
    lines = ["| Error | Code | Meaning | Retry? |", "|---|---|---|---|"]
    for cls, row in STATUS_TABLE.items():
        lines.append(f"| `{cls.__name__}` | `{row.code.name}` | {row.meaning} | {row.retry} |")
    return "\n".join(lines)


def to_status(error: BaseException) -> grpc.Status:
    """The rich gRPC status for any exception (INTERNAL for unknown ones)."""
    if isinstance(error, ServiceError):
        code, message, details = error.code, error.message, error.details()
    else:
        code, message, details = grpc.StatusCode.INTERNAL, GENERIC_INTERNAL_MESSAGE, []
    status = status_pb2.Status(code=_CODE_NUMBERS[code], message=message)
    for detail in details:
        status.details.add().Pack(detail)  # type: ignore[attr-defined]
    return rpc_status.to_status(status)


_CODE_NUMBERS = {code: getattr(code_pb2, code.name) for code in grpc.StatusCode}
