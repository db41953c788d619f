"""Prometheus metrics of the service (vLLM registers its own `vllm:*`).

Everything lives in prometheus_client's default registry, which vLLM's stat
logger also uses, so one `/metrics` endpoint serves engine, gRPC and service
metrics together. Names follow go-grpc-prometheus for gRPC and `llmgrpc_*`
for the service's own.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

# /metrics may be scraped many times a second; each read of the LoRA swap
# counts is a round trip to the engine's workers (LoraSwapMetrics).
LORA_SWAPS_MAX_AGE = 1.0

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640,
)  # fmt: skip


class GrpcMetrics:
    """go-grpc-prometheus compatible server metrics."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started_total", "RPCs started on the server.", labels, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, regardless of success or failure.",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from receiving an RPC to its completion.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received_total", "Messages received from clients.", labels,
            registry=registry,
        )
        self.msg_sent = Counter(
            "grpc_server_msg_sent_total", "Messages sent to clients.", labels, registry=registry
        )


class ServiceMetrics:
    """The service's own metrics, labelled with the served model's name."""

    def __init__(
        self, model_name: str, registry: CollectorRegistry = REGISTRY, frontend: int = 0
    ) -> None:
        self.model_name = model_name
        m = ["model_name"]
        # Which front-end process took the call (--api-server-count: the kernel
        # spreads connections, so a few busy channels can load one of them).
        self._frontend_calls = Counter(
            "llmgrpc_frontend_calls_total",
            "LLMService calls taken by each front-end process (0 .. --api-server-count - 1).",
            [*m, "frontend"],
            registry=registry,
        ).labels(model_name, str(frontend))
        self._active_streams = Gauge(
            "llmgrpc_active_streams", "GenerateStream calls in progress.", m, registry=registry,
            multiprocess_mode="livesum",  # --api-server-count: all front ends' streams
        ).labels(model_name)
        self._cancelled = Counter(
            "llmgrpc_requests_cancelled_total",
            "Requests cancelled by the client (the engine request is aborted).",
            [*m, "grpc_method"],
            registry=registry,
        )
        self._deadline = Counter(
            "llmgrpc_requests_deadline_exceeded_total",
            "Requests whose gRPC deadline expired (the engine request is aborted).",
            [*m, "grpc_method"],
            registry=registry,
        )
        self._engine_failures = Counter(
            "llmgrpc_engine_failures_total",
            "Requests the engine failed, gave up on, or refused at its own queue limits; "
            "reason: ENGINE_ERROR, ENGINE_ERROR_RETRYABLE, ENGINE_ABORT, "
            "UNKNOWN_FINISH_REASON, ENGINE_QUEUE_FULL.",
            [*m, "grpc_method", "reason"],
            registry=registry,
        )
        self._streamed = Counter(
            "llmgrpc_streamed_tokens_total",
            "Tokens sent in GenerateStream messages, including those of requests "
            "that were later cancelled or failed.",
            m,
            registry=registry,
        ).labels(model_name)
        self._generated = Counter(
            "llmgrpc_generated_tokens_total",
            "Tokens produced by the engine for this service's requests.",
            [*m, "grpc_method"],
            registry=registry,
        )
        # Calls naming a LoRA adapter, by adapter: the label takes only names
        # the server serves (an unknown name fails before the first token), at
        # most --max-loras + --max-cpu-loras of them at a time.
        self._lora_requests = Counter(
            "llmgrpc_lora_requests_total",
            "Generate and GenerateStream calls that named a LoRA adapter and reached the engine.",
            [*m, "lora_adapter", "grpc_method"],
            registry=registry,
        )
        self._lora_tokens = Counter(
            "llmgrpc_lora_generated_tokens_total",
            "Tokens the engine produced for calls naming a LoRA adapter.",
            [*m, "lora_adapter"],
            registry=registry,
        )
        self._tokenize = Counter(
            "llmgrpc_tokenize_requests_total", "Tokenize calls.", m, registry=registry
        ).labels(model_name)
        self.model_info = Gauge(
            "llmgrpc_model_info",
            "Facts about the served model (value 1; the facts are labels).",
            [
                "model_name", "architecture", "model_type", "attention_kind", "num_layers",
                "num_attention_heads", "num_kv_heads", "gqa_group_size", "num_experts",
                "experts_per_token", "max_model_len", "dtype", "kv_cache_bytes_per_token",
                "total_parameters", "active_parameters",
            ],
            registry=registry,
            multiprocess_mode="max",  # --api-server-count: one series, not one per front end
        )  # fmt: skip

    def frontend_call(self) -> None:
        self._frontend_calls.inc()

    @contextmanager
    def active_stream(self) -> Iterator[None]:
        self._active_streams.inc()
        try:
            yield
        finally:
            self._active_streams.dec()

    def token_counter(self, method: str, adapter: str | None = None) -> Callable[[int], None]:
        """A function counting the tokens of each message of one `method` call:
        the labelled children are looked up once per call, not per message. A
        call naming an adapter counts as that adapter's at its first message."""
        generated = self._generated.labels(self.model_name, method)
        streamed = self._streamed if method == "GenerateStream" else None
        lora: Any = None

        def count(n: int) -> None:
            nonlocal lora
            if adapter is not None and lora is None:
                self._lora_requests.labels(self.model_name, adapter, method).inc()
                lora = self._lora_tokens.labels(self.model_name, adapter)
            if n:
                generated.inc(n)
                if streamed is not None:
                    streamed.inc(n)
                if lora is not None:
                    lora.inc(n)

        return count

    def tokenize_called(self) -> None:
        self._tokenize.inc()

    def cancelled(self, method: str) -> None:
        self._cancelled.labels(self.model_name, method).inc()

    def deadline_exceeded(self, method: str) -> None:
        self._deadline.labels(self.model_name, method).inc()

    def engine_failed(self, method: str, reason: str) -> None:
        self._engine_failures.labels(self.model_name, method, reason).inc()

    def set_model_info(self, labels: dict[str, str]) -> None:
        self.model_info.labels(model_name=self.model_name, **labels).set(1)


