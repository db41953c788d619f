"""Bearer-token authentication for every RPC except health and reflection."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

# Probes and tooling must work without credentials.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")  # fmt: skip


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: tuple[str, ...]) -> None:
        self._tokens = tuple(t.encode() for t in tokens)

    def _valid(self, presented: str) -> bool:
        candidate = presented.encode()
        # Compare against every token, in constant time, without early exit.
        return any([hmac.compare_digest(candidate, t) for t in self._tokens])

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(OPEN_SERVICES):
            return await continuation(details)
        header = dict(details.invocation_metadata or ()).get("authorization", "")
        scheme, _, token = str(header).partition(" ")
        if scheme.lower() == "bearer" and token and self._valid(token):
            return await continuation(details)
        return _deny(await continuation(details))


def _deny(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    async def abort(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or invalid bearer token (metadata 'authorization: Bearer <token>')",
        )

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
