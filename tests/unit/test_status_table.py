"""The one status table: every error's code comes from errors.STATUS_TABLE, every
vLLM exception and finish reason the adapter can see maps to the code docs/api.md
documents, and a failed request never ends OK (streamed or unary)."""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import vllm.exceptions
import vllm.v1.engine.exceptions
from google.rpc import error_details_pb2
from llmgrpc import AsyncClient
from llmgrpc.v1 import llm_service_pb2 as pb
from llmgrpc_server import domain, errors
from llmgrpc_server.vllm_adapter import failures
from llmgrpc_server.vllm_adapter.outputs import OutputStream
from vllm import SamplingParams
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine import EngineCoreOutput, EngineCoreRequest, FinishReason
from vllm.v1.engine.output_processor import OutputProcessor, RequestOutputCollector

from tests import waiting
from tests.fake_server import FakeServer, start_fake
from tests.fakes import FakeEngine
from tests.status_details import detail

API_MD = Path(__file__).resolve().parents[2] / "docs" / "api.md"
Code = grpc.StatusCode

# Codes the server answers that no ServiceError carries: success, the client's
# own cancellation, the auth interceptor, and the fallback for unknown errors.
# Answered by gRPC or the auth interceptor, outside errors.STATUS_TABLE.
TRANSPORT_CODES = {Code.OK, Code.CANCELLED, Code.UNAUTHENTICATED, Code.PERMISSION_DENIED,
                   Code.UNIMPLEMENTED, Code.INTERNAL}

# Every exception class vLLM 0.32 defines where the adapter can see it, and the
# code it must end a call with. A class a later vLLM adds fails the walk below
# until it is decided here and documented.
VLLM_EXCEPTIONS: dict[str, Code] = {
    "VLLMError": Code.INTERNAL,
    "VLLMClientError": Code.INVALID_ARGUMENT,
    "VLLMServerError": Code.INTERNAL,
    "VLLMValidationError": Code.INVALID_ARGUMENT,
    "VLLMNotFoundError": Code.NOT_FOUND,
    "LoRAAdapterNotFoundError": Code.NOT_FOUND,
    "VLLMUnprocessableEntityError": Code.INVALID_ARGUMENT,
    "GenerationError": Code.INTERNAL,
    "RetryableRequestError": Code.UNAVAILABLE,
    "GracefulHTTPError": Code.INTERNAL,
    "QueueOverflowError": Code.RESOURCE_EXHAUSTED,
    "MaxQueuedTokensError": Code.RESOURCE_EXHAUSTED,
    "ProfilerAlreadyActiveError": Code.INTERNAL,
    "EngineGenerateError": Code.INTERNAL,
    "EngineDeadError": Code.UNAVAILABLE,
}

# Every finish reason vLLM's engine core has: what the call becomes.
FINISH: dict[FinishReason, domain.FinishReason | Code] = {
    FinishReason.STOP: domain.FinishReason.STOP,
    FinishReason.LENGTH: domain.FinishReason.LENGTH,
    FinishReason.ABORT: Code.UNAVAILABLE,  # not ours: ours is a cancellation
    FinishReason.ERROR: Code.INTERNAL,
    FinishReason.REPETITION: Code.INTERNAL,  # never asked for: unknown to us
}


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _vllm_exception_classes() -> list[type[Exception]]:
    found = []
    for module in (vllm.exceptions, vllm.v1.engine.exceptions):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Exception) and cls.__module__ == module.__name__:
                found.append(cls)
    return found


def _instance(cls: type[Exception]) -> Exception:
    """An instance of a vLLM exception, built as vLLM builds it where it can."""
    for args in ((), ("a message",), ("name", "/path"), ("a message", 503)):
        try:
            return cls(*args)
        except TypeError:
            continue
    raise AssertionError(f"cannot build {cls.__name__}")


def _code(error: BaseException) -> Code:
    code: Code = errors.to_status(error).code
    return code


def _status_section() -> str:
    text = API_MD.read_text()
    return text[text.index("## Status codes") : text.index("## Limits")]


# --- the table --------------------------------------------------------------


