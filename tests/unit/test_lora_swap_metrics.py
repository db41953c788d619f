"""llmgrpc_lora_adapter_*_total: counts the engine's workers keep, read on
scrape at most once per max_age (each read is a round trip to the engine)."""

from __future__ import annotations

from llmgrpc_server.metrics import LoraSwapMetrics
from prometheus_client import CollectorRegistry


def _exposed(registry: CollectorRegistry) -> dict[str, float]:
    return {
        s.name: s.value
        for family in registry.collect()
        for s in family.samples
        if s.labels == {"model_name": "m"}
    }


def test_counts_are_read_on_scrape_and_kept_between_reads() -> None:
    answers = iter([(3, 1), None, (5, 2)])
    reads: list[int] = []

    def read() -> tuple[int, int] | None:
        reads.append(1)
        return next(answers)

    registry = CollectorRegistry()
    LoraSwapMetrics("m", read, registry, max_age=0)
    assert not reads, "registering reads nothing from the engine"
    want = {"llmgrpc_lora_adapter_activations_total": 3, "llmgrpc_lora_adapter_loads_total": 1}
    assert _exposed(registry) == want
    assert _exposed(registry) == want  # a failed read serves the last counts
    families = list(registry.collect())
    assert [(f.name, f.type) for f in families] == [("llmgrpc_lora_adapter_activations", "counter"),
                                                    ("llmgrpc_lora_adapter_loads", "counter")]  # fmt: skip
    assert [s.value for f in families for s in f.samples] == [5, 2]
    assert len(reads) == 3


def test_scrapes_closer_than_max_age_share_one_read() -> None:
    reads: list[int] = []

    def read() -> tuple[int, int]:
        reads.append(1)
        return len(reads), 0

    registry = CollectorRegistry()
    LoraSwapMetrics("m", read, registry, max_age=3600)
    for _ in range(5):
        assert _exposed(registry)["llmgrpc_lora_adapter_activations_total"] == 1
    assert len(reads) == 1
