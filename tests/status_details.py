"""The google.rpc detail messages attached to a failed call's status."""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf.message import Message
from grpc_status import rpc_status

M = TypeVar("M", bound=Message)


def details(error: Any, kind: type[M]) -> list[M]:
    """Every detail of type `kind` in the call's rich status (none without one)."""
    status = rpc_status.from_call(error)
    found = []
    for packed in status.details if status else ():
        if packed.Is(kind.DESCRIPTOR):
            message = kind()
            packed.Unpack(message)
            found.append(message)
    return found


def detail(error: Any, kind: type[M]) -> M:
    """The one detail of type `kind` the test expects."""
    found = details(error, kind)
    assert found, f"no {kind.DESCRIPTOR.name} detail in the status"
    return found[0]
