"""Operator limits: message size, prompt tokens, max_tokens, streams per connection.

Each is a flag on `llmgrpc-server`, lands in `ServerConfig`, and is enforced
with a status whose message names the limit. The text-prompt length check
needs a tokenizer, so here it runs in a fake engine through the same helper
(`domain.check_prompt_length`) the vLLM adapter uses; the real adapter is
covered by tests/integration/test_security.py, whose server runs with these
flags.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2
from llmgrpc import AsyncClient
from llmgrpc_server import config as server_config
from llmgrpc_server import domain
from llmgrpc_server.config import ServerConfig
from llmgrpc_server.domain import Limits, check_prompt_length
from llmgrpc_server.policy import StepPace, tokens_per_message

from tests.fake_server import FakeServer, start_fake
from tests.fakes import FakeEngine
from tests.status_details import detail, details
from tests.waiting import eventually


class CappedFakeEngine(FakeEngine):
    """The fake engine with the operator's caps, wired like `VllmEngine.start`."""

    def __init__(self, config: ServerConfig, step_delay: float = 0.0) -> None:
        super().__init__(step_delay=step_delay)
        self._limits = self._limits.capped(config.max_prompt_tokens, config.max_tokens_limit)

    async def generate(self, request: domain.GenerationRequest) -> AsyncIterator[domain.Delta]:
        check_prompt_length("prompt", len(self._ids(request)), self._limits)
        async for delta in super().generate(request):
            yield delta


def _config(**kw: object) -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, **kw)  # type: ignore[arg-type]


async def _serve(config: ServerConfig, step_delay: float = 0.0) -> FakeServer:
    return await start_fake(config, engine=CappedFakeEngine(config, step_delay))




@pytest.fixture
async def capped() -> AsyncIterator[FakeServer]:
    srv = await _serve(_config(max_prompt_tokens=10, max_tokens_limit=8))
    yield srv
    await srv.running.server.stop(grace=0)


# --- the flags ------------------------------------------------------------------


def test_flags_reach_the_config() -> None:
    parser = argparse.ArgumentParser()
    server_config.add_cli_args(parser)
    ns = parser.parse_args([
        "--max-prompt-tokens", "100", "--max-tokens-limit", "50",
        "--max-message-bytes", "65536", "--max-concurrent-streams", "8",
        "--max-tokens-per-message", "1", "--no-pin-front-end",
    ])  # fmt: skip
    config = server_config.from_namespace(ns)
    assert (config.max_prompt_tokens, config.max_tokens_limit) == (100, 50)
    assert (config.max_message_bytes, config.max_concurrent_streams) == (65536, 8)
    assert config.max_tokens_per_message == 1
    assert config.pin_front_end is False
    defaults = server_config.from_namespace(parser.parse_args([]))
    assert defaults.max_prompt_tokens is None and defaults.max_tokens_limit is None
    assert defaults.max_tokens_per_message == 8
    assert defaults.pin_front_end is True


def test_size_cap_flags_reach_the_limits() -> None:
    parser = argparse.ArgumentParser()
    server_config.add_cli_args(parser)
    argv = [
        a for i, (flag, _) in enumerate(server_config.SIZE_CAP_FLAGS) for a in (flag, str(i + 1))
    ]
    config = server_config.from_namespace(parser.parse_args([*argv, "--max-message-bytes", "8192"]))
    caps = config.size_caps()
    for i, (_, name) in enumerate(server_config.SIZE_CAP_FLAGS):
        assert getattr(caps, name) == i + 1, name
    assert caps.max_message_bytes == 8192
    # Unset, each flag takes the documented default (docs/api.md, "Limits").
    defaults = server_config.from_namespace(parser.parse_args([])).size_caps()
    assert defaults == domain.SizeCaps()
    assert (defaults.max_stop_strings, defaults.max_stop_string_chars) == (16, 256)
    assert (defaults.max_detokenize_tokens, defaults.max_tokenize_chars) == (65_536, 131_072)
    assert defaults.max_structured_output_chars == 65_536


