"""Size caps: every input whose cost grows with its size is refused, before
any work, one past its flag's value, with INVALID_ARGUMENT naming the field
and the flag; at the cap it is served. So is a Tokenize or Detokenize whose
answer could exceed --max-message-bytes.

A fake engine behind a real gRPC server; it counts the tokenize and
detokenize calls that reach it, so "before any work" is checked as "the
engine was never asked". The real engine: tests/integration/test_input_caps.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from llmgrpc import AsyncClient
from llmgrpc.client import generate_request, tokenize_request
from llmgrpc.v1 import llm_service_pb2 as pb
from llmgrpc_server import domain, policy
from llmgrpc_server.config import SIZE_CAP_FLAGS, ServerConfig
from llmgrpc_server.domain import check_token_ids
from llmgrpc_server.errors import InvalidArgument

from tests.fake_server import FakeServer, start_fake
from tests.fakes import VOCAB, FakeEngine

CAPS = {
    "max_stop_strings": 2, "max_stop_string_chars": 5, "max_stop_token_ids": 3,
    "max_structured_output_chars": 20, "max_chat_messages": 2, "max_tokenize_chars": 10,
    "max_detokenize_tokens": 4,
}  # fmt: skip


class CountingEngine(FakeEngine):
    """The fake engine with the config's size caps; it counts the work it is asked for."""

    def __init__(self, config: ServerConfig) -> None:
        super().__init__()
        self._limits = replace(self._limits, caps=config.size_caps())
        self.work = 0

    async def tokenize(self, text, chat, add_special_tokens):  # type: ignore[no-untyped-def]
        self.work += 1
        return await super().tokenize(text, chat, add_special_tokens)

    async def detokenize(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        self.work += 1
        return await super().detokenize(token_ids, skip_special_tokens)

    def generate(self, request: domain.GenerationRequest) -> AsyncIterator[domain.Delta]:
        self.work += 1
        return super().generate(request)


async def _serve(**kw: Any) -> FakeServer:
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, **kw)
    return await start_fake(config, engine=CountingEngine(config))


@pytest.fixture
async def capped() -> AsyncIterator[FakeServer]:
    srv = await _serve(**CAPS)
    yield srv
    await srv.running.server.stop(grace=0)


def _gen(prompt: str | None = "hi", **kw: Any) -> tuple[str, pb.GenerateRequest]:
    return "Generate", generate_request(prompt, max_tokens=1, **kw)


def _tok(text: str | None = None, **kw: Any) -> tuple[str, Any]:
    return "Tokenize", tokenize_request(text, **kw)


def _detok(n: int) -> tuple[str, Any]:
    return "Detokenize", pb.DetokenizeRequest(token_ids=[1] * n)


def _chat(n: int, chars: int = 1) -> list[tuple[str, str]]:
    return [("user", "x" * chars)] * n


# (at the cap, one past it, the status message one past it)
CASES: dict[str, tuple[Callable[[], tuple[str, Any]], Callable[[], tuple[str, Any]], str]] = {
    "stop strings": (
        lambda: _gen(stop=["a", "b"]), lambda: _gen(stop=["a", "b", "c"]),
        "sampling.stop: 3 stop strings exceed the server's --max-stop-strings of 2"),
    "stop string chars": (
        lambda: _gen(stop=["a", "x" * 5]), lambda: _gen(stop=["a", "x" * 6]),
        "sampling.stop[1]: 6 characters exceed the server's --max-stop-string-chars of 5"),
    "stop token ids": (
        lambda: _gen(stop_token_ids=[1, 2, 3]), lambda: _gen(stop_token_ids=[1, 2, 3, 4]),
        "sampling.stop_token_ids: 4 stop token ids exceed the server's --max-stop-token-ids of 3"),
    "json schema": (
        lambda: _gen(json_schema='{"type": "string"}  '),
        lambda: _gen(json_schema='{"type": "string"}   '),
        "structured_output.json_schema: 21 characters exceed the server's "
        "--max-structured-output-chars of 20"),
    "regex": (
        lambda: _gen(regex="a" * 20), lambda: _gen(regex="a" * 21),
        "structured_output.regex: 21 characters exceed the server's "
        "--max-structured-output-chars of 20"),
    "grammar": (
        lambda: _gen(grammar="g" * 20), lambda: _gen(grammar="g" * 21),
        "structured_output.grammar: 21 characters exceed the server's "
        "--max-structured-output-chars of 20"),
    "choices": (
        lambda: _gen(choice=["a" * 10, "b" * 10]), lambda: _gen(choice=["a" * 10, "b" * 10, "c"]),
        "structured_output.choice.choices: 21 characters exceed the server's "
        "--max-structured-output-chars of 20"),
    "many empty choices": (
        lambda: _gen(choice=["a"] * 20), lambda: _gen(choice=[""] * 21),
        "structured_output.choice.choices: 21 characters exceed the server's "
        "--max-structured-output-chars of 20"),
    "chat messages": (
        lambda: _gen(prompt=None, messages=_chat(2)), lambda: _gen(prompt=None, messages=_chat(3)),
        "chat.messages: 3 messages exceed the server's --max-chat-messages of 2"),
    "tokenize chat messages": (
        lambda: _tok(messages=_chat(2)), lambda: _tok(messages=_chat(3)),
        "chat.messages: 3 messages exceed the server's --max-chat-messages of 2"),
    "tokenize text": (
        lambda: _tok("x" * 10), lambda: _tok("x" * 11),
        "text: 11 characters exceed the server's --max-tokenize-chars of 10"),
    "tokenize chat chars": (  # roles count: 2 * ("user" + 1)
        lambda: _tok(messages=_chat(2, 1)), lambda: _tok(messages=_chat(2, 2)),
        "chat.messages: 12 characters exceed the server's --max-tokenize-chars of 10"),
    "detokenize ids": (
        lambda: _detok(4), lambda: _detok(5),
        "token_ids: 5 token ids exceed the server's --max-detokenize-tokens of 4"),
}  # fmt: skip