def test_every_service_error_reads_its_code_from_the_table() -> None:
    classes = [errors.ServiceError, *_subclasses(errors.ServiceError)]
    for cls in classes[1:]:
        assert "code" not in vars(cls), f"{cls.__name__} carries its own code"
        assert errors.status_row(cls).code in Code
    # A class without a row of its own takes its nearest ancestor's.
    assert errors.status_row(errors.PromptTooLong).code == Code.INVALID_ARGUMENT
    assert errors.PromptTooLong("prompt", 10, 20).code == Code.INVALID_ARGUMENT
    for cls, row in errors.STATUS_TABLE.items():
        assert errors.status_row(cls) is row
    with pytest.raises(LookupError):
        errors.status_row(errors.ServiceError)  # the base is never raised as is


def test_api_md_carries_the_tables_as_the_code_renders_them() -> None:
    section = _status_section()
    assert errors.render_status_table() in section, (
        "docs/api.md's error vocabulary table differs from errors.STATUS_TABLE; paste:\n"
        + errors.render_status_table()
    )
    assert failures.render_vllm_table() in section, (
        "docs/api.md's vLLM table differs from failures.VLLM_ERRORS; paste:\n"
        + failures.render_vllm_table()
    )


def test_api_md_documents_exactly_the_codes_the_server_answers() -> None:
    main = _status_section().split("| Code | When |", 1)[1].split("\n\n", 1)[0]
    documented = {Code[name] for name in re.findall(r"^\| `([A-Z_]+)` \|", main, re.M)}
    answered = {row.code for row in errors.STATUS_TABLE.values()} | TRANSPORT_CODES
    assert documented == answered


# --- vLLM's exceptions --------------------------------------------------------


def test_every_vllm_exception_maps_to_its_documented_code() -> None:
    classes = _vllm_exception_classes()
    assert {c.__name__ for c in classes} == set(VLLM_EXCEPTIONS), "decide the new classes"
    documented = dict(re.findall(r"^\| `(\w+)` \|.*\| `([A-Z_]+)` \|$", _status_section(), re.M))
    for cls in classes:
        error = failures.translate(_instance(cls))
        # The nearest documented class in the MRO decides; none: INTERNAL.
        names = [c.__name__ for c in cls.__mro__ if c.__name__ in documented]
        expected = Code[documented[names[0]]] if names else Code.INTERNAL
        assert _code(error) == expected == VLLM_EXCEPTIONS[cls.__name__], cls.__name__


def test_vllm_queue_limits_are_resource_exhausted_with_retry_info() -> None:
    for raised, flag in ((vllm.exceptions.QueueOverflowError(), "--max-num-queued-reqs"),
                         (vllm.exceptions.MaxQueuedTokensError(), "--max-num-queued-tokens")):  # fmt: skip
        error = failures.translate(raised)
        assert isinstance(error, errors.Overloaded)
        assert _code(error) == Code.RESOURCE_EXHAUSTED and flag in error.message
        delays = [d.retry_delay.ToMilliseconds() for d in error.details()
                  if isinstance(d, error_details_pb2.RetryInfo)]  # fmt: skip
        assert delays == [1000]


def test_only_client_errors_are_invalid_argument_and_keep_vllm_words() -> None:
    bad = vllm.exceptions.VLLMValidationError("top_p must be in (0, 1]", parameter="top_p")
    error = failures.translate(bad)
    assert isinstance(error, errors.InvalidArgument)
    assert "top_p must be in (0, 1]" in error.message
    missing = failures.translate(vllm.exceptions.LoRAAdapterNotFoundError("x", "/nowhere"))
    assert isinstance(missing, errors.NotFound) and "/nowhere" in missing.message


def test_a_plain_exception_is_internal_and_generic() -> None:
    for error in (ValueError("secret /etc/passwd"), KeyError("secret"),
                  vllm.v1.engine.exceptions.EngineGenerateError("secret")):  # fmt: skip
        assert failures.translate(error) is error  # raised as is: the interceptor logs it
        status = errors.to_status(error)
        assert status.code == Code.INTERNAL
        assert "secret" not in status.details and status.details == errors.GENERIC_INTERNAL_MESSAGE


# --- finish reasons, through vLLM's own output processor ----------------------


def _engine_outputs(finish: FinishReason) -> list[RequestOutput]:
    """What AsyncLLM.generate yields when the engine core emits one token and
    then finishes the request with `finish`: vLLM's real OutputProcessor."""
    processor = OutputProcessor(None, log_stats=False)
    params = SamplingParams(max_tokens=4, output_kind=RequestOutputKind.DELTA, detokenize=False)
    request = EngineCoreRequest("r", [1, 2, 3], None, params, None, 0.0, None, None, None,
                                external_req_id="r")  # fmt: skip
    queue = RequestOutputCollector(RequestOutputKind.DELTA, "r")
    processor.add_request(request, None, None, 0, queue)
    outputs = []
    for core in (EngineCoreOutput("r", [5]), EngineCoreOutput("r", [], finish_reason=finish)):
        processor.process_outputs([core])
        out = queue.get_nowait()
        assert isinstance(out, RequestOutput)
        outputs.append(out)
    return outputs


