"""The embedded LoRA adapters (llmgrpc_server.models.adapters), engine-free: PEFT's
own format (peft loads every tensor; its own config writer writes the same
JSON), what vLLM's PEFTHelper reads and accepts, deterministic rebuilds, and a
visible effect on transformers' greedy output. The service's output with them
is checked in tests/integration/test_lora.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from llmgrpc_server.models import (
    EMBEDDED,
    default_models_dir,
    ensure_built,
    resolve_adapter,
)
from llmgrpc_server.models.adapters import ADAPTERS, AdapterSpec

from tests.lora_reference import greedy_with_adapter, load
from tests.smollm_reference import CHAT_PROMPTS, TEXT_PROMPTS, Greedy

# Four, as SmolLM2 takes ~1 s for 16 tokens on two cores.
PROMPTS = [(p, True) for p in CHAT_PROMPTS[:3]] + [(TEXT_PROMPTS[0], False)]
BASES = sorted({spec.base for spec in ADAPTERS.values()})


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each adapter, built into a directory of its own (bases from the model cache)."""
    out = {}
    for name, spec in ADAPTERS.items():
        out[name] = tmp_path_factory.mktemp(name)
        spec.build(out[name], default_models_dir())
    return out


@pytest.fixture(scope="module")
def answers(built: dict[str, Path]) -> dict[str, dict[str, Greedy]]:
    """Greedy answers (transformers + peft, float32, 16 tokens) by model or adapter name."""
    result = {}
    for base in BASES:
        base_dir = ensure_built(EMBEDDED[base], default_models_dir())
        result[base] = greedy_with_adapter(base_dir, None, PROMPTS)
        for name in (f"{base}-lora-a", f"{base}-lora-b"):
            result[name] = greedy_with_adapter(base_dir, built[name], PROMPTS)
    return result


def test_every_base_but_the_moe_one_has_two() -> None:
    assert sorted(ADAPTERS) == [f"{b}-lora-{x}" for b in BASES for x in "ab"]
    assert BASES == ["smollm2-135m-instruct", "tiny-llama-gqa"]


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_peft_loads_every_tensor(name: str, built: dict[str, Path]) -> None:
    """No missing key (peft's warning is an error in `load`) and no unexpected one:
    the model's LoRA parameters are exactly the file's tensors, shapes and values."""
    from safetensors.torch import load_file

    spec = ADAPTERS[name]
    base_dir = ensure_built(EMBEDDED[spec.base], default_models_dir())
    model, _ = load(base_dir, built[name])
    ours = load_file(built[name] / "adapter_model.safetensors")
    loaded = {k.replace(".default.", "."): v for k, v in model.state_dict().items() if "lora_" in k}
    assert set(loaded) == set(ours)
    for key, tensor in ours.items():
        assert loaded[key].equal(tensor), key
    config = json.loads((base_dir / "config.json").read_text())
    assert len(ours) == 2 * config["num_hidden_layers"] * len(spec.target_modules)
    a = next(k for k in ours if k.endswith(".lora_A.weight"))
    assert a.startswith("base_model.model.model.layers.0.") and ours[a].shape[0] == spec.rank


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_config_is_what_peft_writes(name: str, built: dict[str, Path], tmp_path: Path) -> None:
    """Key for key what peft's LoraConfig.save_pretrained writes with the same
    settings (a newer peft with new keys fails here: update the mirror)."""
    from peft import LoraConfig

    spec = ADAPTERS[name]
    LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules),
        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        base_model_name_or_path=spec.base, inference_mode=True,
    ).save_pretrained(tmp_path)  # fmt: skip
    theirs = json.loads((tmp_path / "adapter_config.json").read_text())
    ours = json.loads((built[name] / "adapter_config.json").read_text())
    assert ours.pop("target_modules") == sorted(theirs.pop("target_modules"))
    ours.pop("peft_version"), theirs.pop("peft_version")
    assert ours == theirs


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_vllm_reads_and_accepts_it(name: str, built: dict[str, Path]) -> None:
    """vLLM's PEFTHelper (what the engine reads from adapter_config.json) and its
    checks, and its parser of the tensor names; no engine is started."""
    from safetensors import safe_open
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import parse_fine_tuned_lora_name

    spec = ADAPTERS[name]
    helper = PEFTHelper.from_local_dir(str(built[name]), max_position_embeddings=None)
    helper.validate_legal(LoRAConfig(max_lora_rank=16))
    assert (helper.r, helper.lora_alpha, helper.bias, helper.modules_to_save) == (
        spec.rank, spec.alpha, "none", None)  # fmt: skip
    assert sorted(helper.target_modules) == sorted(spec.target_modules)
    assert helper.vllm_lora_scaling_factor == spec.alpha / spec.rank
    with safe_open(built[name] / "adapter_model.safetensors", "np") as f:
        modules = {parse_fine_tuned_lora_name(k)[0].rsplit(".", 1)[-1] for k in f.keys()}  # noqa: SIM118
    assert modules == set(spec.target_modules)


