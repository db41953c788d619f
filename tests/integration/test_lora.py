"""LoRA adapters over gRPC on the real engine: the built-in demo adapters of the
default model, selected per request by `model`, against transformers + peft
(tests/lora_reference.py, float32), alone and interleaved under load; the
names a server without LoRA refuses.

The smollm server runs them with --max-loras 1: one adapter per engine step,
so the interleaved requests also rotate two adapters through one slot.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from llmgrpc import Client
from llmgrpc.v1 import admin_service_pb2 as admin_pb
from llmgrpc.v1 import admin_service_pb2_grpc as admin_grpc
from llmgrpc.v1 import llm_service_pb2 as pb
from llmgrpc_server.models import default_models_dir, resolve_adapter

from tests.metrics_scrape import at_rest, sample_value, scrape
from tests.server_process import ADAPTER_DIR, ADMIN_TOKEN, ServerProcess
from tests.smollm_reference import Greedy
from tests.waiting import poll

pytestmark = pytest.mark.engine

BASE = "smollm2-135m-instruct"
A, B = f"{BASE}-lora-a", f"{BASE}-lora-b"
LORA_PROMPTS = ("What is the capital of France?", "Name three primary colors.",
                "Write a haiku about the sea.", "Who wrote Romeo and Juliet?")  # fmt: skip
MAX_TOKENS = 16
NEAR_TIE = 1e-3


def _ask(client: Client, model: str, prompt: str) -> list[int]:
    r = client.generate(messages=[("user", prompt)], model=model, max_tokens=MAX_TOKENS,
                        temperature=0.0)  # fmt: skip
    ids = list(r.token_ids)
    return ids[:-1] if ids and ids[-1] == 2 else ids


def _assert_matches(got: list[int], ref: Greedy, what: str) -> bool:
    """True when equal; else the divergence must be a near-tie of the reference."""
    if got == ref.token_ids:
        return True
    same = next(i for i, (x, y) in enumerate(zip([*got, -1], [*ref.token_ids, -2], strict=False))
                if x != y)  # fmt: skip
    assert same < len(ref.top2_gaps) and ref.top2_gaps[same] < NEAR_TIE, (
        f"{what}: diverges at token {same} (gap {ref.top2_gaps[min(same, len(ref.top2_gaps) - 1)]:.4f})"
    )
    return False


def test_adapters_equal_transformers_with_peft(
    smollm: ServerProcess, lora_reference: dict[str, dict[str, Greedy]]
) -> None:
    """Greedy with each adapter equals transformers + peft token for token (16
    tokens, float32) and differs from the base model's."""
    with Client(smollm.target, timeout=300) as client, ThreadPoolExecutor(len(LORA_PROMPTS)) as pool:
        for model in (A, B):
            answers = pool.map(lambda p, m=model: _ask(client, m, p), LORA_PROMPTS)
            equal = sum(_assert_matches(got, lora_reference[model][p], f"{model} {p!r}")
                        for p, got in zip(LORA_PROMPTS, answers, strict=True))  # fmt: skip
            assert equal >= len(LORA_PROMPTS) - 1, model
            differs = [p for p in LORA_PROMPTS
                       if lora_reference[model][p].token_ids != lora_reference[BASE][p].token_ids]  # fmt: skip
            assert len(differs) >= len(LORA_PROMPTS) - 1, f"{model} barely changes the base"
        base = list(pool.map(lambda p: _ask(client, "", p), LORA_PROMPTS))
    assert base == [lora_reference[BASE][p].token_ids for p in LORA_PROMPTS]


def test_base_and_adapters_interleaved_at_concurrency_32_answer_as_alone(
    smollm: ServerProcess,
) -> None:
    """32 requests in flight mixing the base and both adapters (one adapter slot:
    the engine swaps them): each answer equals the same request's answer alone."""
    jobs = [(model, prompt) for prompt in LORA_PROMPTS[:2] for model in ("", A, B)] * 6
    with Client(smollm.target, timeout=300) as client:
        alone = {job: _ask(client, *job) for job in set(jobs)}
        with ThreadPoolExecutor(32) as pool:
            together = list(pool.map(lambda job: _ask(client, *job), jobs))
    assert len(together) == len(jobs) > 32
    for job, ids in zip(jobs, together, strict=True):
        assert ids == alone[job], job



