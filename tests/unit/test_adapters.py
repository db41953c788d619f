"""Which LoRA names a request may use, and what a server refuses (llmgrpc_server.adapters)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llmgrpc_server.adapters import Registry, parse_lora_modules, read_adapter, under
from llmgrpc_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound


def _adapter(directory: Path, rank: int = 8) -> Path:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(
        json.dumps({"r": rank, "target_modules": ["v_proj", "q_proj"], "peft_type": "LORA"})
    )
    (directory / "adapter_model.safetensors").write_bytes(b"")
    return directory


def test_lora_modules_take_vllms_two_forms() -> None:
    assert parse_lora_modules(["a=/x", '{"name": "b", "path": "/y"}']) == [("a", "/x"), ("b", "/y")]
    for bad in ("a", "=/x", "a=", '{"name": "c"}', "../a=/x", '{"name": 3, "path": "/y"}'):
        with pytest.raises(ValueError, match="--lora-modules"):
            parse_lora_modules([bad])


def test_registry_resolves_names(tmp_path: Path) -> None:
    registry = Registry(("base",), enabled=True)
    adapter, existing = registry.prepare("a", _adapter(tmp_path / "a"), "startup")
    assert not existing and adapter.rank == 8 and adapter.target_modules == ("q_proj", "v_proj")
    registry.add(adapter)
    assert registry.lookup("") is None and registry.lookup("base") is None
    assert registry.lookup("a") is adapter
    # The same name from the same path again: nothing to do; from another: refused.
    assert registry.prepare("a", tmp_path / "a", "admin") == (adapter, True)
    with pytest.raises(AlreadyExists):
        registry.prepare("a", _adapter(tmp_path / "other"), "admin")
    with pytest.raises(InvalidArgument):
        registry.prepare("base", tmp_path / "a", "admin")
    with pytest.raises(NotFound, match="this server serves 'base', 'a'"):
        registry.lookup("b")
    # ids are never reused
    second, _ = registry.prepare("b", tmp_path / "other", "admin")
    assert second.lora_id == adapter.lora_id + 1
    assert registry.remove("a") is adapter
    with pytest.raises(NotFound):
        registry.lookup("a")


def test_not_found_counts_the_names_beyond_eight(tmp_path: Path) -> None:
    registry = Registry(("base",), enabled=True)
    path = _adapter(tmp_path / "x")
    for i in range(12):
        registry.add(registry.prepare(f"a{i:02d}", path, "admin")[0])
    with pytest.raises(NotFound, match="and 5 more"):
        registry.lookup("nope")


def test_without_lora_a_known_adapter_name_is_failed_precondition() -> None:
    registry = Registry(("base",), enabled=False, known_elsewhere={"base-lora-a"}.__contains__)
    with pytest.raises(FailedPrecondition, match="without LoRA"):
        registry.lookup("base-lora-a")
    with pytest.raises(NotFound, match="this server serves 'base'"):
        registry.lookup("something-else")


def test_a_directory_that_is_no_adapter_is_failed_precondition(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FailedPrecondition, match="not a PEFT LoRA adapter"):
        read_adapter(tmp_path / "empty")
    broken = _adapter(tmp_path / "broken")
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(FailedPrecondition, match=r"adapter_model\.safetensors"):
        read_adapter(broken)


def test_paths_stay_under_the_adapter_dir(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    inside = _adapter(root / "team" / "a")
    assert under(root, "team/a") == inside.resolve()
    outside = _adapter(tmp_path / "secret")
    (root / "link").symlink_to(outside)
    for escape in ("../secret", str(outside), "link", "team/../../secret", ""):
        with pytest.raises(InvalidArgument):
            under(root, escape)
    with pytest.raises(NotFound):
        under(root, "team/missing")


def test_the_registry_holds_at_most_its_capacity(tmp_path: Path) -> None:
    """--max-loras + --max-cpu-loras adapters at most: the bound of the adapter label."""
    registry = Registry(("base",), enabled=True, capacity=1)
    path = _adapter(tmp_path / "x")
    registry.add(registry.prepare("a", path, "startup")[0])
    assert registry.prepare("a", path, "admin")[1]  # the same one again is fine
    with pytest.raises(FailedPrecondition, match="unload one first"):
        registry.prepare("b", path, "admin")
