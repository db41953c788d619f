"""Issue 15's request fields on a real gRPC server with the fake engine: prompt
truncation, token constraints, request metadata (x-request-id, W3C trace
context). Every validation's status code and message; that a refused request
never reaches the engine; what reaches it when served. The real engine:
tests/integration/test_sampling_api.py."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from copy import copy
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from llmgrpc import AsyncClient
from llmgrpc.client import generate_request, tokenize_request
from llmgrpc.v1 import llm_service_pb2 as pb
from llmgrpc_server import call_metadata, convert, domain
from llmgrpc_server.config import ServerConfig
from llmgrpc_server.vllm_adapter.engine import VllmEngine
from llmgrpc_server.vllm_adapter.outputs import LogprobMismatch, OutputStream
from llmgrpc_server.vllm_adapter.sampling import to_sampling_params
from vllm import SamplingParams
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine import EngineCoreOutput, EngineCoreRequest, FinishReason
from vllm.v1.engine.output_processor import OutputProcessor, RequestOutputCollector
from vllm.v1.engine.parallel_sampling import ParentRequest

from tests.fake_server import FakeServer, start_fake
from tests.fakes import VOCAB

Code = grpc.StatusCode
CAPS = {"max_logit_bias": 2, "max_allowed_token_ids": 3, "max_bad_words": 2,
        "max_bad_word_chars": 5}  # fmt: skip
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
async def srv() -> AsyncIterator[FakeServer]:
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, **CAPS)
    server = await start_fake(config)
    server.engine._limits = domain.Limits(  # the fake engine with the config's caps
        vocab_size=VOCAB, max_model_len=64, model_names=("fake",), caps=config.size_caps()
    )
    yield server
    await server.running.server.stop(grace=0)


@pytest.fixture
async def api(srv: FakeServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(srv.target) as client:
        yield client


async def _refused(client: AsyncClient, prompt: str | None = "hi", **kw: Any) -> str:
    """The INVALID_ARGUMENT message of a Generate and of a GenerateStream (the same)."""
    messages = []
    for streamed in (False, True):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            if streamed:
                _ = [d async for d in client.stream(prompt, **kw)]
            else:
                await client.generate(prompt, **kw)
        assert e.value.code() == Code.INVALID_ARGUMENT, e.value.details()
        messages.append(e.value.details())
    assert messages[0] == messages[1]
    return messages[0]


# --- truncation -----------------------------------------------------------------


@pytest.mark.parametrize(
    "input_kw",
    [{"prompt": "x" * 200},  # tokens are bytes: 200 tokens, the context is 64
     {"prompt": None, "prompt_token_ids": list(range(100))},
     {"prompt": None, "messages": [("user", "y" * 150)]}],
)  # fmt: skip
async def test_a_prompt_longer_than_the_context_is_served_truncated(
    srv: FakeServer, api: AsyncClient, input_kw: dict[str, Any]
) -> None:
    prompt = input_kw.pop("prompt")
    message = await _refused(api, prompt, max_tokens=2, **input_kw)
    assert "exceed the model's limit of 63" in message  # truncation is opt-in
    answer = await api.generate(prompt, max_tokens=2, truncate_prompt_tokens=10, **input_kw)
    assert answer.usage.prompt_tokens == 10
    request = srv.engine.requests[-1]
    assert request.truncate_prompt_tokens == 10
    if "prompt_token_ids" in input_kw:  # cut in conversion: the last 10 ids
        assert request.prompt_token_ids == tuple(range(90, 100))


async def test_truncation_keeps_the_last_tokens_of_a_short_prompt_whole(
    srv: FakeServer, api: AsyncClient
) -> None:
    answer = await api.generate(prompt_token_ids=[5, 6, 7], max_tokens=3, truncate_prompt_tokens=10)
    assert answer.usage.prompt_tokens == 3
    assert srv.engine.requests[-1].prompt_token_ids == (5, 6, 7)


@pytest.mark.parametrize(
    ("keep", "message"),
    [(0, "truncate_prompt_tokens: must be >= 1; leave it unset to keep the whole prompt"),
     (64, "truncate_prompt_tokens: 64 exceeds the model's limit of 63 prompt tokens")],
)  # fmt: skip
async def test_a_bad_truncation_is_invalid_argument(
    srv: FakeServer, api: AsyncClient, keep: int, message: str
) -> None:
    assert await _refused(api, "hi", truncate_prompt_tokens=keep) == message
    assert not srv.engine.requests


async def test_truncation_names_the_servers_prompt_cap() -> None:
    limits = domain.Limits(vocab_size=VOCAB, max_model_len=64).capped(8, None)
    msg = generate_request("hi", truncate_prompt_tokens=9)
    with pytest.raises(convert.InvalidArgument) as e:
        convert.to_generation_request(msg, limits)
    assert e.value.message == (
        "truncate_prompt_tokens: 9 exceeds the server's --max-prompt-tokens of 8 prompt tokens"
    )


async def test_tokenize_truncation_keeps_the_last_tokens_and_the_whole_text(
    api: AsyncClient,
) -> None:
    whole = await api.tokenize("abcdef")
    cut = await api.tokenize("abcdef", truncate_prompt_tokens=2)
    assert list(cut.token_ids) == list(whole.token_ids)[-2:]
    assert list(cut.tokens) == ["e", "f"]
    assert [(o.start, o.end) for o in cut.offsets] == [(4, 5), (5, 6)]
    assert cut.text == "abcdef"
    assert (await api.tokenize("ab", truncate_prompt_tokens=5)).token_ids == whole.token_ids[:2]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await api.tokenize("ab", truncate_prompt_tokens=0)
    assert e.value.code() == Code.INVALID_ARGUMENT
    assert e.value.details().startswith("truncate_prompt_tokens: must be >= 1")


# --- token constraints ------------------------------------------------------------


async def test_token_constraints_reach_the_engine(srv: FakeServer, api: AsyncClient) -> None:
    await api.generate("hi", max_tokens=1, logit_bias={9: 500.0, 3: -200.0},
                       allowed_token_ids=[1, 2, 3], bad_words=["no", " nope"])  # fmt: skip
    sampling = srv.engine.requests[-1].sampling
    # Sorted by id; clamped to [-100, 100] as vLLM's OpenAI server does.
    assert sampling.logit_bias == ((3, -100.0), (9, 100.0))
    assert sampling.allowed_token_ids == (1, 2, 3)
    assert sampling.bad_words == ("no", " nope")
    await api.generate("hi", max_tokens=1)
    unconstrained = srv.engine.requests[-1].sampling
    assert (unconstrained.logit_bias, unconstrained.allowed_token_ids, unconstrained.bad_words) == (
        (), None, ())


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"logit_bias": {1: 0.0, VOCAB: 1.0}},
         f"sampling.logit_bias[{VOCAB}]: token id {VOCAB} is outside the vocabulary (size {VOCAB})"),
        ({"logit_bias": {4: math.nan}}, "sampling.logit_bias[4]: must be a finite number, got nan"),
        ({"logit_bias": {4: math.inf}}, "sampling.logit_bias[4]: must be a finite number, got inf"),
        ({"logit_bias": {1: 1.0, 2: 1.0, 3: 1.0}},
         "sampling.logit_bias: 3 entries exceed the server's --max-logit-bias of 2"),
        ({"allowed_token_ids": [1, VOCAB + 5]},
         f"sampling.allowed_token_ids[1]: token id {VOCAB + 5} is outside the vocabulary "
         f"(size {VOCAB})"),
        ({"allowed_token_ids": [1, 2, 3, 4]},
         "sampling.allowed_token_ids: 4 token ids exceed the server's --max-allowed-token-ids of 3"),
        ({"bad_words": ["a", "b", "c"]},
         "sampling.bad_words: 3 bad words exceed the server's --max-bad-words of 2"),
        ({"bad_words": ["a", "x" * 6]},
         "sampling.bad_words[1]: 6 characters exceed the server's --max-bad-word-chars of 5"),
        ({"bad_words": ["  "]}, "sampling.bad_words[0]: must not be empty or blank"),
        ({"bad_words": [""]}, "sampling.bad_words[0]: must not be empty or blank"),
    ],
)  # fmt: skip
async def test_bad_token_constraints_are_invalid_argument_before_the_engine(
    srv: FakeServer, api: AsyncClient, kw: dict[str, Any], message: str
) -> None:
    assert await _refused(api, "hi", max_tokens=1, **kw) == message
    assert not srv.engine.requests


async def test_token_constraints_at_their_caps_are_served(srv: FakeServer, api: AsyncClient
                                                          ) -> None:  # fmt: skip
    await api.generate("hi", max_tokens=1, logit_bias={0: 1.0, VOCAB - 1: -1.0},
                       allowed_token_ids=[0, 1, VOCAB - 1], bad_words=["abcde", "x"])  # fmt: skip
    assert len(srv.engine.requests) == 1


def test_token_constraints_become_vllms_sampling_params() -> None:
    limits = domain.Limits(vocab_size=VOCAB, max_model_len=64)
    msg = generate_request("hi", max_tokens=2, logit_bias={5: 2.0}, allowed_token_ids=[5, 6],
                           bad_words=["cat"])  # fmt: skip
    params = to_sampling_params(convert.to_generation_request(msg, limits), 3, limits, 1)
    assert params.logit_bias == {5: 2.0}
    assert params.allowed_token_ids == [5, 6]
    assert params.bad_words == ["cat"]
    plain = to_sampling_params(convert.to_generation_request(generate_request("hi"), limits),
                               3, limits, 1)  # fmt: skip
    assert (plain.logit_bias, plain.allowed_token_ids, plain.bad_words) == (None, None, [])


# --- request metadata --------------------------------------------------------------


async def _ids(api: AsyncClient, metadata: tuple[tuple[str, str], ...], **kw: Any
               ) -> tuple[str, str, str]:  # fmt: skip
    """(the response's request_id, x-request-id in its initial metadata, the same streamed)."""
    unary = api.stub.Generate(generate_request("hi", max_tokens=1, **kw), metadata=metadata)
    answer = await unary
    echoed = dict(await unary.initial_metadata())["x-request-id"]
    stream = api.stub.GenerateStream(generate_request("hi", max_tokens=1, **kw),
                                     metadata=metadata)  # fmt: skip
    streamed = dict(await stream.initial_metadata())["x-request-id"]
    last = [m async for m in stream][-1]
    assert last.request_id == streamed
    return answer.request_id, echoed, streamed


async def test_x_request_id_is_the_request_id_when_the_field_is_empty(
    srv: FakeServer, api: AsyncClient
) -> None:
    assert await _ids(api, (("x-request-id", "from-proxy"),)) == ("from-proxy",) * 3
    assert srv.engine.requests[-1].request_id == "from-proxy"
    # The field wins over the header; both are echoed as the id in use.
    assert await _ids(api, (("x-request-id", "hdr"),), request_id="field") == ("field",) * 3
    generated, echoed, streamed = await _ids(api, ())
    assert len(generated) == 32 and generated == echoed and streamed != generated


async def test_a_request_id_that_is_no_metadata_value_is_served_without_the_echo(
    api: AsyncClient,
) -> None:
    """gRPC metadata values are printable ASCII: a client refuses anything else as
    "Invalid metadata" and fails the call (the fuzzer found it), so such an id is
    not echoed; the answer still carries it."""
    for request_id in ("café", " padded", "tab\there"):
        unary = api.stub.Generate(generate_request("hi", max_tokens=1, request_id=request_id))
        assert (await unary).request_id == request_id
        assert "x-request-id" not in dict(await unary.initial_metadata())
        stream = api.stub.GenerateStream(generate_request("hi", max_tokens=1,
                                                          request_id=request_id))  # fmt: skip
        assert [m async for m in stream][-1].request_id == request_id


async def test_a_long_x_request_id_is_invalid_argument(srv: FakeServer, api: AsyncClient) -> None:
    message = await _refused(api, "hi", metadata=(("x-request-id", "r" * 257),))
    assert message == "x-request-id: at most 256 characters, got 257"
    assert not srv.engine.requests


async def test_the_trace_context_reaches_the_engine(srv: FakeServer, api: AsyncClient) -> None:
    md = (("traceparent", TRACEPARENT), ("tracestate", "congo=t61rcWkgMzE"))
    await api.generate("hi", max_tokens=1, metadata=md)
    assert srv.engine.requests[-1].trace_headers == md
    await api.generate("hi", max_tokens=1)
    assert srv.engine.requests[-1].trace_headers == ()


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((("traceparent", TRACEPARENT),), (("traceparent", TRACEPARENT),)),
        ((("traceparent", TRACEPARENT), ("tracestate", "a=1"), ("tracestate", "b=2")),
         (("traceparent", TRACEPARENT), ("tracestate", "a=1,b=2"))),
        ((("traceparent", TRACEPARENT), ("tracestate", "a=" + "x" * 511)),
         (("traceparent", TRACEPARENT),)),  # over 512 characters: dropped
        ((("traceparent", TRACEPARENT), ("tracestate", "a=" + "x" * 510)),
         (("traceparent", TRACEPARENT), ("tracestate", "a=" + "x" * 510))),
        ((("tracestate", "a=1"),), ()),  # no parent: no state either
        ((("traceparent", TRACEPARENT), ("traceparent", TRACEPARENT)), ()),
        ((("traceparent", TRACEPARENT.upper()),), ()),
        ((("traceparent", TRACEPARENT + "-extra"),), ()),
        ((("traceparent", "ff" + TRACEPARENT[2:]),), ()),
        ((("traceparent", f"00-{'0' * 32}-00f067aa0ba902b7-01"),), ()),
        ((("traceparent", f"00-4bf92f3577b34da6a3ce929d0e0e4736-{'0' * 16}-01"),), ()),
        ((("traceparent", TRACEPARENT.encode()),), (("traceparent", TRACEPARENT),)),
    ],
)  # fmt: skip
def test_trace_headers_follow_w3c_trace_context(
    metadata: tuple[tuple[str, Any], ...], expected: tuple[tuple[str, str], ...]
) -> None:
    assert call_metadata.trace_headers(metadata) == expected


