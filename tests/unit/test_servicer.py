"""The servicer, interceptor and lifecycle, on a real gRPC server with a fake engine."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
from google.rpc import error_details_pb2
from llmgrpc import AsyncClient
from llmgrpc.v1 import llm_service_pb2 as pb
from llmgrpc_server import interceptors
from llmgrpc_server.config import ServerConfig

from tests.fake_server import FakeServer, start_fake
from tests.status_details import detail, details
from tests.waiting import eventually


async def test_unary_equals_concatenated_stream(client: AsyncClient) -> None:
    unary = await client.generate("hello", max_tokens=5)
    deltas = [d async for d in client.stream("hello", max_tokens=5)]
    assert "".join(d.text for d in deltas) == unary.text
    assert [t for d in deltas for t in d.token_ids] == list(unary.token_ids)
    assert all(d.finish_reason == pb.FINISH_REASON_UNSPECIFIED for d in deltas[:-1])
    assert deltas[-1].finish_reason == pb.FINISH_REASON_LENGTH == unary.finish_reason
    assert deltas[-1].usage.completion_tokens == 5 == unary.usage.completion_tokens
    assert not any(d.HasField("usage") for d in deltas[:-1])




@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": None}, "input"),
        ({"prompt": None, "prompt_token_ids": [1, 999]}, "prompt_token_ids.ids[1]"),
        ({"prompt": "x", "temperature": math.nan}, "sampling.temperature"),
        ({"prompt": "x", "temperature": -1.0}, "sampling.temperature"),
        ({"prompt": "x", "top_p": 0.0}, "sampling.top_p"),
        ({"prompt": "x", "top_k": 0}, "sampling.top_k"),
        ({"prompt": "x", "max_tokens": 0}, "sampling.max_tokens"),
        ({"prompt": "x", "max_tokens": 10_000}, "sampling.max_tokens"),
        ({"prompt": "x", "presence_penalty": 3.0}, "sampling.presence_penalty"),
        ({"prompt": "x", "repetition_penalty": 0.0}, "sampling.repetition_penalty"),
        ({"prompt": "x", "logprobs": 1000}, "sampling.logprobs"),
        ({"prompt": "x", "stop": [""]}, "sampling.stop[0]"),
        ({"prompt": "x", "stop_token_ids": [500]}, "sampling.stop_token_ids[0]"),
        ({"prompt": "x", "json_schema": "{not json"}, "structured_output.json_schema"),
        ({"prompt": "x" * 100}, "prompt"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    client: AsyncClient, kwargs: dict, field: str
) -> None:
    kwargs = dict(kwargs)  # the parameter is shared by both transports' runs
    prompt = kwargs.pop("prompt")
    for call in (client.generate, _drain_stream(client)):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(prompt, **kwargs)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (e.value.details() or "")
        assert detail(e.value, error_details_pb2.BadRequest).field_violations[0].field == field


def _drain_stream(client: AsyncClient):  # type: ignore[no-untyped-def]
    async def call(prompt, **kw):  # type: ignore[no-untyped-def]
        return [d async for d in client.stream(prompt, **kw)]

    return call


async def test_prompt_too_long_carries_limit_and_actual(client: AsyncClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.generate("y" * 80)
    info = detail(e.value, error_details_pb2.ErrorInfo)
    assert info.reason == "PROMPT_TOO_LONG"
    assert info.metadata["limit"] == "63" and info.metadata["actual"] == "80"


async def test_unknown_errors_are_internal_and_generic(fake: FakeServer, client: AsyncClient) -> None:
    fake.engine.fail_with = RuntimeError("secret internals /etc/passwd")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.generate("hi")
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (e.value.details() or "")
    assert fake.metric("grpc_server_handled_total", {
        "grpc_type": "unary", "grpc_service": "llmgrpc.v1.LLMService",
        "grpc_method": "Generate", "grpc_code": "INTERNAL"}) == 1  # fmt: skip


async def test_client_cancel_aborts_the_engine_request(fake: FakeServer) -> None:
    fake.engine.step_delay = 0.05
    async with AsyncClient(fake.target) as c:
        stream = c.stream("hello", max_tokens=60, request_id="cancel-me")
        async for _ in stream:
            break
        await stream.aclose()
    for _ in range(100):
        if "cancel-me" in fake.engine.aborted:
            break
        await asyncio.sleep(0.02)
    assert "cancel-me" in fake.engine.aborted
    assert not fake.engine.running
    assert fake.metric("llmgrpc_requests_cancelled_total",
                       {"model_name": "fake", "grpc_method": "GenerateStream"}) == 1  # fmt: skip
    assert fake.metric("llmgrpc_active_streams", {"model_name": "fake"}) == 0


async def test_deadline_aborts_and_is_counted(fake: FakeServer) -> None:
    fake.engine.step_delay = 0.05
    async with AsyncClient(fake.target) as c:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await c.generate("hello", max_tokens=60, request_id="slow", timeout=0.3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):
        if "slow" in fake.engine.aborted:
            break
        await asyncio.sleep(0.02)
    assert "slow" in fake.engine.aborted
    assert fake.metric("llmgrpc_requests_deadline_exceeded_total",
                       {"model_name": "fake", "grpc_method": "Generate"}) == 1  # fmt: skip


async def test_every_expired_deadline_is_counted_as_one(fake: FakeServer) -> None:
    # The client's deadline timer fires first and cancels the call a moment
    # before the server's own: that is still a deadline, not a cancellation.
    fake.engine.step_delay = 0.05
    calls = 10
    async with AsyncClient(fake.target) as c:

        async def late(i: int) -> grpc.StatusCode:
            try:
                await c.generate("hello", max_tokens=60, request_id=f"late-{i}", timeout=0.5)
            except grpc.aio.AioRpcError as e:
                return e.code()
            return grpc.StatusCode.OK

        codes = await asyncio.gather(*(late(i) for i in range(calls)))
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * calls
    labels = {"model_name": "fake", "grpc_method": "Generate"}
    for _ in range(100):
        if fake.metric("llmgrpc_requests_deadline_exceeded_total", labels) == calls:
            break
        await asyncio.sleep(0.02)
    assert fake.metric("llmgrpc_requests_deadline_exceeded_total", labels) == calls
    assert fake.metric("llmgrpc_requests_cancelled_total", labels) == 0


@pytest.mark.parametrize(
    ("budget", "remaining", "passed"),
    [
        (None, None, False),  # no deadline: a cancel is a cancel
        (8.0, 0.005, True),  # the client's timer fired a moment before ours
        (8.0, -0.1, True),
        (8.0, 0.7, True),
        (8.0, 3.0, False),  # cancelled well before the deadline
        (60.0, 2.0, False),  # the slack never exceeds one second
        (0.2, 0.05, False),  # nor a tenth of the call's time
        (0.2, 0.01, True),
    ],
)
def test_deadline_slack(budget: float | None, remaining: float | None, passed: bool) -> None:
    assert interceptors._deadline_passed(budget, remaining) is passed


async def test_admission_control_rejects_with_retry_info() -> None:
    srv = await start_fake(ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, max_in_flight=2))
    srv.engine.step_delay = 0.05
    try:
        async with AsyncClient(srv.target) as c:
            slow = [asyncio.create_task(c.generate("a", max_tokens=20)) for _ in range(2)]
            # Both admitted and in the engine (1 s each): the next one finds no slot.
            assert await eventually(lambda: len(srv.engine.running) == 2, 5)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.generate("b", max_tokens=1)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert details(e.value, error_details_pb2.RetryInfo)
            await asyncio.gather(*slow)
            assert (await c.generate("c", max_tokens=1)).usage.completion_tokens == 1
    finally:
        await srv.running.server.stop(grace=0)


async def test_loading_engine_gives_unavailable_and_health_not_serving() -> None:
    srv = await start_fake(attach=False)
    try:
        async with AsyncClient(srv.target) as c:
            assert await c.health("") == "SERVING"
            assert await c.health() == "NOT_SERVING"
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.generate("x")
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await srv.running.server.stop(grace=0)


async def test_tokenize_detokenize_and_info(client: AsyncClient) -> None:
    tok = await client.tokenize("abc")
    assert len(tok.token_ids) == 3 and [o.start for o in tok.offsets] == [0, 1, 2]
    assert await client.detokenize(list(tok.token_ids))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.detokenize([100_000])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = await client.model_info()
    assert info.architecture.attention_kind == pb.ATTENTION_KIND_GQA
    assert info.architecture.gqa_group_size == 2
    assert info.kv_cache.token_capacity == 128


async def test_metrics_count_started_handled_and_messages(fake: FakeServer, client: AsyncClient) -> None:
    _ = [d async for d in client.stream("hello", max_tokens=4)]
    labels = {"grpc_type": "server_stream", "grpc_service": "llmgrpc.v1.LLMService",
              "grpc_method": "GenerateStream"}  # fmt: skip
    assert fake.metric("grpc_server_started_total", labels) == 1
    assert fake.metric("grpc_server_handled_total", {**labels, "grpc_code": "OK"}) == 1
    assert fake.metric("grpc_server_msg_sent_total", labels) == 4
    assert fake.metric("grpc_server_handling_seconds_count", labels) == 1
    assert fake.metric("llmgrpc_streamed_tokens_total", {"model_name": "fake"}) == 4


async def test_a_model_this_server_does_not_serve_is_not_found(fake: FakeServer) -> None:
    async with AsyncClient(fake.target) as c:
        for call in (
            lambda: c.generate("hi", max_tokens=1, model="llama-3-70b"),
            lambda: c.stream("hi", max_tokens=1, model="llama-3-70b").__anext__(),
            lambda: c.tokenize("hi", model="llama-3-70b"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call()
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert e.value.details() == (
                "model 'llama-3-70b' is not served here; this server serves 'fake'"
            )
        # Its served name, or no name, is this model.
        assert (await c.generate("hi", max_tokens=1, model="fake")).token_ids
        assert (await c.generate("hi", max_tokens=1)).token_ids
        assert (await c.tokenize("hi", model="fake")).token_ids
    assert not fake.engine.running
