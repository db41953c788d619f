"""Python clients for llmgrpc: `Client` (blocking) and `AsyncClient` (asyncio),
and `AdminClient` (blocking) for the server's AdminService.

Only grpcio and protobuf are needed (no vLLM, no torch). Both clients speak
the same calls: `generate`, `stream` (yields deltas), `tokenize`,
`detokenize`, `model_info` and `health`; `model=` in generate, stream and
tokenize names the base model or a LoRA adapter. `AdminClient` loads, unloads
and lists LoRA adapters with an admin token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmgrpc.v1 import admin_service_pb2 as admin_pb
from llmgrpc.v1 import admin_service_pb2_grpc as admin_pb_grpc
from llmgrpc.v1 import llm_service_pb2 as pb
from llmgrpc.v1 import llm_service_pb2_grpc as pb_grpc

SERVICE_NAME = "llmgrpc.v1.LLMService"

# Keepalive pings every 30 s keep long unary calls alive through idle-timeout
# proxies; the server accepts pings every 10 s and never counts ping strikes.
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.enable_retries", 1),
)


@dataclass(frozen=True)
class Security:
    """TLS / mTLS material and a bearer token; all optional."""

    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    token: str | None = None
    tls: bool = False
    server_name: str | None = None

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca_cert is not None or self.client_cert is not None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        def read(p: Path | None) -> bytes | None:
            return p.read_bytes() if p else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_cert),
            private_key=read(self.client_key),
            certificate_chain=read(self.client_cert),
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def options(self) -> tuple[tuple[str, Any], ...]:
        if self.server_name:
            return (("grpc.ssl_target_name_override", self.server_name),)
        return ()


def channel_options(
    security: Security, options: Sequence[tuple[str, Any]] = ()
) -> list[tuple[str, Any]]:
    """The defaults, overridden by the security options, overridden by `options`.

    gRPC core takes the first of two equal keys, so a plain concatenation
    would silently ignore a caller's override of a default.
    """
    merged = dict(DEFAULT_CHANNEL_OPTIONS)
    merged.update(security.options())
    merged.update(options)
    return list(merged.items())


def generate_request(
    prompt: str | None = None,
    *,
    prompt_token_ids: Sequence[int] | None = None,
    messages: Sequence[tuple[str, str] | dict[str, str]] | None = None,
    request_id: str = "",
    json_schema: str | None = None,
    regex: str | None = None,
    choice: Sequence[str] | None = None,
    grammar: str | None = None,
    model: str = "",
    truncate_prompt_tokens: int | None = None,
    priority: int = 0,
    **sampling: Any,
) -> pb.GenerateRequest:
    """Build a GenerateRequest; `sampling` takes SamplingParams field names
    (e.g. n, prompt_logprobs, logit_bias={id: bias}, allowed_token_ids, bad_words)."""
    req = pb.GenerateRequest(
        request_id=request_id, model=model, priority=priority,
        sampling=pb.SamplingParams(**sampling),
    )  # fmt: skip
    if truncate_prompt_tokens is not None:
        req.truncate_prompt_tokens = truncate_prompt_tokens
    if prompt is not None:
        req.prompt = prompt
    elif prompt_token_ids is not None:
        req.prompt_token_ids.ids.extend(prompt_token_ids)
    elif messages is not None:
        req.chat.CopyFrom(chat_input(messages))
    if json_schema is not None:
        req.structured_output.json_schema = json_schema
    elif regex is not None:
        req.structured_output.regex = regex
    elif choice is not None:
        req.structured_output.choice.choices.extend(choice)
    elif grammar is not None:
        req.structured_output.grammar = grammar
    return req


def chat_input(messages: Sequence[tuple[str, str] | dict[str, str]]) -> pb.ChatInput:
    chat = pb.ChatInput()
    for m in messages:
        role, content = (m["role"], m["content"]) if isinstance(m, dict) else m
        chat.messages.add(role=role, content=content)
    return chat


def tokenize_request(
    text: str | None = None,
    *,
    messages: Sequence[tuple[str, str] | dict[str, str]] | None = None,
    add_special_tokens: bool | None = None,
    model: str = "",
    truncate_prompt_tokens: int | None = None,
) -> pb.TokenizeRequest:
    req = pb.TokenizeRequest(model=model)
    if truncate_prompt_tokens is not None:
        req.truncate_prompt_tokens = truncate_prompt_tokens
    if messages is not None:
        req.chat.CopyFrom(chat_input(messages))
    else:
        req.text = text or ""
    if add_special_tokens is not None:
        req.add_special_tokens = add_special_tokens
    return req


class _BlockingChannel:
    """A blocking channel, its security and default deadline; a context manager."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        security: Security | None = None,
        options: Sequence[tuple[str, Any]] = (),
        timeout: float | None = None,
    ) -> None:
        self.security = security or Security()
        opts = channel_options(self.security, options)
        if self.security.uses_tls:
            self.channel = grpc.secure_channel(target, self.security.channel_credentials(), opts)
        else:
            self.channel = grpc.insecure_channel(target, opts)
        self.timeout = timeout

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _kw(self, timeout: float | None, metadata: Sequence[tuple[str, str]] = ()
            ) -> dict[str, Any]:  # fmt: skip
        return {"timeout": timeout or self.timeout,
                "metadata": (*self.security.metadata(), *metadata)}  # fmt: skip


