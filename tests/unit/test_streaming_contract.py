"""The streaming contract's engine-free parts: logprob alignment on real vLLM
output objects, TTFT from receipt, chat without a template.

The adapter (`VllmEngine`, `OutputStream`) runs for real here; only
`AsyncLLM` is a stub yielding vLLM's own `RequestOutput`s, so no engine
process starts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from types import SimpleNamespace

import grpc
import pytest
from llmgrpc.v1 import llm_service_pb2 as pb
from llmgrpc_server import convert
from llmgrpc_server.domain import Limits
from llmgrpc_server.errors import GENERIC_INTERNAL_MESSAGE, InvalidArgument
from llmgrpc_server.vllm_adapter.engine import VllmEngine
from llmgrpc_server.vllm_adapter.outputs import LogprobMismatch, OutputStream
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.logprobs import FlatLogprobs, Logprob
from vllm.outputs import CompletionOutput, RequestOutput

Entry = dict[int, Logprob] | None


def _entry(token: int, *others: int) -> dict[int, Logprob]:
    """A logprob entry: `token` sampled at rank 1, `others` ranked after it."""
    entry = {token: Logprob(logprob=-0.5, rank=1, decoded_token=f"t{token}")}
    for rank, other in enumerate(others, start=2):
        entry[other] = Logprob(logprob=-1.0 * rank, rank=rank, decoded_token=f"t{other}")
    return entry


def _output(
    ids: list[int], logprobs: Sequence[Entry] | FlatLogprobs | None, *, text: str = "",
    finished: bool = False,
) -> RequestOutput:  # fmt: skip
    completion = CompletionOutput(
        index=0, text=text, token_ids=ids, cumulative_logprob=None,
        logprobs=logprobs,  # type: ignore[arg-type]
        finish_reason="length" if finished else None,
    )  # fmt: skip
    return RequestOutput(
        request_id="r", prompt=None, prompt_token_ids=[1, 2], prompt_logprobs=None,
        outputs=[completion], finished=finished, num_cached_tokens=0,
    )  # fmt: skip


def _stream(top_n: int | None = 1) -> OutputStream:
    return OutputStream("r", prompt_len=2, arrival=time.monotonic(), top_n=top_n)


@pytest.mark.parametrize("flat", [False, True], ids=["list", "FlatLogprobs"])
def test_a_coalesced_message_gets_one_logprob_entry_per_token_id(flat: bool) -> None:
    entries = [_entry(7, 8), _entry(9, 7), _entry(11, 7)]
    logprobs: list[Entry] | FlatLogprobs = entries
    if flat:
        logprobs = FlatLogprobs()
        logprobs.extend(entries)
    delta = _stream().delta(_output([7, 9, 11], logprobs))
    assert [lp.token_id for lp in delta.logprobs] == delta.token_ids == [7, 9, 11]
    assert [lp.token for lp in delta.logprobs] == ["t7", "t9", "t11"]
    assert [[t.token_id for t in lp.top] for lp in delta.logprobs] == [[7], [9], [11]]


def test_a_message_with_no_new_token_has_no_logprobs() -> None:
    assert _stream().delta(_output([], [])).logprobs == []


@pytest.mark.parametrize(
    ("ids", "logprobs"),
    [
        ([7, 9], [_entry(7)]),  # fewer entries than ids: the old zip dropped the last token's
        ([7], [_entry(7), _entry(9)]),  # more entries than ids
        ([7, 9], [None, _entry(9)]),  # an empty entry: the old filter shifted the rest left
        ([7, 9], [_entry(9), _entry(7)]),  # entries out of order
        ([7], None),  # logprobs asked for, none given
    ],
    ids=["fewer", "more", "none-entry", "swapped", "missing"],
)
def test_logprobs_that_do_not_line_up_with_token_ids_are_an_error(
    ids: list[int], logprobs: list[Entry] | None
) -> None:
    with pytest.raises(LogprobMismatch):
        _stream().delta(_output(ids, logprobs))


def test_logprobs_not_asked_for_are_ignored() -> None:
    assert _stream(top_n=None).delta(_output([7, 9], [_entry(7)])).logprobs == []


# --- the adapter behind a real gRPC server, on a stub AsyncLLM ---------------


class StubLLM:
    """Just enough AsyncLLM for VllmEngine: replays `outputs` for every request."""

    def __init__(self, outputs: list[RequestOutput], chat_template: str | None = None) -> None:
        self.outputs = outputs
        self.errored = False
        self.first_yield_at: float | None = None
        # Set: every output after the first waits for it.
        self.hold: asyncio.Event | None = None
        self.vllm_config = SimpleNamespace(lora_config=None, model_config=SimpleNamespace(
            get_vocab_size=lambda: 512, max_model_len=2048, max_logprobs=20,
            served_model_name="stub", model="stub"))  # fmt: skip
        # What engine.engine_input uses: vLLM's renderer, here handing the
        # prompt on as it is.
        self.model_config = SimpleNamespace(is_encoder_decoder=False)
        self.renderer = SimpleNamespace(default_cmpl_tok_params=None,
                                        render_cmpl=lambda prompts, params: list(prompts))  # fmt: skip
        self._tokenizer = SimpleNamespace(
            chat_template=chat_template, encode=lambda text, **kw: [1, 2],
            get_vocab=lambda: {"a": 1, "b": 2},
        )

    def get_tokenizer(self) -> object:
        return self._tokenizer

    async def generate(self, prompt: object, params: object, request_id: str,
                       lora_request: object = None) -> AsyncIterator[RequestOutput]:  # fmt: skip
        for i, output in enumerate(self.outputs):
            if i and self.hold is not None:
                await self.hold.wait()
            if self.first_yield_at is None:
                self.first_yield_at = time.monotonic()
            yield output

    async def abort(self, request_id: str) -> None:
        pass


def _engine(llm: StubLLM) -> VllmEngine:
    return VllmEngine(  # type: ignore[arg-type]
        llm, "stub", max_prompt_tokens=None, max_tokens=None, max_tokens_per_message=8
    )


async def test_misaligned_logprobs_end_the_stream_internal_not_shifted(fake, client):
    good = _output([7], [_entry(7)], text="a")
    bad = _output([9, 11], [_entry(9)], text="bc", finished=True)
    fake.running.servicer.attach(_engine(StubLLM([good, bad])))
    received: list[pb.GenerateResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for msg in client.stream("hi", logprobs=1):
            received.append(msg)
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert e.value.details() == GENERIC_INTERNAL_MESSAGE
    assert [[lp.token_id for lp in m.logprobs] for m in received] == [[7]]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.generate("hi", logprobs=1)
    assert e.value.code() == grpc.StatusCode.INTERNAL


async def test_ttft_counts_from_receipt_including_the_wait_before_the_engine(
    fake, client, monkeypatch: pytest.MonkeyPatch
):
    """Ordering, not a threshold: the request is held in admission across a
    whole health-check round trip; the server's TTFT must cover the span from
    entering admission to the stub engine yielding the first token."""
    llm = StubLLM([_output([7], None, text="a"), _output([9], None, text="b", finished=True)])
    fake.running.servicer.attach(_engine(llm))
    admission = fake.running.servicer.admission
    admit = admission.admit
    waiting, release = asyncio.Event(), asyncio.Event()
    entered: list[float] = []

    @asynccontextmanager
    async def held_admit() -> AsyncIterator[None]:
        entered.append(time.monotonic())
        waiting.set()
        await release.wait()
        async with admit():
            yield

    monkeypatch.setattr(admission, "admit", held_admit)
    call = asyncio.ensure_future(client.generate("hi"))
    await asyncio.wait_for(waiting.wait(), 30)
    assert await client.health() == "SERVING"  # a round trip while the request waits
    release.set()
    resp = await call
    assert llm.first_yield_at is not None
    assert resp.timing.time_to_first_token >= llm.first_yield_at - entered[0]
    assert resp.timing.total >= resp.timing.time_to_first_token


async def test_chat_on_a_model_without_a_template_is_failed_precondition(fake, client):
    engine = _engine(StubLLM([_output([7], None, finished=True)], chat_template=None))
    assert not engine.limits.has_chat_template  # the adapter reads it off the tokenizer
    fake.running.servicer.attach(engine)
    messages = [("user", "hello")]
    calls = {
        "Generate": lambda: client.generate(messages=messages),
        "GenerateStream": lambda: _drain(client.stream(messages=messages)),
        "Tokenize": lambda: client.tokenize(messages=messages),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call()
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, name
        assert "no chat template" in (e.value.details() or ""), name
    assert (await client.generate("a prompt still works")).finish_reason == pb.FINISH_REASON_LENGTH


async def test_a_request_id_in_flight_is_already_exists_and_the_first_runs_on(fake, client):
    """The adapter's check behind the servicer (the real engine: the integration test)."""
    llm = StubLLM([_output([7], None, text="a"), _output([9], None, text="b", finished=True)])
    llm.hold = asyncio.Event()
    fake.running.servicer.attach(_engine(llm))
    first = client.stream("hello", request_id="dup")
    assert list((await anext(first)).token_ids) == [7]
    for call in (client.generate, lambda *a, **kw: _drain(client.stream(*a, **kw))):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call("again", request_id="dup")
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "'dup' is already in flight" in (e.value.details() or "")
    llm.hold.set()
    rest = await _drain(first)
    assert [list(m.token_ids) for m in rest] == [[9]]
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    # Once the first has ended, the id is free again.
    assert list((await client.generate("again", request_id="dup")).token_ids) == [7, 9]


async def _drain(stream: AsyncIterator[pb.GenerateResponse]) -> list[pb.GenerateResponse]:
    return [m async for m in stream]


@pytest.mark.parametrize(("temperature", "ok"), [(0.0, True), (2.0, True), (2.01, False), (-0.01, False)])
def test_temperature_range_is_the_documented_one(temperature: float, ok: bool) -> None:
    """[0, 2]: convert.py, the proto comment, docs/api.md and vLLM agree."""
    limits = Limits(vocab_size=512, max_model_len=2048)
    msg = pb.SamplingParams(temperature=temperature)
    if ok:
        assert convert.to_sampling(msg, limits).temperature == temperature
    else:
        with pytest.raises(InvalidArgument, match=r"sampling.temperature: must be in \[0.0, 2.0\]"):
            convert.to_sampling(msg, limits)
    SamplingParams(temperature=2.0)  # vLLM's own upper bound, accepted
    with pytest.raises(VLLMValidationError, match="temperature"):
        SamplingParams(temperature=2.01)
