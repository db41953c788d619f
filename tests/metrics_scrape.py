"""Read a Prometheus /metrics endpoint into {(name, labels): value}."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(url: str, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sample_value(scrape(url), name, **labels)


def sample_value(sample: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
                 **labels: str) -> float:  # fmt: skip
    """`value()` on a sample already scraped (one scrape for several numbers)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in sample.items() if n == name and want <= ls)
