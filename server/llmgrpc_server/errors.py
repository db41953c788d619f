"""The service's error vocabulary and the one table mapping it to gRPC status.

Every layer raises these; only the error interceptor (interceptors.py) turns
them into a status. Anything not in this vocabulary becomes INTERNAL with a
generic message, and its traceback goes to the log, never to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    """Base of every error a caller can act on."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> list[object]:
        """google.rpc detail messages attached to the status."""
        return []


class InvalidArgument(ServiceError):
    """Bad input: the message names the field and the limit."""

    code = grpc.StatusCode.INVALID_ARGUMENT

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

    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExists(ServiceError):
    """A request with the same client-chosen id is in flight."""

    code = grpc.StatusCode.ALREADY_EXISTS


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class Overloaded(ServiceError):
    """Admission control refused the request; retry after `retry_after` seconds."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def details(self) -> list[object]:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(self.retry_after * 1000))
        return [error_details_pb2.RetryInfo(retry_delay=delay)]


class Unavailable(ServiceError):
    """Starting, draining, or the engine died: try another replica."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


@dataclass(frozen=True)
class StatusRow:
    code: grpc.StatusCode
    meaning: str
    retry: bool = False
    examples: tuple[str, ...] = field(default=())


# The documented table (docs/api.md renders the same rows).
STATUS_TABLE: dict[type[ServiceError], StatusRow] = {
    InvalidArgument: StatusRow(grpc.StatusCode.INVALID_ARGUMENT, "bad input; fix the request"),
    PromptTooLong: StatusRow(grpc.StatusCode.INVALID_ARGUMENT, "prompt + max_tokens too long"),
    FailedPrecondition: StatusRow(
        grpc.StatusCode.FAILED_PRECONDITION, "the model cannot serve this (no chat template)"
    ),
    AlreadyExists: StatusRow(grpc.StatusCode.ALREADY_EXISTS, "request_id already in flight"),
    NotFound: StatusRow(grpc.StatusCode.NOT_FOUND, "unknown model or adapter"),
    Overloaded: StatusRow(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded", retry=True),
    Unavailable: StatusRow(grpc.StatusCode.UNAVAILABLE, "starting/draining/dead", retry=True),
    DeadlineExceeded: StatusRow(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed"),
}

GENERIC_INTERNAL_MESSAGE = "internal error; the server log has the details"


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
