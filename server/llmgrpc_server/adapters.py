"""LoRA adapters: which names a request may ask for, and what each one is.

Pure (no vLLM): `vllm_adapter.lora` turns an `Adapter` into vLLM's
LoRARequest. A request names the base model or an adapter in its `model`
field (the convention of the Gateway API Inference Extension and llm-d).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from llmgrpc_server import domain
from llmgrpc_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A NOT_FOUND message lists the known names up to this many, then counts them.
LISTED_NAMES = 8


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    base_model: str
    rank: int
    target_modules: tuple[str, ...]
    source: str  # "startup" or "admin"
    # vLLM's adapter id: unique for the server's life, never reused.
    lora_id: int = 0


def parse_lora_modules(values: Iterable[str]) -> list[tuple[str, str]]:
    """vLLM's --lora-modules syntax: NAME=PATH, or JSON {"name": ..., "path": ...}."""
    modules = []
    for value in values:
        if value.lstrip().startswith("{"):
            try:
                spec = json.loads(value)
                name, path = spec["name"], spec["path"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"--lora-modules {value!r}: not {{name: ..., path: ...}}") from e
        else:
            name, sep, path = value.partition("=")
            if not sep or not path:
                raise ValueError(f"--lora-modules {value!r}: expected NAME=PATH")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ValueError(f"--lora-modules {value!r}: a name is 1-128 of [A-Za-z0-9._-]")
        modules.append((name, str(path)))
    return modules


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidArgument(
            "name", "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )


def read_adapter(path: Path) -> tuple[int, tuple[str, ...]]:
    """Rank and target modules from PEFT's adapter_config.json, or FailedPrecondition."""
    config_file = path / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text())
        rank, targets = int(config["r"]), config["target_modules"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FailedPrecondition(f"{path} is not a PEFT LoRA adapter: {e}") from e
    if not (path / "adapter_model.safetensors").is_file():
        raise FailedPrecondition(f"{path} has no adapter_model.safetensors")
    if isinstance(targets, str):  # PEFT allows one regex
        targets = [targets]
    return rank, tuple(sorted(str(t) for t in targets))


def under(root: Path, relative: str) -> Path:
    """`relative` inside `root`, symlinks resolved; InvalidArgument for anything
    that leaves it (.., an absolute path, a symlink pointing out)."""
    base = root.resolve()
    target = (base / relative).resolve()
    if not relative or Path(relative).is_absolute() or not target.is_relative_to(base):
        raise InvalidArgument("path", "must name a directory under the server's --adapter-dir")
    if not target.is_dir():
        raise NotFound(f"no adapter directory {relative!r} under the server's --adapter-dir")
    return target


class Registry:
    """The adapters a server serves, by name."""

    def __init__(
        self, base_names: tuple[str, ...], *, enabled: bool,
        known_elsewhere: Callable[[str], bool] = lambda name: False, capacity: int = 0,
    ) -> None:  # fmt: skip
        self.base_names = base_names
        self.enabled = enabled
        # At most this many adapters (0: no limit): --max-loras + --max-cpu-loras,
        # which bounds the adapter label of the metrics too.
        self.capacity = capacity
        # Names that are adapters somewhere (built-in demo adapters): asked of a
        # server without LoRA they are FAILED_PRECONDITION, not NOT_FOUND.
        self._known_elsewhere = known_elsewhere
        self._adapters: dict[str, Adapter] = {}
        self._next_id = 1

    def __len__(self) -> int:
        return len(self._adapters)

    def all(self) -> tuple[Adapter, ...]:
        return tuple(self._adapters[n] for n in sorted(self._adapters))

    def prepare(self, name: str, path: Path, source: str) -> tuple[Adapter, bool]:
        """The adapter to add (not yet added) and whether it is already there."""
        check_name(name)
        if not self.enabled:
            raise FailedPrecondition("this server runs without LoRA (--enable-lora)")
        if name in self.base_names:
            raise InvalidArgument("name", f"{name!r} is the base model's name")
        existing = self._adapters.get(name)
        if existing is not None:
            if existing.path == path:
                return existing, True
            raise AlreadyExists(f"adapter {name!r} is loaded from another path")
        if self.capacity and len(self._adapters) >= self.capacity:
            raise FailedPrecondition(
                f"the server serves its most adapters, {self.capacity} (--max-loras + "
                "--max-cpu-loras): unload one first"
            )
        rank, targets = read_adapter(path)
        adapter = Adapter(name, path, self.base_names[0], rank, targets, source, self._next_id)
        self._next_id += 1
        return adapter, False

    def add(self, adapter: Adapter) -> None:
        self._adapters[adapter.name] = adapter

    def remove(self, name: str) -> Adapter:
        adapter = self._adapters.pop(name, None)
        if adapter is None:
            raise NotFound(f"no adapter {name!r} is loaded")
        return adapter

    def lookup(self, name: str | None) -> Adapter | None:
        """The adapter a request names; None for the base model."""
        if not name or name in self.base_names:
            return None
        adapter = self._adapters.get(name)
        if adapter is not None:
            return adapter
        if not self.enabled and self._known_elsewhere(name):
            raise FailedPrecondition(
                f"{name!r} is a LoRA adapter and this server runs without LoRA: "
                "start it with --lora-modules or --enable-lora"
            )
        names = [*self.base_names, *sorted(self._adapters)]
        served = ", ".join(repr(n) for n in names[:LISTED_NAMES])
        if len(names) > LISTED_NAMES:
            served += f" and {len(names) - LISTED_NAMES} more (GetModelInfo lists them)"
        raise NotFound(f"model {name!r} is not served here; this server serves {served}")

    def infos(self) -> tuple[domain.AdapterInfo, ...]:
        return tuple(self.info(a) for a in self.all())

    @staticmethod
    def info(a: Adapter) -> domain.AdapterInfo:
        """Every registered adapter was loaded into the engine (add_lora); the
        engine may evict one from its cache and reloads it when asked."""
        return domain.AdapterInfo(
            name=a.name, base_model=a.base_model, rank=a.rank,
            target_modules=a.target_modules, loaded=True, source=a.source,
        )  # fmt: skip
