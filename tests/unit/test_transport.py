"""llmgrpc's own transport (server/llmgrpc_server/transport) against stock
grpcio clients: what grpcio's server does, it must do as well. No engine: the
servicers here stand in for llmgrpc's (tests/unit/test_serve.py runs the
whole server on it)."""

from __future__ import annotations

import asyncio
import gzip
import socket
import zlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from llmgrpc.v1 import llm_service_pb2 as pb
from llmgrpc.v1 import llm_service_pb2_grpc as pb_grpc
from llmgrpc_server.transport import wire
from llmgrpc_server.transport.server import Server, shared_port_socket

MESSAGES, TEXT = 200, "x" * 1000  # past grpc's 64 KiB windows: flow control is exercised
MAX_MESSAGE = 4096


class Servicer(pb_grpc.LLMServiceServicer):
    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.metadata: dict[str, Any] = {}
        self.release = asyncio.Event()  # lets a "gated" stream go on past its first message
        self.port = 0  # the server's, set by the fixture

    async def GenerateStream(self, request: pb.GenerateRequest, context: Any
                             ) -> AsyncIterator[pb.GenerateResponse]:  # fmt: skip
        self.metadata = dict(context.invocation_metadata())
        if request.prompt == "forever":
            self.started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if request.prompt == "rich error":
            status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="too busy")
            await context.abort_with_status(rpc_status.to_status(status))
        await context.send_initial_metadata((("x-request-id", "r-1"),))
        for i in range(MESSAGES if request.prompt != "short" else 3):
            yield pb.GenerateResponse(text=f"{request.prompt}:{i}:{TEXT}", token_ids=[i])
            if request.prompt == "gated" and i == 0:
                await self.release.wait()
            if i % 10 == 0:
                await asyncio.sleep(0)

    async def Tokenize(self, request: pb.TokenizeRequest, context: Any) -> pb.TokenizeResponse:
        if request.text == "boom":
            raise RuntimeError("a bug")
        if request.text == "stubborn":  # answers even after the client went away
            self.started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
        return pb.TokenizeResponse(token_ids=[len(request.text)])


@pytest.fixture
async def served() -> AsyncIterator[tuple[Server, Servicer, grpc.aio.Channel]]:
    server = Server(max_message_bytes=MAX_MESSAGE)
    servicer = Servicer()
    pb_grpc.add_LLMServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["LLMService"].full_name, reflection.SERVICE_NAME), server
    )
    port = servicer.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield server, servicer, channel
    await server.stop(None)


async def _stream(
    stub: pb_grpc.LLMServiceStub, prompt: str, **kw: Any
) -> list[pb.GenerateResponse]:
    return [m async for m in stub.GenerateStream(pb.GenerateRequest(prompt=prompt), **kw)]


async def test_concurrent_streams_arrive_whole_and_in_order(served: Any) -> None:
    _, _, channel = served
    stub = pb_grpc.LLMServiceStub(channel)
    prompts = [f"p{i}" for i in range(32)]
    results = await asyncio.gather(*(_stream(stub, p, timeout=60) for p in prompts))
    for prompt, messages in zip(prompts, results, strict=True):
        assert [m.token_ids[0] for m in messages] == list(range(MESSAGES))
        assert all(m.text.startswith(f"{prompt}:") for m in messages)


async def test_metadata_both_ways(served: Any) -> None:
    _, servicer, channel = served
    call = pb_grpc.LLMServiceStub(channel).GenerateStream(
        pb.GenerateRequest(prompt="short"),
        metadata=(("authorization", "Bearer t"), ("trace-bin", b"\x00\x01\xff")),
    )
    assert len([m async for m in call]) == 3
    assert ("x-request-id", "r-1") in tuple(await call.initial_metadata())
    assert servicer.metadata["authorization"] == "Bearer t"
    assert servicer.metadata["trace-bin"] == b"\x00\x01\xff"


async def test_unary_and_an_unexpected_error(served: Any) -> None:
    _, _, channel = served
    stub = pb_grpc.LLMServiceStub(channel)
    assert list((await stub.Tokenize(pb.TokenizeRequest(text="hello"))).token_ids) == [5]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Tokenize(pb.TokenizeRequest(text="boom"))
    assert e.value.code() == grpc.StatusCode.UNKNOWN
    assert "a bug" in (e.value.details() or "")


async def test_rich_status_reaches_the_client(served: Any) -> None:
    _, _, channel = served
    call = pb_grpc.LLMServiceStub(channel).GenerateStream(pb.GenerateRequest(prompt="rich error"))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        [m async for m in call]
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert e.value.details() == "too busy"
    status = rpc_status.from_call(e.value)  # type: ignore[arg-type]
    assert status is not None and status.message == "too busy"


