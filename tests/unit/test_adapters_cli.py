"""`llmgrpc adapters`, `llmgrpc info` and `--model` as a user runs them: the CLI in a
subprocess against a small in-test server with canned AdminService and LLMService
answers (it records every request and its metadata), and against the fake-engine
server where the real servicer's answer is the point (no AdminService there)."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from llmgrpc.v1 import admin_service_pb2 as admin_pb
from llmgrpc.v1 import admin_service_pb2_grpc as admin_grpc
from llmgrpc.v1 import llm_service_pb2 as pb
from llmgrpc.v1 import llm_service_pb2_grpc as pb_grpc

from tests.fake_server import start_fake

DEADLINE_S = 10.0  # for one CLI run; each takes about a second
ADMIN_TOKEN = "admin-secret"
SERVING_TOKEN = "serving-secret"
BASE = "tiny-llama-gqa"
ADAPTERS = [
    pb.Adapter(name=f"{BASE}-lora-a", base_model=BASE, rank=8,
               target_modules=["q_proj", "v_proj"], loaded=True, source="startup"),
    pb.Adapter(name="support-v3", base_model=BASE, rank=16,
               target_modules=["o_proj"], loaded=False, source="admin"),
]  # fmt: skip


@dataclass
class Call:
    method: str
    request: Message
    metadata: dict[str, str]


@dataclass
class Canned:
    """What the canned server was asked, in order."""

    target: str = ""
    calls: list[Call] = field(default_factory=list)

    def record(self, method: str, request: Message, context: grpc.aio.ServicerContext) -> None:
        metadata = {k: str(v) for k, v in context.invocation_metadata() or ()}
        self.calls.append(Call(method, request, metadata))


class CannedAdmin(admin_grpc.AdminServiceServicer):
    """AdminService as the server documents it, on canned data: ADMIN_TOKEN only."""

    def __init__(self, canned: Canned) -> None:
        self.canned = canned

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        header = dict(context.invocation_metadata() or ()).get("authorization")
        if header == f"Bearer {SERVING_TOKEN}":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "a serving token cannot call AdminService; use an admin token")  # fmt: skip
        if header != f"Bearer {ADMIN_TOKEN}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    async def LoadAdapter(self, request, context):  # type: ignore[no-untyped-def]
        self.canned.record("LoadAdapter", request, context)
        await self._authorize(context)
        if request.name == "taken":
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                "adapter 'taken' is loaded from another path")  # fmt: skip
        known = {a.name: a for a in ADAPTERS}
        adapter = pb.Adapter(name=request.name, base_model=BASE, rank=4,
                             target_modules=["q_proj"], loaded=True, source="admin")  # fmt: skip
        return admin_pb.LoadAdapterResponse(adapter=known.get(request.name, adapter),
                                            already_loaded=request.name in known)  # fmt: skip

    async def UnloadAdapter(self, request, context):  # type: ignore[no-untyped-def]
        self.canned.record("UnloadAdapter", request, context)
        await self._authorize(context)
        if request.name not in {a.name for a in ADAPTERS}:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no adapter {request.name!r} is loaded")
        return admin_pb.UnloadAdapterResponse()

    async def ListAdapters(self, request, context):  # type: ignore[no-untyped-def]
        self.canned.record("ListAdapters", request, context)
        await self._authorize(context)
        return admin_pb.ListAdaptersResponse(adapters=ADAPTERS)


class CannedLLM(pb_grpc.LLMServiceServicer):
    """The LLMService calls the CLI makes, with canned answers."""

    def __init__(self, canned: Canned) -> None:
        self.canned = canned

    async def GetModelInfo(self, request, context):  # type: ignore[no-untyped-def]
        self.canned.record("GetModelInfo", request, context)
        return pb.GetModelInfoResponse(
            model_name=BASE, max_model_len=2048, capabilities=pb.Capabilities(chat_template=True),
            lora=pb.LoraSupport(enabled=True, max_loras=2, max_lora_rank=16, max_cpu_loras=4),
            adapters=ADAPTERS,
        )  # fmt: skip

    async def Generate(self, request, context):  # type: ignore[no-untyped-def]
        self.canned.record("Generate", request, context)
        return pb.GenerateResponse(text="canned answer")

    async def GenerateStream(self, request, context):  # type: ignore[no-untyped-def]
        self.canned.record("GenerateStream", request, context)
        yield pb.GenerateResponse(text="canned ")
        yield pb.GenerateResponse(text="answer", finish_reason=pb.FINISH_REASON_STOP)

    async def Tokenize(self, request, context):  # type: ignore[no-untyped-def]
        self.canned.record("Tokenize", request, context)
        return pb.TokenizeResponse(token_ids=[1], tokens=["hi"], offsets=[pb.Offset(start=0, end=2)],
                                   text="hi", max_model_len=2048)  # fmt: skip


@pytest.fixture
async def canned() -> AsyncIterator[Canned]:
    result = Canned()
    server = grpc.aio.server()
    admin_grpc.add_AdminServiceServicer_to_server(CannedAdmin(result), server)
    pb_grpc.add_LLMServiceServicer_to_server(CannedLLM(result), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    result.target = f"127.0.0.1:{port}"
    yield result
    await server.stop(grace=0)


@pytest.fixture
def admin_token(tmp_path: Path) -> Path:
    path = tmp_path / "admin.token"
    path.write_text(f"\n{ADMIN_TOKEN}\n")  # the first non-empty line, as in a server's file
    return path


async def llmgrpc(*args: str, stdin: str = "") -> tuple[int, str, str]:
    """Run the `llmgrpc` CLI; its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmgrpc.cli", *args, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), DEADLINE_S)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# --- llmgrpc adapters ---------------------------------------------------------