class Client(_BlockingChannel):
    """Blocking client. Use as a context manager or call `close()`."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        security: Security | None = None,
        options: Sequence[tuple[str, Any]] = (),
        timeout: float | None = None,
    ) -> None:
        super().__init__(target, security=security, options=options, timeout=timeout)
        self.stub = pb_grpc.LLMServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                 metadata: Sequence[tuple[str, str]] = (), **kw: Any
                 ) -> pb.GenerateResponse:  # fmt: skip
        """`metadata`: extra call metadata, e.g. ("x-request-id", id) or a W3C
        ("traceparent", ...) to continue the caller's trace."""
        return self.stub.Generate(generate_request(prompt, **kw), **self._kw(timeout, metadata))

    def stream(self, prompt: str | None = None, *, timeout: float | None = None,
               metadata: Sequence[tuple[str, str]] = (), **kw: Any
               ) -> Iterator[pb.GenerateResponse]:  # fmt: skip
        """Yield deltas; the last one has finish_reason and usage. Closing
        the iterator early cancels the call (and the engine request)."""
        call = self.stub.GenerateStream(generate_request(prompt, **kw),
                                        **self._kw(timeout, metadata))  # fmt: skip
        try:
            yield from call
        finally:
            call.cancel()

    def tokenize(self, text: str | None = None, *, timeout: float | None = None, **kw: Any
                 ) -> pb.TokenizeResponse:  # fmt: skip
        return self.stub.Tokenize(tokenize_request(text, **kw), **self._kw(timeout))

    def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool | None = None,
                   timeout: float | None = None) -> str:  # fmt: skip
        req = pb.DetokenizeRequest(token_ids=token_ids)
        if skip_special_tokens is not None:
            req.skip_special_tokens = skip_special_tokens
        return str(self.stub.Detokenize(req, **self._kw(timeout)).text)

    def model_info(self, *, timeout: float | None = None) -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), **self._kw(timeout))

    def health(self, service: str = SERVICE_NAME, *, timeout: float | None = 5.0) -> str:
        """ "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"... for `service`."""
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                      timeout=timeout)  # fmt: skip
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def wait_until_serving(self, service: str = SERVICE_NAME, timeout: float = 600.0) -> None:
        """Block until `service` is SERVING (watching the health service)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
        for resp in self.health_stub.Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        ):
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return


class AdminClient(_BlockingChannel):
    """Blocking client of the server's AdminService: LoRA adapters without a restart.

    `security.token` must be an admin token (a line of the server's
    --admin-token-file); a serving token is PERMISSION_DENIED. A server started
    without --admin-token-file answers UNIMPLEMENTED.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        security: Security | None = None,
        options: Sequence[tuple[str, Any]] = (),
        timeout: float | None = None,
    ) -> None:
        super().__init__(target, security=security, options=options, timeout=timeout)
        self.stub = admin_pb_grpc.AdminServiceStub(self.channel)

    def load_adapter(self, name: str, path: str, *, timeout: float | None = None
                     ) -> admin_pb.LoadAdapterResponse:  # fmt: skip
        """Load adapter `name` from `path`, relative to the server's --adapter-dir."""
        req = admin_pb.LoadAdapterRequest(name=name, path=path)
        return self.stub.LoadAdapter(req, **self._kw(timeout))

    def unload_adapter(self, name: str, *, timeout: float | None = None) -> None:
        self.stub.UnloadAdapter(admin_pb.UnloadAdapterRequest(name=name), **self._kw(timeout))

    def list_adapters(self, *, timeout: float | None = None) -> list[pb.Adapter]:
        resp = self.stub.ListAdapters(admin_pb.ListAdaptersRequest(), **self._kw(timeout))
        return list(resp.adapters)


