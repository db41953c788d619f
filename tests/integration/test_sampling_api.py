"""Issue 15's request fields on the real engine.

On the shared `smollm` server (the default model in float32): prompt logprobs
equal transformers' (tests/smollm_reference.py, computed before the server
starts), a banned word never appears, an allowed set is respected, n > 1 and
truncation. On the shared `limited` server (one engine slot, vLLM's
--scheduling-policy priority): high-priority requests run before low ones.
"""

from __future__ import annotations

import re
import statistics
import threading
from functools import partial

import grpc
import pytest
from llmgrpc import Client
from llmgrpc.v1 import llm_service_pb2 as pb

from tests import metrics_scrape, waiting
from tests.server_process import ServerProcess
from tests.smollm_reference import CHAT_PROMPTS, PROMPT_TOP, TEXT_PROMPTS, Greedy

pytestmark = pytest.mark.engine

LOGPROB_TOLERANCE = 1e-3


def _input(prompt: str) -> dict[str, object]:
    return {"messages": [("user", prompt)]} if prompt in CHAT_PROMPTS else {"prompt": prompt}


def test_prompt_logprobs_equal_transformers(
    smollm: ServerProcess, smollm_reference: dict[str, Greedy]
) -> None:
    """Every prompt token after the first: its logprob and rank, and the
    position's best alternatives, within 1e-3 of transformers (float32); the
    prompt's ids are the reference's; streamed, they come whole in the first message."""
    with Client(smollm.target, timeout=300) as client:
        for prompt in (*CHAT_PROMPTS, *TEXT_PROMPTS):
            ref = smollm_reference[prompt]
            answer = client.generate(**_input(prompt), max_tokens=1, prompt_logprobs=PROMPT_TOP)
            got = answer.prompt_logprobs
            assert list(got.token_ids) == ref.prompt_ids, prompt
            assert len(got.tokens) == len(ref.prompt_ids)
            assert len(got.logprobs) == len(ref.prompt) == len(ref.prompt_ids) - 1
            for position, (lp, want) in enumerate(zip(got.logprobs, ref.prompt, strict=True)):
                where = f"{prompt!r} position {position + 1}"
                assert lp.token_id == ref.prompt_ids[position + 1], where
                assert abs(lp.logprob - want.logprob) < LOGPROB_TOLERANCE, where
                assert [round(t.logprob, 2) for t in lp.top] == pytest.approx(
                    [round(v, 2) for _, v in want.top], abs=0.011), where
                _same_ranking(lp, want.rank, want.top, where)
            streamed = list(client.stream(**_input(prompt), max_tokens=2,
                                          prompt_logprobs=PROMPT_TOP))  # fmt: skip
            assert streamed[0].prompt_logprobs == got
            assert not any(m.HasField("prompt_logprobs") for m in streamed[1:])


def _same_ranking(lp: pb.TokenLogprob, rank: int, top: list[tuple[int, float]], where: str
                  ) -> None:  # fmt: skip
    """The rank and the best ids equal transformers', except where two logprobs
    are within the tolerance of each other (a near-tie may order either way)."""
    values = [v for _, v in top]
    ties = {i for i in range(len(values) - 1) if values[i] - values[i + 1] < LOGPROB_TOLERANCE}
    if rank <= len(values) and not ({rank - 2, rank - 1} & ties):
        assert lp.rank == rank, where
    for i, (token, _) in enumerate(top):
        if not ({i - 1, i} & ties):
            assert lp.top[i].token_id == token, where


def test_a_banned_word_never_appears(smollm: ServerProcess) -> None:
    """A word of a greedy answer, banned, is gone from the greedy answer and from
    sampled ones. vLLM bans a word's tokens as written and, when it has as many
    tokens, its form after a space: the word is one that both forms cover."""
    with Client(smollm.target, timeout=300) as client:
        for prompt in ("What is the capital of France?", "Name three primary colors."):
            free = client.generate(messages=[("user", prompt)], max_tokens=24, temperature=0.0)
            word = _bannable_word(client, free.text)
            banned = client.generate(messages=[("user", prompt)], max_tokens=24,
                                     temperature=0.0, bad_words=[word])  # fmt: skip
            assert not _says(banned.text, word), banned.text
            sampled = client.generate(messages=[("user", prompt)], max_tokens=24, n=4,
                                      temperature=1.0, seed=5, bad_words=[word])  # fmt: skip
            assert not any(_says(c.text, word) for c in sampled.completions), sampled


def _bannable_word(client: Client, text: str) -> str:
    """The first word of `text` that is one token bare and one after a space."""
    for word in re.findall(r"[A-Za-z]{4,}", text):
        forms = [client.tokenize(w, add_special_tokens=False).token_ids for w in (word, " " + word)]
        if [len(f) for f in forms] == [1, 1]:
            return word
    raise AssertionError(f"no single-token word in {text!r}")


def _says(text: str, word: str) -> bool:
    return re.search(rf"\b{word}\b", text) is not None


def test_an_allowed_set_is_respected(smollm: ServerProcess) -> None:
    with Client(smollm.target, timeout=300) as client:
        allowed = sorted({*client.tokenize(" red green blue", add_special_tokens=False).token_ids})
        answer = client.generate("My favourite colours are", max_tokens=12, n=4, temperature=1.5,
                                 seed=3, ignore_eos=True, allowed_token_ids=allowed)  # fmt: skip
        for c in answer.completions:
            assert len(c.token_ids) == 12 and set(c.token_ids) <= set(allowed), c
        free = client.generate("My favourite colours are", max_tokens=12, temperature=1.5, seed=3)
        assert not set(free.token_ids) <= set(allowed)  # the set is what made the difference


