"""--transport batched against other gRPC implementations: grpc-js (Node's
HTTP/2) and grpc-go (Go's HTTP/2 framer), both installed in .tools by `make
install`. A grpcio client of the same server is the reference for what each
call returns. Both transports run the same checks."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from llmgrpc import AsyncClient
from llmgrpc.v1 import llm_service_pb2 as pb
from llmgrpc.v1 import llm_service_pb2_grpc as pb_grpc
from llmgrpc_server.config import ServerConfig

from tests.fake_server import FakeServer, start_fake
from tests.fakes import FakeEngine
from tests.ports import free_port
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "tests" / "interop" / "grpc_js_client.js"
GRPC_JS = ROOT / ".tools" / "node_modules" / "@grpc" / "grpc-js"
GRPC_GO = ROOT / ".tools" / "grpc-go-client"  # built from tests/interop/grpc_go_client.go
NGINX = ROOT / ".tools" / "nginx" / "usr" / "sbin" / "nginx"  # Debian's nginx, unpacked
SERVICE = "/llmgrpc.v1.LLMService/"
CANCELLED, INVALID_ARGUMENT, DEADLINE_EXCEEDED = 1, 3, 4
BIG = "".join(chr(32 + i % 90) for i in range(120_000))  # 120,000 token ids back


async def _grpc_js(target: str) -> dict[str, Any]:
    node = shutil.which("node")
    assert node is not None, "node is installed with npm (README, make install)"
    assert GRPC_JS.is_dir(), "grpc-js is installed in .tools by make install"
    result: dict[str, Any] = json.loads(await _run(node, str(CLIENT), target, str(ROOT / "proto")))
    return result


async def _run(*cmd: str, stdin: bytes | None = None) -> bytes:
    """A client program's output; it must exit 0 within 2 minutes."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin), 120)
    assert proc.returncode == 0, err.decode()
    return out


@pytest.mark.parametrize("transport", ["batched", "grpcio"])
async def test_grpc_js_gets_what_grpcio_gets(transport: str) -> None:
    srv = await start_fake(ServerConfig(host="127.0.0.1", port=0, metrics_port=-1,
                                        transport=transport))  # fmt: skip
    try:
        js = await _grpc_js(srv.target)
        async with AsyncClient(srv.target) as py:
            tokenized = await py.tokenize("hello world")
            reference = [d async for d in py.stream("hi", max_tokens=12)]
            reference_16 = [[t for d in [x async for x in py.stream(f"p{i}", max_tokens=40)]
                             for t in d.token_ids] for i in range(16)]  # fmt: skip
    finally:
        await srv.running.server.stop(grace=0)
    assert js["tokenize"]["code"] == 0
    assert js["tokenize"]["response"]["token_ids"] == list(tokenized.token_ids)
    stream = js["stream"]
    assert stream["code"] == 0
    assert stream["tokens"] == [t for d in reference for t in d.token_ids]
    assert stream["text"] == "".join(d.text for d in reference)
    assert stream["initial"]["x-request-id"] == "js-1"
    assert [s["code"] for s in js["concurrent"]] == [0] * 16
    assert [s["tokens"] for s in js["concurrent"]] == reference_16
    assert js["invalid"]["code"] == INVALID_ARGUMENT
    assert "temperature" in js["invalid"]["details"]


