"""Read a Prometheus /metrics endpoint into {(name, labels): value}."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Sample = dict[tuple[str, frozenset[tuple[str, str]]], float]
SERVICE = "llmgrpc.v1.LLMService"


def scrape(url: str, timeout: float = 10.0) -> Sample:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(url: str, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sample_value(scrape(url), name, **labels)


def sample_value(sample: Sample, name: str, **labels: str) -> float:
    """`value()` on a sample already scraped (one scrape for several numbers)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in sample.items() if n == name and want <= ls)


def at_rest(url: str) -> bool:
    """Every call the server started has ended, and the engine holds nothing.

    On a shared server, a test that compares counters before and after its
    own calls waits for this first: then no earlier test's call can still be
    counted in between (tests run one at a time).
    """
    s = scrape(url)
    started = sample_value(s, "grpc_server_started_total", grpc_service=SERVICE)
    handled = sample_value(s, "grpc_server_handled_total", grpc_service=SERVICE)
    return started == handled and not any(
        sample_value(s, gauge) for gauge in ("llmgrpc_active_streams", "vllm:num_requests_running",
                                             "vllm:num_requests_waiting")
    )  # fmt: skip