async def test_load_sends_name_and_path_with_the_admin_token(canned: Canned, admin_token: Path
                                                             ) -> None:  # fmt: skip
    code, out, err = await llmgrpc("adapters", "load", "fresh", "team/fresh-v1",
                                   "--target", canned.target, "--token-file", str(admin_token))  # fmt: skip
    assert code == 0, err
    assert out == "loaded: fresh: rank 4, targets q_proj, loaded yes, source admin\n"
    [call] = canned.calls
    assert call.method == "LoadAdapter"
    assert call.request == admin_pb.LoadAdapterRequest(name="fresh", path="team/fresh-v1")
    assert call.metadata["authorization"] == f"Bearer {ADMIN_TOKEN}"


async def test_loading_an_adapter_already_loaded_says_nothing_changed(
    canned: Canned, admin_token: Path
) -> None:
    code, out, err = await llmgrpc("adapters", "load", "support-v3", "support/v3",
                                   "--target", canned.target, "--token-file", str(admin_token))  # fmt: skip
    assert code == 0, err
    assert out.startswith("already loaded (nothing changed): support-v3: rank 16")


async def test_unload_sends_the_name(canned: Canned, admin_token: Path) -> None:
    code, out, err = await llmgrpc("adapters", "unload", "support-v3",
                                   "--target", canned.target, "--token-file", str(admin_token))  # fmt: skip
    assert code == 0, err
    assert out == "unloaded: support-v3\n"
    [call] = canned.calls
    assert call.request == admin_pb.UnloadAdapterRequest(name="support-v3")
    assert call.metadata["authorization"] == f"Bearer {ADMIN_TOKEN}"


async def test_list_prints_one_line_per_adapter_or_json(canned: Canned, admin_token: Path
                                                        ) -> None:  # fmt: skip
    connection = ("--target", canned.target, "--token-file", str(admin_token))
    code, out, err = await llmgrpc("adapters", "list", *connection)
    assert code == 0, err
    assert out.splitlines() == [
        f"{BASE}-lora-a: rank 8, targets q_proj, v_proj, loaded yes, source startup",
        "support-v3: rank 16, targets o_proj, loaded no, source admin",
    ]
    code, out, err = await llmgrpc("adapters", "list", "--json", *connection)
    assert code == 0, err
    assert [a["name"] for a in json.loads(out)["adapters"]] == [a.name for a in ADAPTERS]
    assert {c.method for c in canned.calls} == {"ListAdapters"}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("unload", "nope"), "llmgrpc: NOT_FOUND: no adapter 'nope' is loaded"),
        (("load", "taken", "elsewhere"),
         "llmgrpc: ALREADY_EXISTS: adapter 'taken' is loaded from another path"),
    ],
)  # fmt: skip
async def test_errors_print_the_code_and_details_and_exit_1(
    canned: Canned, admin_token: Path, argv: tuple[str, ...], expected: str
) -> None:
    code, out, err = await llmgrpc("adapters", *argv,
                                   "--target", canned.target, "--token-file", str(admin_token))  # fmt: skip
    assert (code, out, err.strip()) == (1, "", expected)


