"""The gRPC servicer: decode, call the engine, encode. Nothing else.

Errors raised here or below are turned into statuses by the error
interceptor; cancellation is the engine adapter's business, so nothing here
catches CancelledError.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
from llmgrpc.v1 import llm_service_pb2 as pb
from llmgrpc.v1 import llm_service_pb2_grpc as pb_grpc

from llmgrpc_server import call_metadata, convert, domain, model_facts, policy, responses
from llmgrpc_server.admission import Admission
from llmgrpc_server.engine_api import Engine
from llmgrpc_server.errors import Unavailable
from llmgrpc_server.metrics import ServiceMetrics

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LLMService"].full_name


class LLMServicer(pb_grpc.LLMServiceServicer):
    def __init__(
        self,
        admission: Admission,
        metrics: ServiceMetrics,
        service_version: str,
    ) -> None:
        self._engine: Engine | None = None
        self._admission = admission
        self._metrics = metrics
        self._service_version = service_version

    @property
    def admission(self) -> Admission:
        return self._admission

    def attach(self, engine: Engine) -> None:
        """Start serving with `engine` (the server starts before the engine)."""
        self._engine = engine

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise Unavailable("the model is still loading; retry shortly")
        return self._engine

    async def _request(
        self, msg: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> domain.GenerationRequest:
        # Received now, before validation and admission: TTFT counts from here.
        received = time.monotonic()
        remaining = context.time_remaining()
        deadline = None if remaining is None else received + remaining
        metadata = context.invocation_metadata() or ()
        req = convert.to_generation_request(
            msg, self.engine.limits, deadline, received, metadata
        )
        # The id in use (given, from x-request-id, or generated), for proxies and logs.
        if echo := call_metadata.echo(req.request_id):
            await context.send_initial_metadata(echo)
        return req

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        req = await self._request(request, context)
        domain.check_generate_answer(req, self.engine.limits, policy.DEFAULT_MAX_TOKENS)
        async with self._admission.admit():
            deltas = [d async for d in self._counted(req, "Generate")]
        return responses.to_unary_response(deltas, req.sampling.n)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        req = await self._request(request, context)
        async with self._admission.admit():
            with self._metrics.active_stream():
                async for delta in self._counted(req, "GenerateStream"):
                    yield responses.to_generate_response(delta)

    async def _counted(
        self, req: domain.GenerationRequest, method: str
    ) -> AsyncIterator[domain.Delta]:
        # Tokens count as they leave the engine, so a cancelled or failed
        # request still reports what it produced.
        count = self._metrics.token_counter(method, req.adapter)
        async for delta in self.engine.generate(req):
            count(len(delta.token_ids))
            yield delta

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        self._metrics.tokenize_called()
        engine = self.engine
        # Adapters share the base model's tokenizer: the name is only checked.
        engine.check_model(convert.requested_adapter(request.model, engine.limits))
        text, chat, add_special = convert.to_tokenize_input(request, engine.limits)
        keep = convert.tokenize_truncation(request)
        tokenized = convert.truncate_tokenized(await engine.tokenize(text, chat, add_special), keep)
        # One message per offset: a slice per loop turn, other calls answered between.
        msg = responses.tokenize_response_head(tokenized)
        for _ in responses.add_offsets(msg, tokenized.offsets, policy.TOKENS_PER_LOOP_TURN):
            await asyncio.sleep(0)
        return msg

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        engine = self.engine
        ids = convert.to_detokenize_ids(request, engine.limits)
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        return pb.DetokenizeResponse(text=await engine.detokenize(ids, skip))

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        return model_facts.to_model_info_response(self.engine.model_info(), self._service_version)