def test_adapter_metrics_count_each_adapter_and_vllm_reports_lora_slots(
    smollm: ServerProcess,
) -> None:
    """Our counters by adapter (exactly the calls and tokens sent here), and
    vLLM's vllm:lora_requests_info, which LoRA-aware routers read."""
    assert poll(lambda: at_rest(smollm.metrics_url), timeout=60)
    before = scrape(smollm.metrics_url)
    with Client(smollm.target, timeout=300) as client:
        for model in (A, A, B):
            client.generate("Hello", model=model, max_tokens=3, ignore_eos=True, temperature=0.0)
        with pytest.raises(grpc.RpcError):
            client.generate("Hello", model="not-an-adapter", max_tokens=3)

    def counted() -> bool:
        now = scrape(smollm.metrics_url)
        delta = {(name, adapter): sample_value(now, name, lora_adapter=adapter)
                 - sample_value(before, name, lora_adapter=adapter)
                 for name in ("llmgrpc_lora_requests_total", "llmgrpc_lora_generated_tokens_total")
                 for adapter in (A, B, "not-an-adapter")}  # fmt: skip
        return delta == {
            ("llmgrpc_lora_requests_total", A): 2, ("llmgrpc_lora_requests_total", B): 1,
            ("llmgrpc_lora_requests_total", "not-an-adapter"): 0,
            ("llmgrpc_lora_generated_tokens_total", A): 6,
            ("llmgrpc_lora_generated_tokens_total", B): 3,
            ("llmgrpc_lora_generated_tokens_total", "not-an-adapter"): 0,
        }  # fmt: skip

    assert poll(counted, timeout=30)
    info = [labels for (name, labels) in scrape(smollm.metrics_url)
            if name == "vllm:lora_requests_info"]  # fmt: skip
    assert info and all(("max_lora", "1") in labels for labels in info)


def test_adapter_swaps_are_counted(smollm: ServerProcess) -> None:
    """One adapter slot (--max-loras 1): requests naming a, b, a, b one at a time
    swap the adapter in the slot four times, each an activation, and read
    nothing from disk (both stay in the --max-cpu-loras cache); concurrent ones
    activate a at least once more. The counts are read on scrape and cached for
    up to a second, so each phase waits for the first value after it."""
    assert poll(lambda: at_rest(smollm.metrics_url), timeout=60)

    def counts() -> tuple[float, float]:
        now = scrape(smollm.metrics_url)
        return (sample_value(now, "llmgrpc_lora_adapter_activations_total", model_name=BASE),
                sample_value(now, "llmgrpc_lora_adapter_loads_total", model_name=BASE))  # fmt: skip

    def after(
        models: list[str], before: tuple[float, float], threads: int = 1
    ) -> tuple[float, float]:
        """Serve `models`, then the first counts unlike `before`: no count is read
        while the requests run, so it is read after all of them."""
        with Client(smollm.target, timeout=300) as client, ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda m: client.generate("Hi", model=m, max_tokens=2, temperature=0.0),
                          models))  # fmt: skip
        seen = before

        def changed() -> bool:
            nonlocal seen
            seen = counts()
            return seen != before

        assert poll(changed, timeout=30), f"{models}: no swap counted"
        return seen

    # a then b: b holds the slot (activated after a), whatever held it before.
    primed = after([A, B], counts())
    rotated = after([A, B, A, B], primed)
    assert rotated[0] - primed[0] == 4
    assert rotated[1] == primed[1]  # loaded once, at startup
    interleaved = after([A, B] * 4, rotated, threads=8)
    assert 1 <= interleaved[0] - rotated[0] <= 8
    assert interleaved[1] == rotated[1]


def test_model_info_lists_the_adapters(smollm: ServerProcess) -> None:
    with Client(smollm.target) as client:
        info = client.model_info()
    assert info.lora.enabled and info.lora.max_loras == 1 and info.lora.max_lora_rank >= 8
    assert [a.name for a in info.adapters] == [A, B]
    for a in info.adapters:
        assert a.base_model == BASE and a.rank > 0 and a.target_modules and a.loaded
        assert a.source == "startup"


def test_unknown_names_are_not_found_naming_the_served_ones(smollm: ServerProcess) -> None:
    with Client(smollm.target) as client:
        for call in (lambda: client.generate("Hi", model="no-such-adapter", max_tokens=1),
                     lambda: client.tokenize("Hi", model="no-such-adapter")):  # fmt: skip
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert all(repr(n) in e.value.details() for n in (BASE, A, B)), e.value.details()
        # An adapter shares its base's tokenizer.
        assert client.tokenize("Hello there", model=A).token_ids == client.tokenize("Hello there").token_ids


def test_an_adapter_name_on_a_server_without_lora_is_failed_precondition(
    llama: ServerProcess,
) -> None:
    with Client(llama.target) as client:
        assert not client.model_info().lora.enabled
        with pytest.raises(grpc.RpcError) as e:
            client.generate("Hi", model="tiny-llama-gqa-lora-a", max_tokens=1)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--lora-modules" in e.value.details()



# --- AdminService: adapters added and removed at run time ---------------------


def _admin(server: ServerProcess, token: str | None = ADMIN_TOKEN) -> tuple[grpc.Channel, Any, tuple]:
    channel = grpc.insecure_channel(server.target)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return channel, admin_grpc.AdminServiceStub(channel), metadata