class AsyncClient:
    """asyncio client with the same calls as `Client`."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        security: Security | None = None,
        options: Sequence[tuple[str, Any]] = (),
        timeout: float | None = None,
    ) -> None:
        self.security = security or Security()
        opts = channel_options(self.security, options)
        if self.security.uses_tls:
            self.channel = grpc.aio.secure_channel(
                target, self.security.channel_credentials(), opts
            )
        else:
            self.channel = grpc.aio.insecure_channel(target, opts)
        self.stub = pb_grpc.LLMServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    def _kw(self, timeout: float | None, metadata: Sequence[tuple[str, str]] = ()
            ) -> dict[str, Any]:  # fmt: skip
        return {"timeout": timeout or self.timeout,
                "metadata": (*self.security.metadata(), *metadata)}  # fmt: skip

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                       metadata: Sequence[tuple[str, str]] = (), **kw: Any
                       ) -> pb.GenerateResponse:  # fmt: skip
        return await self.stub.Generate(generate_request(prompt, **kw),
                                        **self._kw(timeout, metadata))  # fmt: skip

    async def stream(self, prompt: str | None = None, *, timeout: float | None = None,
                     metadata: Sequence[tuple[str, str]] = (), **kw: Any
                     ) -> AsyncIterator[pb.GenerateResponse]:  # fmt: skip
        call = self.stub.GenerateStream(generate_request(prompt, **kw),
                                        **self._kw(timeout, metadata))  # fmt: skip
        try:
            async for msg in call:
                yield msg
        finally:
            call.cancel()

    async def tokenize(self, text: str | None = None, *, timeout: float | None = None,
                       **kw: Any) -> pb.TokenizeResponse:  # fmt: skip
        return await self.stub.Tokenize(tokenize_request(text, **kw), **self._kw(timeout))

    async def detokenize(self, token_ids: Sequence[int], *,
                         skip_special_tokens: bool | None = None,
                         timeout: float | None = None) -> str:  # fmt: skip
        req = pb.DetokenizeRequest(token_ids=token_ids)
        if skip_special_tokens is not None:
            req.skip_special_tokens = skip_special_tokens
        return str((await self.stub.Detokenize(req, **self._kw(timeout))).text)

    async def model_info(self, *, timeout: float | None = None) -> pb.GetModelInfoResponse:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), **self._kw(timeout))

    async def health(self, service: str = SERVICE_NAME, *, timeout: float | None = 5.0) -> str:
        resp = await self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    async def wait_until_serving(self, service: str = SERVICE_NAME, timeout: float = 600.0
                                 ) -> None:  # fmt: skip
        async for resp in self.health_stub.Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout,
            wait_for_ready=True,
        ):  # fmt: skip
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return