async def _grpc_go(target: str, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    assert GRPC_GO.is_file(), "the grpc-go client is built by make install"
    for c in calls:
        c["request"] = base64.b64encode(c["request"].SerializeToString()).decode()
    spec = json.dumps({"target": target, "calls": calls}).encode()
    results: list[dict[str, Any]] = json.loads(await _run(str(GRPC_GO), stdin=spec))
    for r in results:
        r["responses"] = [base64.b64decode(b) for b in r["responses"]]
    return results


async def _slow_fake(transport: str) -> tuple[FakeServer, FakeEngine]:
    """10 ms a token: a stream to cancel is still running when the client has
    its third message."""
    engine = FakeEngine(step_delay=0.01, max_model_len=4096)
    srv = await start_fake(ServerConfig(host="127.0.0.1", port=0, metrics_port=-1,
                                        transport=transport), engine=engine)  # fmt: skip
    return srv, engine


def _tokens(responses: list[bytes]) -> list[int]:
    return [t for b in responses for t in pb.GenerateResponse.FromString(b).token_ids]


@pytest.mark.parametrize("transport", ["batched", "grpcio"])
async def test_grpc_go_gets_what_grpcio_gets(transport: str) -> None:
    """All calls at once on one connection: unary, streams with metadata,
    16 streams side by side, a response larger than the client's first
    flow-control window (64 KiB), a refused request, a stream the client
    cancels (RST_STREAM) and one whose deadline passes while the others go
    on, and a health check."""
    srv, engine = await _slow_fake(transport)
    calls: list[dict[str, Any]] = [
        {"method": SERVICE + "Tokenize", "request": pb.TokenizeRequest(text="hello world")},
        {"method": SERVICE + "GenerateStream", "stream": True, "metadata": {"x-request-id": "go-1"},
         "request": pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=12))},
        {"method": SERVICE + "Tokenize", "request": pb.TokenizeRequest(text=BIG)},
        {"method": SERVICE + "Generate",
         "request": pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(temperature=-1))},
        {"method": SERVICE + "GenerateStream", "stream": True, "cancel_after": 3,
         "request": pb.GenerateRequest(prompt="c", sampling=pb.SamplingParams(max_tokens=2000))},
        {"method": SERVICE + "GenerateStream", "stream": True, "timeout_ms": 300,
         "request": pb.GenerateRequest(prompt="d", sampling=pb.SamplingParams(max_tokens=2000))},
        # What kubelet's gRPC probe (grpc-go) asks.
        {"method": "/grpc.health.v1.Health/Check",
         "request": health_pb2.HealthCheckRequest(service="llmgrpc.v1.LLMService")},
    ] + [
        {"method": SERVICE + "GenerateStream", "stream": True,
         "request": pb.GenerateRequest(prompt=f"p{i}", sampling=pb.SamplingParams(max_tokens=40))}
        for i in range(16)
    ]  # fmt: skip
    try:
        go = await _grpc_go(srv.target, calls)
        # The cancelled stream's and the expired one's engine requests end.
        assert await eventually(lambda: len(engine.aborted) == 2)
        async with AsyncClient(srv.target) as py:

            async def tokens(prompt: str, max_tokens: int) -> list[int]:
                return [t async for d in py.stream(prompt, max_tokens=max_tokens)
                        for t in d.token_ids]  # fmt: skip

            tokenized = await py.tokenize("hello world")
            reference = await tokens("hi", 12)
            tokenized_big = await py.tokenize(BIG)
            reference_16 = await asyncio.gather(*(tokens(f"p{i}", 40) for i in range(16)))
    finally:
        await srv.running.server.stop(grace=0)
    tokenize, stream, tokenize_big, invalid, cancelled, expired, health, *concurrent = go
    assert tokenize["code"] == 0
    assert pb.TokenizeResponse.FromString(tokenize["responses"][0]).token_ids == tokenized.token_ids
    assert stream["code"] == 0
    assert _tokens(stream["responses"]) == reference
    assert stream["header"]["x-request-id"] == ["go-1"]
    assert tokenize_big["code"] == 0
    assert len(tokenize_big["responses"][0]) > 100_000
    assert pb.TokenizeResponse.FromString(tokenize_big["responses"][0]) == tokenized_big
    assert invalid["code"] == INVALID_ARGUMENT
    assert "temperature" in invalid["details"]
    assert cancelled["code"] == CANCELLED
    assert len(cancelled["responses"]) == 3
    assert expired["code"] == DEADLINE_EXCEEDED  # grpc-go's grpc-timeout, parsed
    assert 0 < len(expired["responses"]) < 2000
    assert health["code"] == 0
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health_pb2.HealthCheckResponse.FromString(health["responses"][0]).status == serving
    assert [c["code"] for c in concurrent] == [0] * 16
    assert [_tokens(c["responses"]) for c in concurrent] == list(reference_16)


NGINX_CONF = """
daemon off; master_process off; worker_processes 1;
pid {tmp}/nginx.pid; error_log {tmp}/error.log info;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  server {{
    listen 127.0.0.1:{port} http2;
    location / {{ grpc_pass grpc://{backend}; }}
  }}
}}
"""


@pytest.mark.parametrize("transport", ["batched", "grpcio"])
async def test_through_nginx_grpc_pass(transport: str, tmp_path: Path) -> None:
    """nginx's grpc_pass (its own HTTP/2 client, as in ingress-nginx with
    backend-protocol GRPC) in front of the server: the answers, metadata,
    statuses, a large response and a cancellation reach the client as they
    do without it."""
    assert NGINX.is_file(), "nginx is unpacked into .tools by make install"
    srv, engine = await _slow_fake(transport)
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp_path, port=port, backend=srv.target))
    proxy = await asyncio.create_subprocess_exec(
        str(NGINX), "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log"),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            stub = pb_grpc.LLMServiceStub(channel)
            call = stub.GenerateStream(
                pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=12)),
                metadata=(("x-request-id", "nginx-1"),))  # fmt: skip
            streamed = [t async for m in call for t in m.token_ids]
            initial = dict(await call.initial_metadata())
            tokenized = await stub.Tokenize(pb.TokenizeRequest(text=BIG))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(pb.GenerateRequest(
                    prompt="hi", sampling=pb.SamplingParams(temperature=-1)))  # fmt: skip
            cancelled = stub.GenerateStream(
                pb.GenerateRequest(prompt="c", sampling=pb.SamplingParams(max_tokens=2000)))
            for _ in range(3):
                await cancelled.read()
            cancelled.cancel()
            # nginx resets its stream to the server: the engine request ends.
            assert await eventually(lambda: len(engine.aborted) == 1)
        async with AsyncClient(srv.target) as py:
            reference = [t async for d in py.stream("hi", max_tokens=12) for t in d.token_ids]
            reference_big = await py.tokenize(BIG)
    finally:
        proxy.terminate()
        await proxy.wait()
        await srv.running.server.stop(grace=0)
    assert streamed == reference
    assert initial["x-request-id"] == "nginx-1"
    assert tokenized == reference_big
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in (refused.value.details() or "")
