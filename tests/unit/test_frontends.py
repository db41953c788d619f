"""--api-server-count: what several front ends refuse, checked before anything starts
(the processes themselves: tests/integration/test_frontends.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from llmgrpc_server.config import ServerConfig
from llmgrpc_server.vllm_adapter.frontends import check


def _args(nnodes: int = 1, data_parallel_size: int = 1) -> SimpleNamespace:
    return SimpleNamespace(nnodes=nnodes, data_parallel_size=data_parallel_size)


def test_one_or_more_front_ends_on_one_engine() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1)
    check(config, _args(), 1)
    check(config, _args(), 4)
    with pytest.raises(ValueError, match="--api-server-count must be >= 1"):
        check(config, _args(), 0)


@pytest.mark.parametrize(
    ("config_kw", "args", "flag"),
    [({"admin_tokens": ("t",)}, _args(), "--admin-token-file"),
     ({}, _args(nnodes=2), "--nnodes"),
     ({}, _args(data_parallel_size=2), "--data-parallel-size")],
)  # fmt: skip
def test_what_several_front_ends_refuse(config_kw: dict, args: SimpleNamespace, flag: str) -> None:
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, **config_kw)
    check(config, args, 1)  # one front end: all fine
    with pytest.raises(ValueError, match=flag):
        check(config, args, 2)


def test_the_engine_listeners_live_until_the_engine_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vLLM's EngineZmqListeners unlinks its ipc paths when cleaned up or
    collected; the engine's output sockets connect after its handshake, so the
    paths must outlive the start (when they did not, every call hung: the
    engine's answers had nowhere to go). The manager holds them while it
    supervises and removes them after the engine stops."""
    from llmgrpc_server.vllm_adapter import frontends

    events: list[str] = []

    class Listeners:
        def cleanup(self) -> None:
            events.append("listeners cleaned up")

    class EngineManager:
        def shutdown(self, timeout: float) -> None:
            events.append("engine stopped")

    def launch(config: ServerConfig, engine_args: object, count: int, procs: list) -> tuple:
        return EngineManager(), Listeners()

    def supervise(procs: list, metrics_dir: str) -> int:
        events.append("supervising")
        return frontends.EXIT_FAILED

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # run() sets it; restored after
    monkeypatch.setattr(frontends, "_launch", launch)
    monkeypatch.setattr(frontends, "_supervise", supervise)
    monkeypatch.setattr(frontends, "_raise_on_signals", lambda: None)  # the test's own
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1)
    assert frontends.run(config, object(), 2) == frontends.EXIT_FAILED
    assert events == ["supervising", "engine stopped", "listeners cleaned up"]
