"""The servers `llmgrpc bench` can drive, behind one small interface.

- `GrpcBackend`: an llmgrpc server (GenerateStream, or Generate with `stream=False`);
- `OpenAIBackend`: an OpenAI-compatible HTTP server (vLLM's), streaming `/v1/completions`;
- the in-process engine (`--backend inprocess`): vLLM's `AsyncLLM` in this process, no
  network at all (the limit a front end can reach). It is the server's
  (`llmgrpc_server.vllm_adapter.inprocess`, installed with `llmgrpc[server]`), so
  the client package stays importable without vLLM or torch; aiohttp likewise.

Every backend times requests the same way (`Recorder`): the clock starts just
before the request is sent, and each message that carries tokens is stamped on
arrival.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

import grpc

from llmgrpc.client import AsyncClient, generate_request


@dataclass
class RequestResult:
    """What one request did, as the client saw it (seconds)."""

    ok: bool
    error: str | None = None  # a gRPC status name, "HTTP 503", or an exception class
    ttft: float | None = None
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    messages: int = 0


class Recorder:
    """Stamps the messages of one request."""

    __slots__ = ("first", "itls", "last", "messages", "start", "tokens")

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last = self.start
        self.itls: list[float] = []
        self.tokens = 0
        self.messages = 0

    def message(self, n_tokens: int) -> None:
        self.messages += 1
        if not n_tokens:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        else:
            self.itls.append(now - self.last)
        self.last = now
        self.tokens += n_tokens

    def done(self, prompt_tokens: int | None = None) -> RequestResult:
        end = time.perf_counter()
        return RequestResult(
            ok=True,
            ttft=None if self.first is None else self.first - self.start,
            e2e=end - self.start,
            itls=self.itls,
            output_tokens=self.tokens,
            prompt_tokens=prompt_tokens,
            messages=self.messages,
        )

    def failed(self, error: str) -> RequestResult:
        return RequestResult(ok=False, error=error, e2e=time.perf_counter() - self.start,
                             output_tokens=self.tokens, messages=self.messages)  # fmt: skip


class Backend(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def count_tokens(self, text: str) -> int | None:
        """Tokens in `text` with the served model's tokenizer (None: unknown)."""

    async def send(self, prompt: str, max_tokens: int, ignore_eos: bool) -> RequestResult: ...


class Lifecycle:
    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def __aenter__(self) -> Lifecycle:
        await self.start()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class GrpcBackend(Lifecycle):
    """An llmgrpc server over one gRPC channel (HTTP/2 multiplexes the calls),
    or over `channels` channels with a connection each, the calls taking them
    in turn (a server with --api-server-count spreads connections)."""

    def __init__(self, target: str, *, stream: bool = True, timeout: float | None = None,
                 channels: int = 1):  # fmt: skip
        self.name = "grpc" if stream else "grpc-unary"
        self.target = target
        self.stream = stream
        self.timeout = timeout
        self.channels = channels
        self._clients: list[AsyncClient] = []
        self._turn = 0

    def _next_client(self) -> AsyncClient:
        """The channel this call takes: the next one in turn."""
        assert self._clients, "start() first"
        self._turn = (self._turn + 1) % len(self._clients)
        return self._clients[self._turn]

    async def start(self) -> None:
        # grpc shares one connection between channels to a target unless told not to.
        options = [("grpc.use_local_subchannel_pool", 1)] if self.channels > 1 else []
        self._clients = [AsyncClient(self.target, timeout=self.timeout, options=options)
                         for _ in range(self.channels)]  # fmt: skip

    async def close(self) -> None:
        for client in self._clients:
            await client.close()

    async def count_tokens(self, text: str) -> int | None:
        return len((await self._next_client().tokenize(text)).token_ids)

    async def send(self, prompt: str, max_tokens: int, ignore_eos: bool) -> RequestResult:
        stub, timeout = self._next_client().stub, self.timeout
        req = generate_request(prompt, max_tokens=max_tokens, ignore_eos=ignore_eos,
                               temperature=0.0)  # fmt: skip
        rec = Recorder()
        try:
            if not self.stream:
                resp = await stub.Generate(req, timeout=timeout)
                rec.message(len(resp.token_ids))
                return rec.done(resp.usage.prompt_tokens)
            prompt_tokens = None
            async for msg in stub.GenerateStream(req, timeout=timeout):
                rec.message(len(msg.token_ids))
                if msg.HasField("usage"):
                    prompt_tokens = msg.usage.prompt_tokens
            return rec.done(prompt_tokens)
        except grpc.RpcError as e:
            return rec.failed(e.code().name)  # type: ignore[attr-defined]


class OpenAIBackend(Lifecycle):
    """An OpenAI-compatible server: streaming `/v1/completions` over aiohttp."""

    def __init__(self, url: str, model: str, *, timeout: float | None = None):
        self.name = "openai"
        self.url = url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self._session: Any = None

    async def start(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def count_tokens(self, text: str) -> int | None:
        async with self._session.post(
            f"{self.url}/tokenize", json={"model": self.model, "prompt": text}
        ) as resp:
            if resp.status != 200:
                return None
            return int((await resp.json())["count"])

    async def send(self, prompt: str, max_tokens: int, ignore_eos: bool) -> RequestResult:
        body = {
            "model": self.model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": ignore_eos, "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,  # the same payload as llmgrpc's deltas
        }  # fmt: skip
        rec = Recorder()
        prompt_tokens = None
        try:
            async with self._session.post(f"{self.url}/v1/completions", json=body) as resp:
                if resp.status != 200:
                    await resp.read()
                    return rec.failed(f"HTTP {resp.status}")
                async for line in resp.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        prompt_tokens = chunk["usage"]["prompt_tokens"]
                    for choice in chunk.get("choices") or ():
                        ids = choice.get("token_ids")
                        rec.message(len(ids) if ids is not None else int(bool(choice["text"])))
            return rec.done(prompt_tokens)
        except Exception as e:  # connection reset, timeout...: count it, carry on
            return rec.failed(type(e).__name__)


def make_backend(
    kind: str,
    *,
    target: str = "localhost:50051",
    url: str = "http://localhost:8000",
    model: str = "tiny-llama-gqa",
    stream: bool = True,
    timeout: float | None = None,
    server_args: Sequence[str] = (),
    channels: int = 1,
) -> Backend:
    """A backend by name; `server_args` are llmgrpc-server flags for the in-process engine."""
    if kind == "grpc":
        return GrpcBackend(target, stream=stream, timeout=timeout, channels=channels)
    if kind == "openai":
        return OpenAIBackend(url, model, timeout=timeout)
    if kind == "inprocess":
        try:
            from llmgrpc_server.main import parse
            from llmgrpc_server.vllm_adapter.inprocess import InProcessBackend
        except ImportError as e:
            raise ValueError(f"the inprocess backend needs the server installed ({e})") from e
        _, engine_args = parse(["--model", model, *server_args])  # the server's own defaults
        return InProcessBackend(engine_args)
    raise ValueError(f"unknown backend {kind!r}")