def _copy_adapter(name: str, to: str) -> None:
    source = resolve_adapter(name, default_models_dir())
    shutil.copytree(source, ADAPTER_DIR / to, dirs_exist_ok=True)


def test_admin_loads_an_adapter_once_and_serves_it(
    smollm: ServerProcess, lora_reference: dict[str, dict[str, Greedy]]
) -> None:
    """A copy of adapter a under --adapter-dir, loaded as "team-a" by two
    concurrent calls: one loads it, the other finds it loaded; requests naming
    it get adapter a's answers."""
    _copy_adapter(A, "team/a")
    channel, admin, md = _admin(smollm)
    with channel, ThreadPoolExecutor(2) as pool:
        calls = [pool.submit(admin.LoadAdapter, admin_pb.LoadAdapterRequest(name="team-a", path="team/a"),
                             metadata=md, timeout=120) for _ in range(2)]  # fmt: skip
        answers = [c.result() for c in calls]
        assert sorted(a.already_loaded for a in answers) == [False, True]
        listed = admin.ListAdapters(admin_pb.ListAdaptersRequest(), metadata=md, timeout=30)
    team = [a for a in listed.adapters if a.name == "team-a"]
    assert len(team) == 1 and team[0].source == "admin" and team[0].loaded
    with Client(smollm.target, timeout=300) as client:
        prompt = LORA_PROMPTS[0]
        _assert_matches(_ask(client, "team-a", prompt), lora_reference[A][prompt], "team-a")


def test_admin_refuses_bad_names_paths_and_adapters(smollm: ServerProcess) -> None:
    broken = ADAPTER_DIR / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text('{"r": 8, "target_modules": ["q_proj"]}')
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    channel, admin, md = _admin(smollm)
    with channel:
        before = admin.ListAdapters(admin_pb.ListAdaptersRequest(), metadata=md, timeout=30)
        for name, path, code in (
            ("x", "../../etc", grpc.StatusCode.INVALID_ARGUMENT),
            ("x", "/etc", grpc.StatusCode.INVALID_ARGUMENT),
            ("../x", "team/a", grpc.StatusCode.INVALID_ARGUMENT),
            (BASE, "team/a", grpc.StatusCode.INVALID_ARGUMENT),
            ("x", "missing", grpc.StatusCode.NOT_FOUND),
            ("x", "broken", grpc.StatusCode.FAILED_PRECONDITION),
        ):
            with pytest.raises(grpc.RpcError) as e:
                admin.LoadAdapter(admin_pb.LoadAdapterRequest(name=name, path=path), metadata=md, timeout=120)
            assert e.value.code() == code, (name, path, e.value.details())
        after = admin.ListAdapters(admin_pb.ListAdaptersRequest(), metadata=md, timeout=30)
    assert after == before  # a refused load changes nothing
    for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED), ("wrong", grpc.StatusCode.UNAUTHENTICATED)):
        channel, admin, md = _admin(smollm, token)
        with channel, pytest.raises(grpc.RpcError) as e:
            admin.ListAdapters(admin_pb.ListAdaptersRequest(), metadata=md, timeout=30)
        assert e.value.code() == code


def test_unloading_lets_running_requests_finish(smollm: ServerProcess) -> None:
    """UnloadAdapter during a stream with that adapter: new requests naming it are
    NOT_FOUND at once, the unload waits while the stream runs, and the stream
    ends normally with all its tokens."""
    _copy_adapter(B, "b-copy")
    channel, admin, md = _admin(smollm)
    tokens = 96  # seconds of float32 decoding: the stream outlives the checks below
    with channel, Client(smollm.target, timeout=300) as client:
        admin.LoadAdapter(admin_pb.LoadAdapterRequest(name="short-lived", path="b-copy"),
                          metadata=md, timeout=120)  # fmt: skip
        stream = client.stream(messages=[("user", "Write a haiku about the sea.")],
                               model="short-lived", max_tokens=tokens, ignore_eos=True,
                               temperature=0.0)  # fmt: skip
        first = next(stream)
        with ThreadPoolExecutor(1) as pool:
            unload = pool.submit(admin.UnloadAdapter,
                                 admin_pb.UnloadAdapterRequest(name="short-lived"),
                                 metadata=md, timeout=300)  # fmt: skip

            def refused() -> bool:
                try:
                    client.generate("Hi", model="short-lived", max_tokens=1)
                except grpc.RpcError as e:
                    return e.code() == grpc.StatusCode.NOT_FOUND
                return False

            assert poll(refused, timeout=60)
            assert not unload.done()  # waiting for the stream, which has tokens to go
            rest = list(stream)
            unload.result()
    assert sum(len(m.token_ids) for m in [first, *rest]) == tokens
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
