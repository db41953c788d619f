"""scripts/probe_batched_transport.py answers a grpcio client as grpc would:
its figures in docs/benchmarks.md count only if every message arrives, in
order, and every call ends with the status it should. No engine: a servicer
stands in for llmgrpc's."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from llmgrpc.v1 import llm_service_pb2 as pb
from llmgrpc.v1 import llm_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
# Over grpc's default 64 KiB stream and connection windows, so that the probe
# must wait for the client's WINDOW_UPDATEs.
MESSAGES, TEXT = 200, "x" * 1000


def _probe() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "probe_batched_transport", ROOT / "scripts" / "probe_batched_transport.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


class FakeServicer:
    async def GenerateStream(self, request: pb.GenerateRequest, context: Any
                             ) -> AsyncIterator[pb.GenerateResponse]:  # fmt: skip
        if request.prompt == "fail":
            raise RuntimeError("engine trouble")
        for i in range(MESSAGES):
            yield pb.GenerateResponse(text=f"{request.prompt}:{i}:{TEXT}", token_ids=[i])
            if i % 10 == 0:
                await asyncio.sleep(0)

    async def Tokenize(self, request: pb.TokenizeRequest, context: Any) -> pb.TokenizeResponse:
        return pb.TokenizeResponse(token_ids=[len(request.text)])


@pytest.fixture(params=[True, False], ids=["batched", "write-per-message"])
async def stub(request: pytest.FixtureRequest) -> AsyncIterator[pb_grpc.LLMServiceStub]:
    probe = _probe()
    servicer = FakeServicer()
    server = await asyncio.get_running_loop().create_server(
        lambda: probe.Connection(servicer, batched=request.param), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.LLMServiceStub(channel)
    server.close()


async def _stream(stub: pb_grpc.LLMServiceStub, prompt: str) -> list[pb.GenerateResponse]:
    return [m async for m in stub.GenerateStream(pb.GenerateRequest(prompt=prompt), timeout=30)]


async def test_concurrent_streams_arrive_whole_and_in_order(stub: pb_grpc.LLMServiceStub) -> None:
    prompts = [f"p{i}" for i in range(32)]
    results = await asyncio.gather(*(_stream(stub, p) for p in prompts))
    for prompt, messages in zip(prompts, results, strict=True):
        assert [m.token_ids[0] for m in messages] == list(range(MESSAGES))
        assert all(m.text.startswith(f"{prompt}:") for m in messages)


async def test_unary_call(stub: pb_grpc.LLMServiceStub) -> None:
    resp = await stub.Tokenize(pb.TokenizeRequest(text="hello"), timeout=30)
    assert list(resp.token_ids) == [5]


async def test_a_failure_is_a_status_not_a_short_stream(stub: pb_grpc.LLMServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _stream(stub, "fail")
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert "engine trouble" in (e.value.details() or "")


async def test_other_methods_are_unimplemented(stub: pb_grpc.LLMServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