@pytest.mark.parametrize(("endpoint", "passed"), [(None, False), ("localhost:4317", True)])
def test_the_engine_gets_the_trace_context_only_when_vllm_exports_traces(
    endpoint: str | None, passed: bool
) -> None:
    # vLLM drops trace_headers, with a warning per request, without --otlp-traces-endpoint.
    engine = SimpleNamespace(
        _llm=SimpleNamespace(observability_config=SimpleNamespace(otlp_traces_endpoint=endpoint))
    )
    request = domain.GenerationRequest("r", prompt="hi", trace_headers=(("traceparent", TRACEPARENT),))
    headers = VllmEngine._trace_headers(engine, request)  # type: ignore[arg-type]
    assert headers == ({"traceparent": TRACEPARENT} if passed else None)
    assert VllmEngine._trace_headers(engine, domain.GenerationRequest("r", prompt="hi")) is None  # type: ignore[arg-type]


def test_tokenize_request_carries_truncation() -> None:
    assert not tokenize_request("x").HasField("truncate_prompt_tokens")
    assert tokenize_request("x", truncate_prompt_tokens=3).truncate_prompt_tokens == 3
    assert pb.GenerateRequest().HasField("truncate_prompt_tokens") is False


# --- n > 1 -------------------------------------------------------------------------