async def test_without_an_admin_token_the_call_is_refused(canned: Canned, tmp_path: Path) -> None:
    code, _, err = await llmgrpc("adapters", "list", "--target", canned.target)
    assert code == 1
    assert err.startswith("llmgrpc: UNAUTHENTICATED: ")
    assert "authorization" not in canned.calls[-1].metadata

    serving = tmp_path / "serving.token"
    serving.write_text(SERVING_TOKEN)
    code, _, err = await llmgrpc("adapters", "list", "--target", canned.target,
                                 "--token-file", str(serving))  # fmt: skip
    assert code == 1
    assert err.startswith("llmgrpc: PERMISSION_DENIED: ")
    assert canned.calls[-1].metadata["authorization"] == f"Bearer {SERVING_TOKEN}"


async def test_a_server_without_lora_or_admin_service(admin_token: Path) -> None:
    fake = await start_fake()  # the real servicer; no --admin-token-file: no AdminService
    try:
        listed = await llmgrpc("adapters", "list", "--target", fake.target,
                               "--token-file", str(admin_token))  # fmt: skip
        info = await llmgrpc("info", "--target", fake.target)
    finally:
        await fake.running.server.stop(grace=0)
    code, _, err = listed
    assert code == 1
    assert err.startswith("llmgrpc: UNIMPLEMENTED: ")
    code, out, err = info
    assert code == 0, err
    assert re.search(r"^lora +disabled$", out, re.M)
    assert not re.search(r"^adapter ", out, re.M)


# --- info and --model ---------------------------------------------------------


async def test_info_prints_the_lora_settings_and_each_adapter(canned: Canned) -> None:
    code, out, err = await llmgrpc("info", "--target", canned.target)
    assert code == 0, err
    # "key  value", the key padded to the longest (some keys hold a space)
    rows = [re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines()]
    assert ["lora", "enabled: max_loras 2, max_lora_rank 16, max_cpu_loras 4"] in rows
    assert [row[1] for row in rows if row[0] == "adapter"] == [
        f"{BASE}-lora-a: rank 8, targets q_proj, v_proj, loaded yes, source startup",
        "support-v3: rank 16, targets o_proj, loaded no, source admin",
    ]


@pytest.mark.parametrize(
    ("argv", "method"),
    [
        (("generate", "hi"), "Generate"),
        (("generate", "hi", "--stream"), "GenerateStream"),
        (("tokenize", "hi"), "Tokenize"),
        (("chat",), "GenerateStream"),
    ],
)
async def test_model_names_the_adapter_in_the_request(canned: Canned, argv: tuple[str, ...],
                                                      method: str) -> None:  # fmt: skip
    code, _, err = await llmgrpc(*argv, "--model", "support-v3", "--target", canned.target,
                                 stdin="hi\n")  # fmt: skip
    assert code == 0, err
    [request] = [c.request for c in canned.calls if c.method == method]
    assert isinstance(request, pb.GenerateRequest | pb.TokenizeRequest)
    assert request.model == "support-v3"


async def test_without_model_the_request_names_none(canned: Canned) -> None:
    code, _, err = await llmgrpc("generate", "hi", "--target", canned.target)
    assert code == 0, err
    [call] = canned.calls
    assert isinstance(call.request, pb.GenerateRequest)
    assert call.request.model == ""


async def test_an_unknown_model_is_not_found_from_the_real_servicer() -> None:
    fake = await start_fake()
    try:
        code, out, err = await llmgrpc("generate", "hi", "--model", "nope",
                                       "--target", fake.target)  # fmt: skip
    finally:
        await fake.running.server.stop(grace=0)
    assert (code, out) == (1, "")
    assert err.startswith("llmgrpc: NOT_FOUND: model 'nope' is not served here")
