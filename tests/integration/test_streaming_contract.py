"""The streaming contract on the real engine (the shared `llama` server).

The embedded models have random weights, so their free text is noise. Where a
test needs particular text (multi-byte characters, a stop string inside it),
structured output forces it: `choice` with a single string makes the output
that string, whatever the weights, through tokens the byte-level BPE
tokenizer splits a character across (a CJK character is three byte tokens).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest
from llmgrpc import AsyncClient, Client
from llmgrpc.client import generate_request
from llmgrpc.v1 import llm_service_pb2 as pb

from tests.metrics_scrape import at_rest
from tests.server_process import SLOW_READER, ServerProcess, start_stream
from tests.waiting import eventually

pytestmark = pytest.mark.engine

MULTIBYTE = {
    "cjk": "日本語のテキスト",
    "emoji": "😀👍🏽🎉",  # 👍🏽 is two code points: a skin-tone modifier follows the hand
    "combining": "e\u0301a\u0308o\u0302n\u0303",  # letters each followed by a combining mark
}
SAMPLING = {"greedy": {"temperature": 0.0}, "seeded": {"temperature": 1.0, "seed": 7}}


@pytest.fixture(scope="module")
def client(llama: ServerProcess) -> Iterator[Client]:
    with Client(llama.target, timeout=120) as c:
        yield c


def _assert_stream_is_unary(deltas: list[pb.GenerateResponse], unary: pb.GenerateResponse) -> None:
    assert "".join(d.text for d in deltas) == unary.text
    assert [t for d in deltas for t in d.token_ids] == list(unary.token_ids)
    assert [lp.token_id for d in deltas for lp in d.logprobs] == [lp.token_id for lp in unary.logprobs]
    final = deltas[-1]
    assert final.finish_reason == unary.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert final.WhichOneof("stop_reason") == unary.WhichOneof("stop_reason")
    assert final.stop_string == unary.stop_string and final.stop_token_id == unary.stop_token_id
    assert all(d.finish_reason == pb.FINISH_REASON_UNSPECIFIED for d in deltas[:-1])


@pytest.mark.parametrize("sampling", SAMPLING)
@pytest.mark.parametrize("name", MULTIBYTE)
def test_multibyte_characters_split_across_tokens_stream_whole(
    client: Client, name: str, sampling: str
) -> None:
    text = MULTIBYTE[name]
    kw = {"choice": [text], "max_tokens": 64, **SAMPLING[sampling]}
    unary = client.generate("Say it:", **kw)
    assert unary.text == text and unary.finish_reason == pb.FINISH_REASON_STOP
    deltas = list(client.stream("Say it:", **kw))
    _assert_stream_is_unary(deltas, unary)
    assert not any("\ufffd" in d.text for d in deltas)
    # A character's bytes spanned messages: the first held no text until the
    # character was whole.
    assert any(d.token_ids and not d.text for d in deltas)
    assert len([d for d in deltas if d.token_ids]) > len(text)


@pytest.mark.parametrize(
    ("stop", "include"),
    [("😀", False), ("😀", True), ("本語", False), ("テキ", True)],
)
def test_streamed_stop_strings_equal_unary(client: Client, stop: str, include: bool) -> None:
    """Multi-byte stop strings, several tokens long, in forced text: the
    stream holds back text that could begin the stop string, and never sends
    the stop string unless asked to."""
    text = "日本語😀テキスト"
    kw = {"choice": [text], "max_tokens": 64, "temperature": 0.0, "stop": [stop],
          "include_stop_str_in_output": include}  # fmt: skip
    unary = client.generate("Say it:", **kw)
    expected = text[: text.index(stop)] + (stop if include else "")
    assert unary.text == expected
    assert unary.finish_reason == pb.FINISH_REASON_STOP and unary.stop_string == stop
    deltas = list(client.stream("Say it:", **kw))
    _assert_stream_is_unary(deltas, unary)
    assert not any("\ufffd" in d.text for d in deltas)


def test_streamed_stop_string_in_free_text_equals_unary(client: Client) -> None:
    kw = {"max_tokens": 40, "temperature": 1.0, "seed": 3}
    free = client.generate("The quick brown fox", **kw).text
    stop = next(free[i : i + 3] for i in range(4, len(free) - 3) if free[i : i + 3].strip())
    unary = client.generate("The quick brown fox", stop=[stop], **kw)
    assert unary.text == free[: free.index(stop)] and unary.stop_string == stop
    _assert_stream_is_unary(list(client.stream("The quick brown fox", stop=[stop], **kw)), unary)


async def test_logprobs_under_coalescing_one_entry_per_token_id(llama: ServerProcess) -> None:
    """With 12 requests in flight a stream's messages carry 3 tokens each
    (policy.tokens_per_message); each message's logprobs are its own tokens'."""
    kw = {"max_tokens": 48, "ignore_eos": True, "temperature": 1.0, "seed": 11, "logprobs": 2}
    assert await eventually(lambda: at_rest(llama.metrics_url))  # nobody else's calls in flight
    async with AsyncClient(llama.target, timeout=120) as c:
        background = [start_stream(c, max_tokens=1500) for _ in range(12)]
        try:
            for call in background:  # in the engine once its first token is out
                await asyncio.wait_for(call.read(), 120)
            deltas = [d async for d in c.stream("Coalesce these", **kw)]
            unary = await c.generate("Coalesce these", **kw)
        finally:
            for call in background:
                call.cancel()
    assert await eventually(lambda: at_rest(llama.metrics_url))  # leave the shared server idle
    assert max(len(d.token_ids) for d in deltas) > 1, "no message carried more than one token"
    for d in deltas:
        assert [lp.token_id for lp in d.logprobs] == list(d.token_ids)
        assert all(len(lp.top) == 2 and lp.logprob <= 0 for lp in d.logprobs)
    assert [lp.token_id for lp in unary.logprobs] == list(unary.token_ids)
    _assert_stream_is_unary(deltas, unary)


async def test_a_duplicate_request_id_in_flight_is_already_exists(llama: ServerProcess) -> None:
    """The first call is held in flight by a reader that does not read (tiny
    HTTP/2 windows), so the duplicates surely meet it; it is not disturbed."""
    first_req = generate_request("Hold", request_id="dup-id", max_tokens=1500, ignore_eos=True)
    async with AsyncClient(llama.target, timeout=120, options=SLOW_READER) as slow, \
            AsyncClient(llama.target, timeout=120) as c:  # fmt: skip
        first = slow.stub.GenerateStream(first_req)
        assert (await first.read()).token_ids
        for call in (c.generate, _drain(c)):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call("Again", request_id="dup-id", max_tokens=2)
            assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert "request_id 'dup-id' is already in flight" in (e.value.details() or "")
        rest = []
        while (msg := await first.read()) != grpc.aio.EOF:
            rest.append(msg)
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert rest[-1].usage.completion_tokens == 1500
        # Once the first has ended its id is free again.
        again = await c.generate("Again", request_id="dup-id", max_tokens=2)
        assert again.request_id == "dup-id" and len(again.token_ids) == 2


def test_timing_lies_within_the_callers_view(client: Client) -> None:
    """Ordering: the server's TTFT and total (from its receipt of the request)
    fit inside what the caller saw from sending to receiving."""
    sent = time.monotonic()
    deltas = []
    for d in client.stream("Timing", max_tokens=16, ignore_eos=True):
        deltas.append((time.monotonic(), d))
    first_seen, final = deltas[0][0], deltas[-1][1]
    assert 0 < final.timing.time_to_first_token <= first_seen - sent
    assert final.timing.time_to_first_token <= final.timing.total <= deltas[-1][0] - sent


def _drain(client: AsyncClient):  # type: ignore[no-untyped-def]
    async def call(prompt, **kw):  # type: ignore[no-untyped-def]
        return [d async for d in client.stream(prompt, **kw)]

    return call
