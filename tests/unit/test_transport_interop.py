"""--transport batched against a second gRPC implementation: grpc-js, Node's
HTTP/2 (installed in .tools by `make install`). A grpcio client of the same
server is the reference for what each call returns."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from llmgrpc import AsyncClient
from llmgrpc_server.config import ServerConfig

from tests.fake_server import start_fake

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "tests" / "interop" / "grpc_js_client.js"
GRPC_JS = ROOT / ".tools" / "node_modules" / "@grpc" / "grpc-js"
INVALID_ARGUMENT = 3


async def _grpc_js(target: str) -> dict[str, Any]:
    node = shutil.which("node")
    assert node is not None, "node is installed with npm (README, make install)"
    assert GRPC_JS.is_dir(), "grpc-js is installed in .tools by make install"
    proc = await asyncio.create_subprocess_exec(
        node, str(CLIENT), target, str(ROOT / "proto"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


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