class LoraSwapMetrics(Collector):
    """LoRA adapter swaps, which the engine's workers count: `read()` gives
    (activations, loads) or None when they did not answer. Read on scrape, at
    most once per `max_age` s; in between, and after a failed read, the last
    counts are served."""

    def __init__(
        self, model_name: str, read: Callable[[], tuple[int, int] | None],
        registry: CollectorRegistry = REGISTRY, max_age: float = LORA_SWAPS_MAX_AGE,
    ) -> None:  # fmt: skip
        self._model_name = model_name
        self._read = read
        self._max_age = max_age
        self._lock = threading.Lock()
        self._counts = (0, 0)
        self._read_at = -math.inf
        registry.register(self)

    def describe(self) -> Iterator[CounterMetricFamily]:
        """The families without reading the counts (called at registration)."""
        return self._families((0, 0), with_samples=False)

    def collect(self) -> Iterator[CounterMetricFamily]:
        with self._lock:
            now = time.monotonic()
            if now - self._read_at >= self._max_age:
                self._counts = self._read() or self._counts
                self._read_at = now  # after a failure too: a stalled engine is asked less
            counts = self._counts
        return self._families(counts, with_samples=True)

    def _families(
        self, counts: tuple[int, int], *, with_samples: bool
    ) -> Iterator[CounterMetricFamily]:
        activations = CounterMetricFamily(
            "llmgrpc_lora_adapter_activations",
            "LoRA adapters copied into one of the engine's --max-loras slots, counted "
            "since the server started serving.",
            labels=["model_name"],
        )
        loads = CounterMetricFamily(
            "llmgrpc_lora_adapter_loads",
            "LoRA adapters read from disk into the engine's --max-cpu-loras cache, "
            "counted since the server started serving.",
            labels=["model_name"],
        )
        if with_samples:
            activations.add_metric([self._model_name], counts[0])
            loads.add_metric([self._model_name], counts[1])
        yield activations
        yield loads