def test_rebuilds_are_byte_identical(built: dict[str, Path], tmp_path: Path) -> None:
    for name, spec in ADAPTERS.items():
        again = tmp_path / name
        again.mkdir()
        spec.build(again, default_models_dir())
        assert _digests(again) == _digests(built[name]), name
        for path in again.iterdir():
            assert oct(path.stat().st_mode & 0o777) == "0o644", path


def test_the_output_changes(answers: dict[str, dict[str, Greedy]]) -> None:
    """Each adapter changes greedy output on most prompts, a differs from b, and
    SmolLM2 with either still writes text (English prompts: printable ASCII,
    where a broken model writes emoji and stray scripts)."""
    prompts = [p for p, _ in PROMPTS]
    for base in BASES:
        a, b = answers[f"{base}-lora-a"], answers[f"{base}-lora-b"]
        for name, got in ((f"{base}-lora-a", a), (f"{base}-lora-b", b)):
            changed = [p for p in prompts if got[p].token_ids != answers[base][p].token_ids]
            assert len(changed) >= 3, (name, changed)
        assert sum(a[p].token_ids != b[p].token_ids for p in prompts) >= 3, base
    for name in ("smollm2-135m-instruct-lora-a", "smollm2-135m-instruct-lora-b"):
        for prompt, greedy in answers[name].items():
            ascii_text = sum(c.isascii() and (c.isprintable() or c.isspace()) for c in greedy.text)
            assert ascii_text >= 0.9 * len(greedy.text) and len(greedy.token_ids) >= 5, (
                name, prompt, greedy.text)  # fmt: skip


def test_resolve_adapter_builds_once(built: dict[str, Path]) -> None:
    """`make install` builds them into the model cache beside their bases; the
    cached copy is the same bytes, and a second call does not rebuild it."""
    name = "tiny-llama-gqa-lora-a"
    path = resolve_adapter(name, default_models_dir())
    marker = json.loads((path / "llmgrpc-build.json").read_text())
    assert marker == {"fingerprint": ADAPTERS[name].fingerprint(), "name": name}
    files = {k: v for k, v in _digests(path).items() if k != "llmgrpc-build.json"}
    assert files == _digests(built[name])
    mtime = (path / "adapter_model.safetensors").stat().st_mtime_ns
    assert resolve_adapter(name, default_models_dir()) == path
    assert (path / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="not an embedded adapter"):
        resolve_adapter("tiny-mixtral-moe-lora-a", default_models_dir())


def test_specs_are_checked() -> None:
    with pytest.raises(ValueError, match="no embedded base"):
        AdapterSpec(name="x", base="no-such-model")
    with pytest.raises(ValueError, match="unknown"):
        AdapterSpec(name="x", base="tiny-llama-gqa", target_modules=("lm_head",))