def test_every_vllm_finish_reason_is_a_finish_or_an_error() -> None:
    assert set(FinishReason) == set(FINISH), "decide the new finish reasons"
    for reason, expected in FINISH.items():
        stream = OutputStream("r", 3, 0.0, None)
        first, last = _engine_outputs(reason)
        assert stream.delta(first).token_ids == [5]
        if isinstance(expected, domain.FinishReason):
            assert stream.delta(last).finish_reason == expected
            continue
        with pytest.raises(errors.ServiceError) as e:
            stream.delta(last)
        assert e.value.code == expected, reason
        assert e.value.reason


@pytest.mark.parametrize("reason", [None, "", "timeout", "STOP"])
def test_an_unknown_finish_reason_is_internal_never_a_default(reason: str | None) -> None:
    done = CompletionOutput(0, "", [], None, None, finish_reason=reason)
    output = RequestOutput("r", None, [1], None, [done], finished=True)
    with pytest.raises(errors.EngineFailed) as e:
        OutputStream("r", 1, 0.0, None).delta(output)
    assert e.value.code == Code.INTERNAL
    assert e.value.reason == "UNKNOWN_FINISH_REASON"


# --- a failed request never ends OK, streamed or unary -------------------------


class FailingEngine(FakeEngine):
    """Runs vLLM's output processor and our OutputStream, as the real adapter
    does, over an engine core that emits two tokens then finishes with
    `finish`."""

    finish = FinishReason.ERROR

    async def generate(self, request: domain.GenerationRequest) -> AsyncIterator[domain.Delta]:
        stream = OutputStream(request.request_id, 3, 0.0, None)
        first, last = _engine_outputs(self.finish)
        yield stream.delta(first)
        yield stream.delta(first)
        yield stream.delta(last)


@pytest.fixture
async def failing() -> AsyncIterator[FakeServer]:
    srv = await start_fake(engine=FailingEngine())
    yield srv
    await srv.running.server.stop(grace=0)


def _labels(method: str) -> dict[str, str]:
    kind = "server_stream" if method == "GenerateStream" else "unary"
    return {"grpc_type": kind, "grpc_service": "llmgrpc.v1.LLMService", "grpc_method": method}


@pytest.mark.parametrize(
    ("finish", "code", "reason"),
    [(FinishReason.ERROR, Code.INTERNAL, "ENGINE_ERROR"),
     (FinishReason.ABORT, Code.UNAVAILABLE, "ENGINE_ABORT"),
     (FinishReason.REPETITION, Code.INTERNAL, "UNKNOWN_FINISH_REASON")],
)  # fmt: skip
async def test_an_error_finish_fails_the_call_streamed_and_unary(
    failing: FakeServer, finish: FinishReason, code: Code, reason: str
) -> None:
    assert isinstance(failing.engine, FailingEngine)
    failing.engine.finish = finish
    async with AsyncClient(failing.target) as client:
        received: list[pb.GenerateResponse] = []
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            async for message in client.stream("hi"):
                received.append(message)
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await client.generate("hi")
    # The stream delivered the tokens before the failure, and no finish reason.
    assert [m.token_ids[0] for m in received] == [5, 5]
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in received)
    for e in (streamed.value, unary.value):
        assert e.code() == code
        info = detail(e, error_details_pb2.ErrorInfo)
        assert info.reason == reason and info.domain == errors.ERROR_DOMAIN
    # The server records a call just after it sends the status: wait for it.
    for method in ("GenerateStream", "Generate"):
        labels = _labels(method)
        failed = {**labels, "grpc_code": code.name}
        assert await waiting.eventually(
            lambda failed=failed: failing.metric("grpc_server_handled_total", failed) == 1, 10.0
        )
        assert failing.metric("grpc_server_handled_total", {**labels, "grpc_code": "OK"}) == 0
        assert failing.metric("llmgrpc_engine_failures_total", {
            "model_name": "fake", "grpc_method": method, "reason": reason}) == 1  # fmt: skip