async def test_a_stream_of_n_completions_interleaves_with_an_index_each(api: AsyncClient) -> None:
    messages = [m async for m in api.stream("abc", max_tokens=4, n=3)]
    indexes = [m.index for m in messages]
    assert sorted(set(indexes)) == [0, 1, 2]
    assert indexes != sorted(indexes)  # interleaved, not one completion after another
    for index in range(3):
        own = [m for m in messages if m.index == index]
        # Each completion's last message, and only it, has the finish reason.
        assert [m.finish_reason for m in own] == [pb.FINISH_REASON_UNSPECIFIED] * 3 + [
            pb.FINISH_REASON_LENGTH]
    # Usage and timing once, on the stream's last message: the prompt once, all tokens.
    assert [m.HasField("usage") for m in messages] == [False] * 11 + [True]
    assert messages[-1].HasField("timing")
    assert messages[-1].usage.prompt_tokens == 3
    assert messages[-1].usage.completion_tokens == 12 == sum(len(m.token_ids) for m in messages)


async def test_generate_returns_every_completion_by_index(api: AsyncClient) -> None:
    unary = await api.generate("abc", max_tokens=4, n=3)
    streamed = [m async for m in api.stream("abc", max_tokens=4, n=3)]
    assert [c.index for c in unary.completions] == [0, 1, 2]
    for c in unary.completions:
        own = [m for m in streamed if m.index == c.index]
        assert c.text == "".join(m.text for m in own)
        assert list(c.token_ids) == [t for m in own for t in m.token_ids]
        assert c.finish_reason == pb.FINISH_REASON_LENGTH
    assert len({c.text for c in unary.completions}) == 3
    # The one-completion fields are left empty; usage is the request's.
    assert (unary.text, list(unary.token_ids), unary.finish_reason) == ("", [], 0)
    assert (unary.usage.prompt_tokens, unary.usage.completion_tokens) == (3, 12)


