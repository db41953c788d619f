"""AdminService: LoRA adapters added and removed while the server runs.

Registered only with --admin-token-file; its calls take only those tokens
(auth.TokenAuthInterceptor). Adapters load only from under --adapter-dir.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from llmgrpc.v1 import admin_service_pb2 as admin_pb
from llmgrpc.v1 import admin_service_pb2_grpc as admin_grpc
from llmgrpc.v1 import llm_service_pb2 as pb

from llmgrpc_server import adapters, domain
from llmgrpc_server.errors import FailedPrecondition
from llmgrpc_server.servicer import LLMServicer


def to_adapter(a: domain.AdapterInfo) -> pb.Adapter:
    return pb.Adapter(
        name=a.name, base_model=a.base_model, rank=a.rank, target_modules=list(a.target_modules),
        loaded=a.loaded, source=a.source,
    )  # fmt: skip


class AdminServicer(admin_grpc.AdminServiceServicer):
    def __init__(self, serving: LLMServicer, adapter_dir: Path | None) -> None:
        self._serving = serving  # its engine, once loaded
        self._adapter_dir = adapter_dir
        # One load per name at a time: a second concurrent load of the same
        # adapter waits, then finds it loaded.
        self._locks: dict[str, asyncio.Lock] = {}

    async def LoadAdapter(
        self, request: admin_pb.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb.LoadAdapterResponse:
        adapters.check_name(request.name)
        if self._adapter_dir is None:
            raise FailedPrecondition("the server was started without --adapter-dir")
        path = adapters.under(self._adapter_dir, request.path)
        engine = self._serving.engine
        lock = self._locks.setdefault(request.name, asyncio.Lock())
        async with lock:
            info, existing = await engine.load_adapter(request.name, path)
        return admin_pb.LoadAdapterResponse(adapter=to_adapter(info), already_loaded=existing)

    async def UnloadAdapter(
        self, request: admin_pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb.UnloadAdapterResponse:
        adapters.check_name(request.name)
        async with self._locks.setdefault(request.name, asyncio.Lock()):
            await self._serving.engine.unload_adapter(request.name)
        return admin_pb.UnloadAdapterResponse()

    async def ListAdapters(
        self, request: admin_pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb.ListAdaptersResponse:
        info = self._serving.engine.model_info()
        return admin_pb.ListAdaptersResponse(adapters=[to_adapter(a) for a in info.adapters])