@pytest.mark.parametrize(
    ("in_flight", "cap", "tokens"),
    [(0, 8, 1), (3, 8, 1), (4, 8, 1), (8, 8, 2), (24, 8, 6), (32, 8, 8), (500, 8, 8),
     (500, 1, 1), (500, 16, 16), (40, 16, 10)],
)  # fmt: skip
def test_tokens_per_message(in_flight: int, cap: int, tokens: int) -> None:
    assert tokens_per_message(in_flight, cap) == tokens


@pytest.mark.parametrize(
    ("in_flight", "step_ms", "budget_ms", "tokens"),
    [(32, 1.0, 10, 8), (32, 2.5, 10, 4), (64, 3.4, 10, 2), (64, 12.0, 10, 1), (8, 0.5, 10, 2),
     (32, None, 10, 8), (64, 5.0, 30, 6)],
)  # fmt: skip
def test_coalescing_stays_within_the_latency_budget(
    in_flight: int, step_ms: float | None, budget_ms: float, tokens: int
) -> None:
    """Tokens per message never exceed what the engine makes within the budget
    (nor the load rule); before the pace is known only the load rule applies."""
    step = None if step_ms is None else step_ms / 1000
    assert tokens_per_message(in_flight, 8, step, budget_ms / 1000) == tokens


def test_step_pace_follows_the_engine() -> None:
    pace = StepPace(window_s=0.5)
    assert pace.step_s is None
    pace.observe(0.008, 4, now=0.0)  # 2 ms a step
    assert pace.step_s == pytest.approx(0.002)
    pace.observe(0.004, 1, now=0.1)  # the first window: its running ratio
    assert pace.step_s == pytest.approx(0.012 / 5)
    now = 0.1
    for _ in range(500):  # the engine slows to 5 ms a step: the next windows follow
        now += 0.005
        pace.observe(0.010, 2, now=now)
    assert pace.step_s == pytest.approx(0.005)
    pace.observe(0.010, 0, now=now + 1)  # no token: nothing learnt
    assert pace.step_s == pytest.approx(0.005)


def test_step_pace_is_the_ratio_over_a_window_not_the_last_burst() -> None:
    """A busy front end hands out messages in bursts: a stall, every stream's
    message after a long gap, then short gaps as it catches up. The estimate
    within a window is the engine's step (here 5 ms), whatever the last burst."""
    pace = StepPace(window_s=0.5)
    now = 0.0
    pace.observe(0.005, 1, now=now)  # the first window begins
    step = (0.020 + 0.005) / 4  # each stream: 4 tokens per 25 ms cycle
    for _ in range(60):  # 25 ms cycles: 64 streams each wait 20 ms for a token...
        now += 0.020
        for _ in range(64):
            pace.observe(0.020, 1, now=now)
        after_the_stall = pace.step_s
        now += 0.005
        for _ in range(64 * 3):  # ...then catch up: 3 more tokens each in 5 ms
            pace.observe(0.005 / 3, 1, now=now)
        if now >= 0.5:  # a window of these cycles has closed
            assert after_the_stall == pytest.approx(step, rel=0.05)
            assert pace.step_s == pytest.approx(step, rel=0.05)