async def test_n_1_answers_as_before(api: AsyncClient) -> None:
    for kw in ({}, {"n": 1}):
        unary = await api.generate("abc", max_tokens=2, **kw)
        assert unary.text and not unary.completions and unary.index == 0
        assert unary.finish_reason == pb.FINISH_REASON_LENGTH
        assert {m.index async for m in api.stream("abc", max_tokens=2, **kw)} == {0}


@pytest.mark.parametrize(
    ("kw", "message"),
    [({"n": 0}, "sampling.n: must be >= 1"),
     ({"n": 17}, "sampling.n: 17 completions exceed the server's --max-n-sequences of 16"),
     ({"n": 2, "temperature": 0.0},
      "sampling.n: must be 1 with greedy sampling (temperature 0), got 2: the completions "
      "would be identical (vLLM refuses it)")],
)  # fmt: skip
async def test_a_bad_n_is_invalid_argument(
    srv: FakeServer, api: AsyncClient, kw: dict[str, Any], message: str
) -> None:
    assert await _refused(api, "hi", **kw) == message
    assert not srv.engine.requests


async def test_n_at_the_cap_is_served(srv: FakeServer, api: AsyncClient) -> None:
    answer = await api.generate("hi", max_tokens=1, n=16, temperature=0.5)
    assert [c.index for c in answer.completions] == list(range(16))