async def test_client_cancel_cancels_the_handler(served: Any) -> None:
    _, servicer, channel = served
    call = pb_grpc.LLMServiceStub(channel).GenerateStream(pb.GenerateRequest(prompt="forever"))
    reading = asyncio.ensure_future(call.read())
    await servicer.started.wait()
    call.cancel()
    await asyncio.wait_for(servicer.cancelled.wait(), 30)
    with pytest.raises(asyncio.CancelledError):
        await reading


async def test_deadline_cancels_the_handler(served: Any) -> None:
    _, servicer, channel = served
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _stream(pb_grpc.LLMServiceStub(channel), "forever", timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(servicer.cancelled.wait(), 30)


async def test_oversized_request_and_unknown_method(served: Any) -> None:
    _, _, channel = served
    stub = pb_grpc.LLMServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Tokenize(pb.TokenizeRequest(text="x" * (2 * MAX_MESSAGE)))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # The connection is still good.
    assert list((await stub.Tokenize(pb.TokenizeRequest(text="ok"))).token_ids) == [2]


async def test_health_check_watch_and_reflection(served: Any) -> None:
    _, _, channel = served
    stub = health_pb2_grpc.HealthStub(channel)
    ok = health_pb2.HealthCheckResponse.SERVING
    assert (await stub.Check(health_pb2.HealthCheckRequest())).status == ok
    watch = stub.Watch(health_pb2.HealthCheckRequest())
    assert (await watch.read()).status == ok  # written with context.write()
    watch.cancel()
    info = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name async for r in info for s in r.list_services_response.service}
    assert "llmgrpc.v1.LLMService" in names