@pytest.mark.parametrize(
    ("kw", "flag"),
    [
        ({"max_prompt_tokens": 0}, "--max-prompt-tokens"),
        ({"max_tokens_limit": -1}, "--max-tokens-limit"),
        ({"max_message_bytes": 100}, "--max-message-bytes"),
        ({"max_concurrent_streams": 0}, "--max-concurrent-streams"),
        ({"max_tokens_per_message": 0}, "--max-tokens-per-message"),
        ({"coalesce_budget_ms": 0}, "--coalesce-budget-ms"),
        *(({name: 0}, flag) for flag, name in server_config.SIZE_CAP_FLAGS),
    ],
)
def test_nonsense_limits_are_refused_at_startup(kw: dict[str, int], flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        _config(**kw)


def test_caps_never_exceed_the_model() -> None:
    model = Limits(vocab_size=100, max_model_len=64)
    assert (model.max_prompt_tokens, model.max_tokens) == (63, 64)
    assert (model.capped(10, 8).max_prompt_tokens, model.capped(10, 8).max_tokens) == (10, 8)
    assert (model.capped(1000, 1000).max_prompt_tokens, model.capped(1000, 1000).max_tokens) == (
        63, 64)  # fmt: skip


# --- max_tokens -----------------------------------------------------------------


async def test_max_tokens_above_the_limit_is_invalid_argument(capped: FakeServer) -> None:
    async with AsyncClient(capped.target) as c:
        assert len((await c.generate("hi", max_tokens=8)).token_ids) == 8
        for call in (c.generate, _streamed(c)):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call("hi", max_tokens=9)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details() == (
                "sampling.max_tokens: 9 exceeds the server's --max-tokens-limit of 8 tokens"
            )


async def test_without_a_cap_max_tokens_is_bounded_by_the_model(fake: FakeServer) -> None:
    async with AsyncClient(fake.target) as c:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await c.generate("hi", max_tokens=65)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceeds the model's limit of 64 tokens" in (e.value.details() or "")


# --- prompt tokens ----------------------------------------------------------------


@pytest.mark.parametrize("as_ids", [False, True])
async def test_prompt_above_the_limit_names_it_with_limit_and_actual(
    capped: FakeServer, as_ids: bool
) -> None:
    kw = {"prompt_token_ids": [1] * 11} if as_ids else {}
    prompt = None if as_ids else "x" * 11
    async with AsyncClient(capped.target) as c:
        fits = {"prompt_token_ids": [1] * 10} if as_ids else {}
        assert (await c.generate(None if as_ids else "x" * 10, max_tokens=1, **fits)).token_ids
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await c.generate(prompt, max_tokens=1, **kw)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    field = "prompt_token_ids" if as_ids else "prompt"
    assert e.value.details() == (
        f"{field}: 11 prompt tokens exceed the server's --max-prompt-tokens of 10"
    )
    info = detail(e.value, error_details_pb2.ErrorInfo)
    assert info.reason == "PROMPT_TOO_LONG"
    assert dict(info.metadata) == {"limit": "10", "actual": "11"}


async def test_a_cap_above_the_model_leaves_the_model_limit() -> None:
    srv = await _serve(_config(max_prompt_tokens=1000, max_tokens_limit=1000))
    try:
        async with AsyncClient(srv.target) as c:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.generate(prompt_token_ids=[1] * 64, max_tokens=1)
        assert e.value.details() == (
            "prompt_token_ids: 64 prompt tokens exceed the model's limit of 63"
        )
        assert detail(e.value, error_details_pb2.ErrorInfo).metadata["limit"] == "63"
    finally:
        await srv.running.server.stop(grace=0)


# --- message size -----------------------------------------------------------------


async def test_oversized_messages_are_resource_exhausted_both_ways() -> None:
    srv = await _serve(_config(max_message_bytes=16 * 1024))
    try:
        async with AsyncClient(srv.target) as c:
            # Request too large: gRPC refuses it before any handler runs.
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.tokenize("a" * 20_000)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "Received message larger than max" in (e.value.details() or "")
            assert "vs. 16384" in (e.value.details() or "")
            # A request that fits but whose response would not: the response is
            # refused too (ids, token strings and offsets outgrow the text).
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.tokenize("a" * 8_000)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "Sent message larger than max" in (e.value.details() or "")
            # The connection and the server are fine afterwards.
            assert len((await c.tokenize("abc")).token_ids) == 3
            assert (await c.generate("hi", max_tokens=2)).usage.completion_tokens == 2
    finally:
        await srv.running.server.stop(grace=0)


# --- concurrent streams per connection --------------------------------------------


async def test_calls_beyond_the_per_connection_limit_are_refused_clearly() -> None:
    """--max-concurrent-streams: the server never runs more calls from one
    connection than the limit, and refuses the excess at once with
    RESOURCE_EXHAUSTED naming the flag (not a silent client-side queue, nor
    gRPC core's UNAVAILABLE "Stream removed"). Another connection has its own
    allowance, and health checks are not counted."""
    srv = await _serve(_config(max_concurrent_streams=2), step_delay=0.02)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, len(srv.engine.running))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        async with AsyncClient(srv.target) as c:
            slow = [asyncio.create_task(c.generate("slow", max_tokens=40)) for _ in range(2)]
            assert await eventually(lambda: len(srv.engine.running) == 2, timeout=5)
            started = time.monotonic()
            results = await asyncio.gather(
                c.generate("hello", max_tokens=1),
                c.tokenize("hello"),
                _collect(c.stream("hello", max_tokens=1)),
                return_exceptions=True,
            )
            refused_in = time.monotonic() - started
            for err in results:
                assert isinstance(err, grpc.aio.AioRpcError), err
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "--max-concurrent-streams" in (err.details() or ""), err.details()
                assert "2 calls in flight" in (err.details() or ""), err.details()
                assert details(err, error_details_pb2.RetryInfo)
            assert refused_in < 0.5  # at once: the two slow calls still run
            assert not any(t.done() for t in slow)
            assert await c.health() == "SERVING"  # probes are not counted
            # A second connection is not held back by the first one's calls.
            async with AsyncClient(srv.target, options=[("grpc.use_local_subchannel_pool", 1)]
                                   ) as other:  # fmt: skip
                assert (await other.generate("other", max_tokens=1, timeout=2)).token_ids
            assert all(len(r.token_ids) == 40 for r in await asyncio.gather(*slow))
            assert peak <= 2 + 1  # two on this connection, one on the other
            # The slots are free again.
            assert (await c.generate("after", max_tokens=1)).token_ids
            assert (await c.tokenize("after")).token_ids
    finally:
        watcher.cancel()
        await srv.running.server.stop(grace=0)