def test_the_unary_answer_bound_counts_every_completion() -> None:
    limits = domain.Limits(vocab_size=VOCAB, max_model_len=4096, max_token_bytes=10,
                           caps=domain.SizeCaps(max_message_bytes=4096))  # fmt: skip
    # (4096 - 1024) / 15 bytes a token: 204 tokens fit, in one completion or two.
    one = generate_request("hi", max_tokens=204)
    domain.check_generate_answer(convert.to_generation_request(one, limits), limits, 16)
    two = generate_request("hi", max_tokens=102, n=2)
    domain.check_generate_answer(convert.to_generation_request(two, limits), limits, 16)
    over = generate_request("hi", max_tokens=103, n=2)
    with pytest.raises(convert.InvalidArgument) as e:
        domain.check_generate_answer(convert.to_generation_request(over, limits), limits, 16)
    assert "206 tokens (2 completions), up to 15 bytes each" in e.value.message


def test_n_completions_through_vllms_own_output_processor() -> None:
    """vLLM's OutputProcessor with a parent request of 2 children, as AsyncLLM
    fans it out: outputs of both completions waiting to be read arrive merged in
    one RequestOutput, and each becomes a delta of its own index."""
    processor = OutputProcessor(None, log_stats=False)
    params = SamplingParams(n=2, max_tokens=4, output_kind=RequestOutputKind.DELTA,
                            detokenize=False)  # fmt: skip
    request = EngineCoreRequest("r", [1, 2, 3], None, params, None, 0.0, None, None, None,
                                external_req_id="r")  # fmt: skip
    parent, queue = ParentRequest(request), RequestOutputCollector(RequestOutputKind.DELTA, "r")
    for index in range(2):
        child_id, child_params = parent.get_child_info(index)
        child = copy(request)
        child.request_id, child.sampling_params = child_id, child_params
        processor.add_request(child, None, parent, index, queue)
    stream = OutputStream("r", 3, 0.0, None)

    def step(*cores: EngineCoreOutput) -> list[domain.Delta]:
        processor.process_outputs(list(cores))
        output = queue.get_nowait()
        assert isinstance(output, RequestOutput)
        return stream.deltas(output)

    both = step(EngineCoreOutput("0_r", [5]), EngineCoreOutput("1_r", [6]))
    assert [(d.index, d.token_ids, d.finish_reason) for d in both] == [(0, [5], None), (1, [6], None)]
    first_done = step(EngineCoreOutput("0_r", [7], finish_reason=FinishReason.LENGTH))
    assert [(d.index, d.finish_reason, d.usage) for d in first_done] == [
        (0, domain.FinishReason.LENGTH, None)]
    (last,) = step(EngineCoreOutput("1_r", [8], finish_reason=FinishReason.STOP))
    assert (last.index, last.finish_reason) == (1, domain.FinishReason.STOP)
    assert last.usage == domain.Usage(prompt_tokens=3, completion_tokens=4)


# --- prompt logprobs ----------------------------------------------------------------