async def test_stop_lets_calls_in_flight_finish(served: Any) -> None:
    server, _, channel = served
    stub = pb_grpc.LLMServiceStub(channel)
    call = stub.GenerateStream(pb.GenerateRequest(prompt="p"))
    received = [await call.read()]
    stopping = asyncio.ensure_future(server.stop(30))
    while (message := await call.read()) is not grpc.aio.EOF:
        received.append(message)
    assert [m.token_ids[0] for m in received] == list(range(MESSAGES))
    assert await call.code() == grpc.StatusCode.OK
    await stopping
    with pytest.raises(grpc.aio.AioRpcError) as e:  # no new calls
        await stub.Tokenize(pb.TokenizeRequest(text="late"), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_an_answer_to_a_reset_stream_leaves_the_connection_alone(served: Any) -> None:
    """A handler that answers after its client reset the call (here one that
    ignores its cancellation) must not disturb the connection's other calls:
    h2 takes a send on a stream it has dropped for a new server stream, and
    that error once cancelled every call of the connection."""
    _, servicer, channel = served
    stub = pb_grpc.LLMServiceStub(channel)
    stream = stub.GenerateStream(pb.GenerateRequest(prompt="gated"))
    received = [await stream.read()]  # in flight until released
    stubborn = stub.Tokenize(pb.TokenizeRequest(text="stubborn"))
    await servicer.started.wait()
    stubborn.cancel()
    # The handler's answer is sent (or not) in the step that set `cancelled`.
    await asyncio.wait_for(servicer.cancelled.wait(), 30)
    servicer.release.set()
    while (message := await stream.read()) is not grpc.aio.EOF:
        received.append(message)
    assert [m.token_ids[0] for m in received] == list(range(MESSAGES))
    assert await stream.code() == grpc.StatusCode.OK
    assert list((await stub.Tokenize(pb.TokenizeRequest(text="after"))).token_ids) == [5]


class _RawClient:
    """An h2 client on a socket, for what a grpc client does not let a test
    choose: its flow-control windows, and when it opens them."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.data = bytearray()  # stream 1's DATA, as received
        self.trailers: dict[str, str] = {}  # and the response's headers

    @classmethod
    async def connect(cls, port: int, stream_window: int | None = None) -> _RawClient:
        """Connected, its preface queued (with `stream_window` as its streams'
        initial window), nothing sent yet."""
        client = cls(*await asyncio.open_connection("127.0.0.1", port))
        client.h2.initiate_connection()
        if stream_window is not None:
            client.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window})
        return client

    def call(self, method: str, body: bytes, *headers: tuple[str, str]) -> None:
        """Stream 1: a call of LLMService `method` whose request body is `body`,
        sent as it is, with everything queued before it."""
        self.h2.send_headers(1, [
            (":method", "POST"), (":scheme", "http"), (":authority", "x"),
            (":path", f"/llmgrpc.v1.LLMService/{method}"),
            ("content-type", "application/grpc"), ("te", "trailers"), *headers])  # fmt: skip
        self.h2.send_data(1, body, end_stream=True)
        self.send()

    def send(self) -> None:
        self.writer.write(self.h2.data_to_send())

    async def until(self, done: Any) -> None:
        """Read and take in events until `done(event)`."""
        while True:
            for event in self.h2.receive_data(await self.reader.read(65536)):
                if isinstance(event, h2.events.DataReceived):
                    self.data += event.data
                elif isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    # grpc-status: in the trailers, or a trailers-only response's headers
                    self.trailers.update(event.headers)  # type: ignore[arg-type]
                if done(event):
                    return

    async def everything_sent_so_far(self) -> None:
        """A PING's answer: all the server wrote before it has been read."""
        self.h2.ping(b"12345678")
        self.send()
        await self.until(lambda e: isinstance(e, h2.events.PingAckReceived))


@pytest.mark.parametrize("window", ["stream", "connection"])
async def test_sends_stop_at_the_clients_flow_control_window(served: Any, window: str) -> None:
    """The server sends no byte past a window the client opened (the stream's
    or the connection's), and goes on when the client opens it further."""
    _, servicer, _ = served
    client = await _RawClient.connect(servicer.port, 100 if window == "stream" else 1 << 20)
    prompt = "short" if window == "stream" else "long"
    request = pb.GenerateRequest(prompt=prompt).SerializeToString()
    client.call("GenerateStream", wire.frame_message(request))
    limit = 100 if window == "stream" else 65_535  # the connection's: HTTP/2's default
    await client.until(lambda _: len(client.data) >= limit)
    await client.everything_sent_so_far()
    assert len(client.data) == limit
    if window == "stream":
        client.h2.increment_flow_control_window(1 << 20, stream_id=1)
    else:
        client.h2.increment_flow_control_window(1 << 24)
    client.send()
    await client.until(lambda e: isinstance(e, h2.events.StreamEnded))
    client.writer.close()
    messages = wire.MessageReader(1 << 20).feed(bytes(client.data))
    count = 3 if window == "stream" else MESSAGES
    assert [pb.GenerateResponse.FromString(m).token_ids[0] for m in messages] == list(range(count))
    assert client.trailers["grpc-status"] == "0"


async def _raw_tokenize(port: int, encoding: str, body: bytes) -> tuple[bytes, dict[str, str]]:
    """One Tokenize call whose request body is `body`, sent as it is."""
    client = await _RawClient.connect(port)
    client.call("Tokenize", body, ("grpc-encoding", encoding))
    await client.until(lambda e: isinstance(e, h2.events.StreamEnded))
    client.writer.close()
    return bytes(client.data), client.trailers


async def test_compressed_requests_gzip_and_deflate(served: Any) -> None:
    """Requests compressed as grpcio's clients compress them are taken (as
    grpcio's server takes them); one that would inflate past the message cap
    is refused before it does; an unknown encoding is UNIMPLEMENTED."""
    _, servicer, channel = served
    stub = pb_grpc.LLMServiceStub(channel)
    text = "y" * 3000
    for compression in (grpc.Compression.Gzip, grpc.Compression.Deflate):
        response = await stub.Tokenize(pb.TokenizeRequest(text=text), compression=compression)
        assert list(response.token_ids) == [3000]
    request = pb.TokenizeRequest(text=text).SerializeToString()
    for encoding, packed in (("gzip", gzip.compress(request)), ("deflate", zlib.compress(request))):
        body = wire.PREFIX.pack(1, len(packed)) + packed
        data, trailers = await _raw_tokenize(servicer.port, encoding, body)
        assert trailers["grpc-status"] == "0"
        (message,) = wire.MessageReader(MAX_MESSAGE).feed(data)
        assert list(pb.TokenizeResponse.FromString(message).token_ids) == [3000]
    bomb = gzip.compress(pb.TokenizeRequest(text="z" * 1_000_000).SerializeToString())
    assert len(bomb) < MAX_MESSAGE
    _, trailers = await _raw_tokenize(servicer.port, "gzip", wire.PREFIX.pack(1, len(bomb)) + bomb)
    assert trailers["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    _, trailers = await _raw_tokenize(servicer.port, "br", wire.PREFIX.pack(0, len(request)) + request)
    assert trailers["grpc-status"] == str(grpc.StatusCode.UNIMPLEMENTED.value[0])
    data, trailers = await _raw_tokenize(servicer.port, "identity",
                                         wire.PREFIX.pack(1, len(request)) + request)  # fmt: skip
    assert trailers["grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0])


def test_shared_port_sockets_share_a_port_on_both_families() -> None:
    """What --api-server-count's front ends bind: one port, several sockets
    (SO_REUSEPORT); "::" takes IPv4 clients too."""
    first = shared_port_socket("[::]", 0)
    port = first.getsockname()[1]
    second = shared_port_socket("::", port)
    v4 = shared_port_socket("127.0.0.1", 0)
    try:
        assert second.getsockname()[1] == port
        assert v4.family == socket.AF_INET
        second.listen(1)
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            accepted, _ = second.accept()
            accepted.close()
    finally:
        for s in (first, second, v4):
            s.close()