async def _call(client: AsyncClient, method: str, request: Any) -> Any:
    return await getattr(client.stub, method)(request, timeout=10)


@pytest.mark.parametrize("case", CASES)
async def test_one_past_each_cap_is_refused_naming_the_flag(capped: FakeServer, case: str) -> None:
    at_cap, past_cap, message = CASES[case]
    engine = capped.engine
    assert isinstance(engine, CountingEngine)
    async with AsyncClient(capped.target) as client:
        await _call(client, *at_cap())
        work = engine.work
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _call(client, *past_cap())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == message
    assert engine.work == work  # refused before the engine saw it


@pytest.fixture
async def small_messages() -> AsyncIterator[FakeServer]:
    srv = await _serve(max_message_bytes=4096)
    yield srv
    await srv.running.server.stop(grace=0)


async def test_a_tokenize_answer_that_might_not_fit_is_refused_before_the_work(
    small_messages: FakeServer,
) -> None:
    engine = small_messages.engine
    assert isinstance(engine, CountingEngine)
    # (4096 - 1024) / 28: 109 bytes of text can always be answered, 110 might not.
    async with AsyncClient(small_messages.target) as client:
        assert len((await client.tokenize("x" * 109)).token_ids) == 109
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.tokenize("x" * 110)
        assert engine.work == 1
        # Non-ASCII text counts in UTF-8 bytes: 54 "é" are 108 bytes, 55 are 110.
        await client.tokenize("é" * 54)
        with pytest.raises(grpc.aio.AioRpcError) as e2:
            await client.tokenize("é" * 55)
    assert e.value.code() == e2.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == (
        "text: the answer could reach 4104 bytes (110 bytes of text, up to 28 each), over the "
        "server's --max-message-bytes of 4096; send less or raise --max-message-bytes"
    )
    assert "110 bytes of text" in e2.value.details()


async def test_a_detokenize_answer_that_might_not_fit_is_refused_before_the_work(
    small_messages: FakeServer,
) -> None:
    engine = small_messages.engine
    assert isinstance(engine, CountingEngine)
    per_id = engine.limits.max_token_bytes
    fits = (4096 - domain.ANSWER_OVERHEAD_BYTES) // per_id
    async with AsyncClient(small_messages.target) as client:
        assert len(await client.detokenize([1] * fits)) == fits
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.detokenize([1] * (fits + 1))
    assert engine.work == 1
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == (
        f"token_ids: the answer could reach {(fits + 1) * per_id + 1024} bytes ({fits + 1} ids, "
        f"up to {per_id} bytes each), over the server's --max-message-bytes of 4096; send less "
        "or raise --max-message-bytes"
    )