async def test_prompt_logprobs_come_once_first(srv: FakeServer, api: AsyncClient) -> None:
    streamed = [m async for m in api.stream("abc", max_tokens=3, prompt_logprobs=2)]
    assert [m.HasField("prompt_logprobs") for m in streamed] == [True, False, False]
    prompt = streamed[0].prompt_logprobs
    assert list(prompt.token_ids) == [97, 98, 99] and list(prompt.tokens) == ["'", "(", ")"]
    assert [lp.token_id for lp in prompt.logprobs] == [98, 99]  # the first token has none
    unary = await api.generate("abc", max_tokens=3, prompt_logprobs=2)
    assert unary.prompt_logprobs == prompt
    several = await api.generate("abc", max_tokens=3, prompt_logprobs=2, n=2)
    assert several.prompt_logprobs == prompt
    assert srv.engine.requests[-1].sampling.prompt_logprobs == 2
    assert not (await api.generate("abc", max_tokens=3)).HasField("prompt_logprobs")


async def test_prompt_logprobs_over_max_logprobs_are_invalid_argument(
    srv: FakeServer, api: AsyncClient
) -> None:
    assert await _refused(api, "hi", prompt_logprobs=21) == "sampling.prompt_logprobs: at most 20, got 21"
    assert not srv.engine.requests
    await api.generate("hi", max_tokens=1, prompt_logprobs=20)


def _prompt_output(prompt_logprobs: list[Any] | None, *, finished: bool = False,
                   index: int = 0) -> RequestOutput:  # fmt: skip
    from vllm.outputs import CompletionOutput

    done = "length" if finished else None
    completion = CompletionOutput(index, "x", [9], None, None, finish_reason=done)
    return RequestOutput("r", None, [1, 2, 3], prompt_logprobs, [completion], finished=finished)


def _prompt_entry(token: int, *others: int) -> dict[int, Any]:
    from vllm.logprobs import Logprob

    entry = {token: Logprob(-0.25 * token, rank=len(others) + 1, decoded_token=f"t{token}")}
    entry.update({o: Logprob(-0.1, rank=r, decoded_token=f"t{o}") for r, o in enumerate(others, 1)})
    return entry


def _prompt_stream() -> OutputStream:
    return OutputStream("r", 3, 0.0, None, prompt_top_n=1, prompt_ids=[1, 2, 3],
                        prompt_tokens=["a", "b", "c"])  # fmt: skip


def test_prompt_logprobs_from_vllm_outputs_whole_or_in_chunks() -> None:
    whole = [None, _prompt_entry(2, 7), _prompt_entry(3)]
    (first,) = _prompt_stream().deltas(_prompt_output(whole))
    assert first.prompt_logprobs is not None
    assert first.prompt_logprobs.token_ids == (1, 2, 3)
    assert first.prompt_logprobs.tokens == ("a", "b", "c")
    lps = first.prompt_logprobs.logprobs
    assert [(lp.token_id, lp.logprob, lp.rank) for lp in lps] == [(2, -0.5, 2), (3, -0.75, 1)]
    assert [[t.token_id for t in lp.top] for lp in lps] == [[7], [3]]
    # Chunked prefill: the entries come over several outputs; they are sent once whole.
    stream = _prompt_stream()
    assert stream.delta(_prompt_output(whole[:2])).prompt_logprobs is None
    assert stream.delta(_prompt_output(whole[2:])).prompt_logprobs == first.prompt_logprobs
    # n > 1: another child's copy is not sent again.
    assert stream.delta(_prompt_output(whole, index=1)).prompt_logprobs is None


def test_prompt_logprobs_missing_or_misaligned_fail_the_call() -> None:
    with pytest.raises(LogprobMismatch):  # finished without them
        _prompt_stream().delta(_prompt_output([None, _prompt_entry(2)], finished=True))
    with pytest.raises(LogprobMismatch):  # an entry without its prompt token
        _prompt_stream().delta(_prompt_output([None, _prompt_entry(5), _prompt_entry(3)]))


