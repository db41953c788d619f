"""Bearer-token authentication for every RPC except health and reflection.

Serving calls take the --auth-token-file tokens (any call passes when there are
none); AdminService calls take only the --admin-token-file tokens: a serving
token there is PERMISSION_DENIED, no or a wrong token UNAUTHENTICATED."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

# Probes and tooling must work without credentials.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")  # fmt: skip
ADMIN_SERVICE = "/llmgrpc.v1.AdminService/"
UNAUTHENTICATED = (
    grpc.StatusCode.UNAUTHENTICATED,
    "missing or invalid bearer token (metadata 'authorization: Bearer <token>')",
)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: tuple[str, ...], admin_tokens: tuple[str, ...] = ()) -> None:
        self._tokens = tuple(t.encode() for t in tokens)
        self._admin_tokens = tuple(t.encode() for t in admin_tokens)

    @staticmethod
    def _valid(presented: str, tokens: tuple[bytes, ...]) -> bool:
        candidate = presented.encode()
        # Compare against every token, in constant time, without early exit.
        return any([hmac.compare_digest(candidate, t) for t in tokens])

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        refusal = self._refusal(details)
        handler = await continuation(details)
        return handler if refusal is None else _deny(handler, *refusal)

    def _refusal(self, details: grpc.HandlerCallDetails) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may go on; else its status and message."""
        if details.method.startswith(OPEN_SERVICES):
            return None
        header = dict(details.invocation_metadata or ()).get("authorization", "")
        scheme, _, token = str(header).partition(" ")
        token = token if scheme.lower() == "bearer" else ""
        if details.method.startswith(ADMIN_SERVICE):
            if not self._admin_tokens or (token and self._valid(token, self._admin_tokens)):
                return None  # (without admin tokens the service is not there: UNIMPLEMENTED)
            if token and self._valid(token, self._tokens):
                return (grpc.StatusCode.PERMISSION_DENIED,
                        "a serving token cannot call AdminService; use an admin token")
            return UNAUTHENTICATED
        if not self._tokens or (token and self._valid(token, self._tokens)):
            return None
        return UNAUTHENTICATED


def _deny(
    handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    async def abort(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    kwargs = {}
    if handler is not None:
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
    if handler is not None and handler.unary_stream:
        async def abort_stream(request: object, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
            await abort(request, context)
            yield  # pragma: no cover - unreachable, makes this an async generator

        return grpc.unary_stream_rpc_method_handler(abort_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)