def test_logit_bias_steers_the_greedy_answer(smollm: ServerProcess) -> None:
    with Client(smollm.target, timeout=300) as client:
        (token,) = client.tokenize(" banana", add_special_tokens=False).token_ids
        answer = client.generate("The capital of France is", max_tokens=4, temperature=0.0,
                                 logit_bias={token: 100.0})  # fmt: skip
        assert list(answer.token_ids) == [token] * 4
        with pytest.raises(grpc.RpcError) as e:
            client.generate("x", logit_bias={50_000: 1.0})
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_n_completions_share_one_prompt(smollm: ServerProcess) -> None:
    """n = 4 sampled completions: interleaved when streamed, usage counts the
    prompt once; the engine computes the prompt's full blocks once and the
    other three completions read them from the prefix cache."""
    prompt = "Here is a long story about a dragon who lived in a cave. " * 10  # unique to this test
    with Client(smollm.target, timeout=300) as client:
        prompt_tokens = len(client.tokenize(prompt).token_ids)
        assert metrics_scrape.at_rest(smollm.metrics_url)
        before = metrics_scrape.scrape(smollm.metrics_url)
        messages = list(client.stream(prompt, max_tokens=16, n=4, temperature=1.0, seed=11,
                                      ignore_eos=True))  # fmt: skip
        after = metrics_scrape.scrape(smollm.metrics_url)
        unary = client.generate(prompt, max_tokens=16, n=4, temperature=1.0, seed=11,
                                ignore_eos=True)  # fmt: skip
    indexes = [m.index for m in messages]
    assert sorted(set(indexes)) == [0, 1, 2, 3] and indexes != sorted(indexes)
    assert [m.HasField("usage") for m in messages].count(True) == 1 and messages[-1].usage
    usage = messages[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, 64)
    # Seeded: the same completions unary and streamed, and different from each other.
    for c in unary.completions:
        assert list(c.token_ids) == [t for m in messages if m.index == c.index for t in m.token_ids]
    assert len({tuple(c.token_ids) for c in unary.completions}) == 4

    def delta(name: str) -> float:
        return metrics_scrape.sample_value(after, name) - metrics_scrape.sample_value(before, name)

    full_blocks = prompt_tokens // 16 * 16  # vLLM's CPU block size here
    assert delta("vllm:prefix_cache_hits_total") >= 3 * full_blocks


def test_truncation_serves_a_prompt_longer_than_the_context(smollm: ServerProcess) -> None:
    """A prompt over max_model_len is refused whole and served cut: the last k
    tokens, counted in usage; the same for token ids and chat; Tokenize cuts alike."""
    with Client(smollm.target, timeout=300) as client:
        limit = client.model_info().max_model_len
        text = "one two three four five six seven eight nine ten " * (limit // 5)
        ids = list(client.tokenize(text).token_ids)
        assert len(ids) > limit
        with pytest.raises(grpc.RpcError) as e:
            client.generate(text, max_tokens=2)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for kw in ({"prompt": text}, {"prompt_token_ids": ids}, {"messages": [("user", text)]}):
            answer = client.generate(**kw, max_tokens=2, truncate_prompt_tokens=64)
            assert answer.usage.prompt_tokens == 64, kw.keys()
        cut = client.generate(text, max_tokens=1, truncate_prompt_tokens=64, prompt_logprobs=0)
        assert list(cut.prompt_logprobs.token_ids) == ids[-64:]
        assert list(client.tokenize(text, truncate_prompt_tokens=64).token_ids) == ids[-64:]


# --- priority ---------------------------------------------------------------------


def test_high_priority_requests_run_before_low_ones(limited: ServerProcess) -> None:
    """The engine runs one sequence at a time (--max-num-seqs 1) and schedules
    by priority: with it busy, four low-priority (10) requests queued first and
    four high-priority (-10) ones after; once the blocker is cancelled all four
    high ones run first, so their median TTFT is below the low ones'."""
    url = limited.metrics_url
    assert metrics_scrape.at_rest(url)
    done: list[tuple[int, pb.GenerateResponse]] = []
    lock = threading.Lock()
    with Client(limited.target, timeout=300) as client:
        room = client.model_info().max_model_len - 8  # as long as it can: cancelled anyway
        blocker = client.stream("block", max_tokens=room, ignore_eos=True)
        next(blocker)  # running: every request from now on waits

        def run(priority: int) -> None:
            answer = client.generate("queued", max_tokens=8, ignore_eos=True, priority=priority)
            with lock:
                done.append((priority, answer))

        threads = []
        for priority in [10] * 4 + [-10] * 4:
            threads.append(threading.Thread(target=run, args=(priority,)))
            threads[-1].start()
            # Queued in the engine in this order: low ones first.
            assert waiting.poll(partial(_queued, url, len(threads)), timeout=60, interval=0.02)
        blocker.close()  # cancels the call: the engine aborts it and takes the queue
        for thread in threads:
            thread.join(timeout=120)
    order = [priority for priority, _ in done]
    assert order == [-10] * 4 + [10] * 4, order
    ttft = {p: statistics.median(a.timing.time_to_first_token for q, a in done if q == p)
            for p in (-10, 10)}  # fmt: skip
    assert ttft[-10] < ttft[10]


def _queued(url: str, n: int) -> bool:
    return metrics_scrape.value(url, "vllm:num_requests_waiting") >= n