async def test_a_unary_generate_answer_that_might_not_fit_is_refused_before_the_work(
    small_messages: FakeServer,
) -> None:
    engine = small_messages.engine
    assert isinstance(engine, CountingEngine)
    token = engine.limits.max_token_bytes
    plain, with_logprobs = token + 5, 2 * token + 5 + 23 + 2 * (token + 18)  # logprobs=1
    room = 4096 - domain.ANSWER_OVERHEAD_BYTES
    async with AsyncClient(small_messages.target) as client:
        assert len((await client.generate("hi", max_tokens=room // plain)).token_ids)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.generate("hi", max_tokens=room // plain + 1)
        with pytest.raises(grpc.aio.AioRpcError) as e2:
            await client.generate("hi", max_tokens=room // with_logprobs + 1, logprobs=1)
        assert engine.work == 1
        # The same tokens streamed go in many messages: served.
        streamed = [d async for d in client.stream("hi", max_tokens=room // plain + 1)]
        assert sum(len(d.token_ids) for d in streamed) == room // plain + 1
    assert e.value.code() == e2.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    n = room // plain + 1
    assert e.value.details() == (
        f"sampling.max_tokens: the answer could reach {n * plain + 1024} bytes ({n} tokens, up "
        f"to {plain} bytes each with their logprobs; GenerateStream sends them in many "
        "messages), over the server's --max-message-bytes of 4096; send less or raise "
        "--max-message-bytes"
    )
    assert f"up to {with_logprobs} bytes each" in (e2.value.details() or "")


async def test_long_model_names_and_roles_are_refused(capped: FakeServer) -> None:
    async with AsyncClient(capped.target) as client:
        for method, request, message in [
            ("Tokenize", tokenize_request("x", model="m" * 257), "model: at most 256 characters"),
            ("Generate", generate_request("x", model="m" * 257), "model: at most 256 characters"),
            ("Tokenize", tokenize_request(messages=[("r" * 65, "x")]),
             "chat.messages[0].role: at most 64 characters"),
        ]:  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _call(client, method, request)
            assert (e.value.code(), e.value.details()) == (
                grpc.StatusCode.INVALID_ARGUMENT, message)  # fmt: skip


@pytest.mark.parametrize(
    ("ids", "field"),
    [
        ([1] * 1000 + [VOCAB], "ids[1000]"),
        ([VOCAB + 5, 1, VOCAB], "ids[0]"),
        ([1, 2**31], "ids[1]"),
    ],
)
def test_the_first_id_outside_the_vocabulary_is_named(ids: list[int], field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        check_token_ids("ids", ids, VOCAB)
    assert e.value.violations[0].field == field
    check_token_ids("ids", [0, VOCAB - 1] * 1000, VOCAB)  # inside: no error
    check_token_ids("ids", [], VOCAB)


def test_every_size_cap_is_documented_with_its_default() -> None:
    root = Path(__file__).resolve().parents[2]
    api, readme = (root / "docs/api.md").read_text(), (root / "README.md").read_text()
    for flag, name in SIZE_CAP_FLAGS:
        assert f"| `{flag}` | {getattr(domain.SizeCaps, name):,} |" in api, flag
        assert f"`{flag}`" in readme, flag


async def test_a_tokenize_answer_built_in_slices_is_whole() -> None:
    srv = await _serve()
    n = 3 * policy.TOKENS_PER_LOOP_TURN + 5  # the fake engine: one token a character
    try:
        async with AsyncClient(srv.target) as client:
            answer = await client.tokenize("x" * n)
    finally:
        await srv.running.server.stop(grace=0)
    assert len(answer.token_ids) == len(answer.tokens) == len(answer.offsets) == n
    assert [(o.start, o.end) for o in answer.offsets] == [(i, i + 1) for i in range(n)]


def _nested(depth: int) -> str:
    """A JSON schema whose objects nest `depth` deep."""
    return '{"a": ' * (depth - 1) + '{"type": "string"}' + "}" * (depth - 1)


@pytest.mark.parametrize(
    ("schema", "message"),
    [(_nested(65), "nested 65 levels deep, over 64"),
     # json.loads itself gives up (RecursionError, not ValueError): still bad input.
     ("[" * 60_000, "nested over 64 levels deep")],
)  # fmt: skip
async def test_a_json_schema_nested_too_deep_is_invalid_argument(
    schema: str, message: str
) -> None:
    srv = await _serve()
    try:
        async with AsyncClient(srv.target) as client:
            assert (await client.generate("hi", max_tokens=1, json_schema=_nested(64))).token_ids
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.generate("hi", max_tokens=1, json_schema=schema)
    finally:
        await srv.running.server.stop(grace=0)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == f"structured_output.json_schema: {message}"
