"""Generation against the real vLLM engine on the embedded models."""

from __future__ import annotations

import json

import grpc
import pytest
from llmgrpc import Client
from llmgrpc.v1 import llm_service_pb2 as pb

from tests.server_process import ServerProcess

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def client(llama: ServerProcess):  # type: ignore[no-untyped-def]
    with Client(llama.target, timeout=120) as c:
        yield c


def test_greedy_stream_equals_unary(client: Client) -> None:
    unary = client.generate("Hello, world", max_tokens=24, temperature=0.0)
    deltas = list(client.stream("Hello, world", max_tokens=24, temperature=0.0))
    assert "".join(d.text for d in deltas) == unary.text
    assert [t for d in deltas for t in d.token_ids] == list(unary.token_ids)
    assert len(unary.token_ids) == 24 and unary.finish_reason == pb.FINISH_REASON_LENGTH
    final = deltas[-1]
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert final.usage.completion_tokens == 24 and final.usage.prompt_tokens > 0
    assert final.timing.total >= final.timing.time_to_first_token > 0
    assert all(not d.HasField("usage") for d in deltas[:-1])


def test_seeded_sampling_is_reproducible(client: Client) -> None:
    kw = {"max_tokens": 20, "temperature": 1.0, "seed": 1234}
    a = client.generate("Once upon a time", **kw)
    b = client.generate("Once upon a time", **kw)
    streamed = "".join(d.text for d in client.stream("Once upon a time", **kw))
    assert a.token_ids == b.token_ids and a.text == streamed
    other = client.generate("Once upon a time", max_tokens=20, temperature=1.0, seed=99)
    assert other.token_ids != a.token_ids


def test_max_tokens_and_default(client: Client) -> None:
    assert len(client.generate("Hi", max_tokens=3, ignore_eos=True).token_ids) == 3
    default = client.generate("Hi", ignore_eos=True)
    assert default.usage.completion_tokens == 16  # vLLM's default max_tokens


def test_stop_string_ends_output(client: Client) -> None:
    free = client.generate("The quick brown fox", max_tokens=40, temperature=0.0).text
    stop = next(free[i:i + 3] for i in range(4, len(free) - 3) if free[i:i + 3].strip())
    cut = client.generate("The quick brown fox", max_tokens=40, temperature=0.0, stop=[stop])
    assert cut.finish_reason == pb.FINISH_REASON_STOP
    assert cut.stop_string == stop
    assert cut.text == free[: free.index(stop)]
    kept = client.generate("The quick brown fox", max_tokens=40, temperature=0.0, stop=[stop],
                           include_stop_str_in_output=True)  # fmt: skip
    assert kept.text == free[: free.index(stop)] + stop


def test_stop_token_id(client: Client) -> None:
    free = client.generate("Hello", max_tokens=12, temperature=0.0)
    token = free.token_ids[5]
    cut = client.generate("Hello", max_tokens=12, temperature=0.0, stop_token_ids=[token])
    assert cut.finish_reason == pb.FINISH_REASON_STOP
    assert cut.stop_token_id == token
    assert list(cut.token_ids) == list(free.token_ids)[: list(free.token_ids).index(token) + 1]


def test_logprobs(client: Client) -> None:
    resp = client.generate("Hello", max_tokens=6, temperature=0.0, logprobs=3)
    assert len(resp.logprobs) == 6
    for tok, lp in zip(resp.token_ids, resp.logprobs, strict=True):
        assert lp.token_id == tok and lp.logprob <= 0 and lp.rank == 1
        assert len(lp.top) == 3 and lp.top[0].token_id == tok
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
    streamed = [lp for d in client.stream("Hello", max_tokens=6, temperature=0.0, logprobs=3)
                for lp in d.logprobs]  # fmt: skip
    assert [lp.token_id for lp in streamed] == list(resp.token_ids)


def test_json_schema_output_parses(client: Client) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "colour": {"enum": ["red", "green", "blue"]}},
        "required": ["ok", "colour"],
        "additionalProperties": False,
    }
    resp = client.generate("Answer in JSON:", max_tokens=100, temperature=0.0,
                           json_schema=json.dumps(schema))  # fmt: skip
    value = json.loads(resp.text)
    assert set(value) == {"ok", "colour"} and isinstance(value["ok"], bool)
    assert value["colour"] in {"red", "green", "blue"}


def test_choice_and_regex(client: Client) -> None:
    choice = client.generate("Pick a colour:", max_tokens=10, choice=["red", "green", "blue"])
    assert choice.text in {"red", "green", "blue"}
    regex = client.generate("A number:", max_tokens=10, regex=r"[0-9]{3}")
    assert len(regex.text) == 3 and regex.text.isdigit()


def test_chat_input(client: Client) -> None:
    messages = [("system", "Be brief."), ("user", "Hello there")]
    tok = client.tokenize(messages=messages)
    assert "<|user|>" in tok.text and tok.text.endswith("<|assistant|>\n")
    resp = client.generate(messages=messages, max_tokens=5, temperature=0.0)
    assert resp.usage.prompt_tokens == len(tok.token_ids)
    same = client.generate(prompt_token_ids=list(tok.token_ids), max_tokens=5, temperature=0.0)
    assert same.token_ids == resp.token_ids


def test_tokenize_detokenize_round_trip_with_offsets(client: Client) -> None:
    text = "Hello, world! Grouped-query attention."
    tok = client.tokenize(text)
    assert tok.tokens[0] == "<s>" and tok.offsets[0].start == tok.offsets[0].end == 0
    assert "".join(text[o.start:o.end] for o in tok.offsets[1:]) == text
    assert client.detokenize(list(tok.token_ids)) == text
    assert client.detokenize(list(tok.token_ids), skip_special_tokens=False).startswith("<s>")
    plain = client.tokenize(text, add_special_tokens=False)
    assert list(plain.token_ids) == list(tok.token_ids[1:])
    assert tok.max_model_len == 2048


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "temperature": float("nan")}, "sampling.temperature"),
        ({"prompt": "x", "top_p": -0.5}, "sampling.top_p"),
        ({"prompt": None, "prompt_token_ids": [1, 70000]}, "prompt_token_ids.ids[1]"),
        ({"prompt": "word " * 3000}, "prompt"),
        ({"prompt": "x", "max_tokens": 2047}, "sampling.max_tokens"),
        ({"prompt": "x", "regex": "("}, "request"),
    ],
)
def test_bad_input_is_invalid_argument(client: Client, kwargs: dict, field: str) -> None:
    prompt = kwargs.pop("prompt")
    with pytest.raises(grpc.RpcError) as e:
        client.generate(prompt, **kwargs)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert field in e.value.details()
    # The server is unharmed.
    assert client.generate("ok", max_tokens=2, ignore_eos=True).usage.completion_tokens == 2


def test_the_served_name_selects_the_model_and_another_is_not_found(client: Client) -> None:
    name = client.model_info().model_name
    assert name == "tiny-llama-gqa"
    assert client.generate("Hi", max_tokens=2, ignore_eos=True, model=name).usage.completion_tokens == 2
    assert client.tokenize("Hi", model=name).token_ids
    for call in (lambda: client.generate("Hi", max_tokens=2, model="tiny-mixtral-moe"),
                 lambda: client.tokenize("Hi", model="Llama-3.1-8B-Instruct")):  # fmt: skip
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "this server serves 'tiny-llama-gqa'" in e.value.details()