async def _collect(stream):  # type: ignore[no-untyped-def]
    return [d async for d in stream]


def _streamed(client: AsyncClient):  # type: ignore[no-untyped-def]
    async def call(prompt, **kw):  # type: ignore[no-untyped-def]
        return [d async for d in client.stream(prompt, **kw)]

    return call


# --- messages that do not parse -------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "raw", "why"),
    [
        ("Generate", b"\x12\x02\xff\xfe", "String field had bad UTF-8"),  # prompt
        ("GenerateStream", b"\x0a\x01\x80", "String field had bad UTF-8"),  # request_id
        ("Tokenize", b"\x0a\x02\xc3\x28", "String field had bad UTF-8"),  # text
        ("Detokenize", b"\xff\xff\xff", "Wire format was corrupt"),
    ],
)
async def test_unparsable_requests_are_invalid_argument(
    fake: FakeServer, method: str, raw: bytes, why: str
) -> None:
    """The proto has no bytes fields: invalid UTF-8 arrives only as corrupt
    wire data. grpc alone would answer UNKNOWN with the exception's repr."""
    path = f"/llmgrpc.v1.LLMService/{method}"
    async with grpc.aio.insecure_channel(fake.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            if method == "GenerateStream":
                _ = [m async for m in channel.unary_stream(path)(raw)]
            else:
                await channel.unary_unary(path)(raw)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("request: cannot be parsed: ")
    assert why in e.value.details()
    rpc_type = "server_stream" if method == "GenerateStream" else "unary"
    labels = {"grpc_type": rpc_type, "grpc_service": "llmgrpc.v1.LLMService",
              "grpc_method": method, "grpc_code": "INVALID_ARGUMENT"}  # fmt: skip
    # The status reaches the client before the interceptor's bookkeeping ends.
    for _ in range(100):
        if fake.metric("grpc_server_handled_total", labels) == 1:
            break
        await asyncio.sleep(0.01)
    assert fake.metric("grpc_server_handled_total", labels) == 1