def test_prompt_logprobs_too_big_for_a_message_are_refused_before_the_work() -> None:
    limits = domain.Limits(vocab_size=VOCAB, max_model_len=4096, max_token_bytes=10,
                           caps=domain.SizeCaps(max_message_bytes=4096))  # fmt: skip
    # Per prompt token: 2 * 10 + 5 + 23 + (k + 1) * 28 bytes, 104 with k = 1; 1 KiB of overhead.
    request = convert.to_generation_request(
        generate_request("hi", max_tokens=1, prompt_logprobs=1), limits)
    to_sampling_params(request, 29, limits, 1)  # 29 * 104 + 1024 = 4040 bytes
    with pytest.raises(convert.InvalidArgument) as e:
        to_sampling_params(request, 30, limits, 1)
    assert e.value.violations[0].field == "sampling.prompt_logprobs"
    assert "could reach 4144 bytes (30 prompt tokens, up to 104 bytes each" in e.value.message


# --- priority -----------------------------------------------------------------------


async def test_a_priority_on_a_first_come_first_served_server_is_invalid_argument(
    srv: FakeServer, api: AsyncClient
) -> None:
    assert await _refused(api, "hi", priority=-1) == (
        "priority: this server schedules first come, first served; a priority needs it "
        "started with vLLM's --scheduling-policy priority")
    assert not srv.engine.requests
    await api.generate("hi", max_tokens=1, priority=0)
    assert srv.engine.requests[-1].priority == 0


async def test_a_priority_reaches_an_engine_that_schedules_by_it(srv: FakeServer,
                                                                 api: AsyncClient) -> None:  # fmt: skip
    srv.engine._limits = replace(srv.engine.limits, priority_scheduling=True)
    for priority in (-7, 0, 2**31 - 1):
        await api.generate("hi", max_tokens=1, priority=priority)
        assert srv.engine.requests[-1].priority == priority


async def test_model_info_advertises_priority_and_the_n_cap(srv: FakeServer,
                                                            api: AsyncClient) -> None:  # fmt: skip
    caps = (await api.model_info()).capabilities
    assert (caps.priority_scheduling, caps.max_n) == (False, srv.engine.limits.caps.max_n_sequences)
    srv.engine._limits = replace(srv.engine.limits, priority_scheduling=True)
    assert (await api.model_info()).capabilities.priority_scheduling


def test_vllm_gets_only_the_options_a_request_sets() -> None:
    engine = SimpleNamespace(
        _llm=SimpleNamespace(observability_config=SimpleNamespace(otlp_traces_endpoint="x:4317"))
    )
    engine._trace_headers = lambda request: VllmEngine._trace_headers(engine, request)  # type: ignore[arg-type]
    options = VllmEngine._request_options  # type: ignore[arg-type]
    assert options(engine, domain.GenerationRequest("r", prompt="x")) == {}  # type: ignore[arg-type]
    request = domain.GenerationRequest("r", prompt="x", priority=-3,
                                       trace_headers=(("traceparent", TRACEPARENT),))  # fmt: skip
    assert options(engine, request) == {"priority": -3,  # type: ignore[arg-type]
                                        "trace_headers": {"traceparent": TRACEPARENT}}  # fmt: skip


def test_the_scheduling_policy_is_read_from_vllms_config() -> None:
    from llmgrpc_server.vllm_adapter.facts import scheduling_policy

    policy = SimpleNamespace(scheduler_config=SimpleNamespace(policy="priority"))
    assert scheduling_policy(policy) == "priority"
    assert scheduling_policy(SimpleNamespace()) == "fcfs"


# --- the CLI ------------------------------------------------------------------------


def test_the_cli_builds_every_new_field() -> None:
    from llmgrpc import cli

    args = cli.build_parser().parse_args([
        "generate", "x", "-n", "2", "--prompt-logprobs", "3", "--truncate-prompt-tokens", "9",
        "--logit-bias", "5=1.5", "--logit-bias", "6=-2", "--allowed-token-id", "5",
        "--allowed-token-id", "6", "--bad-word", "no", "--priority", "-1", "--request-id", "r1",
    ])  # fmt: skip
    req = generate_request("x", **cli._generation(args))
    assert (req.sampling.n, req.sampling.prompt_logprobs, req.truncate_prompt_tokens) == (2, 3, 9)
    assert dict(req.sampling.logit_bias) == {5: 1.5, 6: -2.0}
    assert list(req.sampling.allowed_token_ids) == [5, 6] and list(req.sampling.bad_words) == ["no"]
    assert (req.priority, req.request_id) == (-1, "r1")
    plain = generate_request("x", **cli._generation(cli.build_parser().parse_args(["generate", "x"])))
    assert plain == generate_request("x")
    with pytest.raises(SystemExit):
        cli._logit_bias(["5:1"])
