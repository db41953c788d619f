"""The PromQL of the Grafana dashboard and the alert rules, ready to run.

Static tests use it to check the expressions; the live-Prometheus integration test
uses it to run every one of them against a real server. Grafana's template
variables are replaced by values a bare Prometheus accepts (`$__rate_interval`
becomes a fixed range, `$model_name` and `$pod` become `.*`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "llmgrpc.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"

# Every metric the server exposes on /metrics, with its Prometheus type, as named in
# docs/observability.md. Histograms are listed by family name (the _bucket, _sum and
# _count series are implied).
METRICS: dict[str, str] = {
    # vLLM's own (AsyncLLM's Prometheus stat logger)
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:prefix_cache_queries_total": "counter",
    "vllm:prefix_cache_hits_total": "counter",
    "vllm:num_preemptions_total": "counter",
    "vllm:prompt_tokens_total": "counter",
    "vllm:generation_tokens_total": "counter",
    "vllm:request_success_total": "counter",
    "vllm:cache_config_info": "gauge",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram",
    "vllm:lora_requests_info": "gauge",
    # gRPC server, go-grpc-prometheus convention
    "grpc_server_started_total": "counter",
    "grpc_server_handled_total": "counter",
    "grpc_server_handling_seconds": "histogram",
    "grpc_server_msg_received_total": "counter",
    "grpc_server_msg_sent_total": "counter",
    # the service's own
    "llmgrpc_active_streams": "gauge",
    "llmgrpc_requests_cancelled_total": "counter",
    "llmgrpc_requests_deadline_exceeded_total": "counter",
    "llmgrpc_engine_failures_total": "counter",
    "llmgrpc_streamed_tokens_total": "counter",
    "llmgrpc_generated_tokens_total": "counter",
    "llmgrpc_tokenize_requests_total": "counter",
    "llmgrpc_frontend_calls_total": "counter",
    "llmgrpc_lora_requests_total": "counter",
    "llmgrpc_lora_generated_tokens_total": "counter",
    "llmgrpc_lora_adapter_activations_total": "counter",
    "llmgrpc_lora_adapter_loads_total": "counter",
    "llmgrpc_model_info": "gauge",
}

# Series Prometheus makes itself for every target.
SYNTHETIC_METRICS = frozenset({"up"})

DEFAULT_VARIABLES: Mapping[str, str] = {"model_name": ".*", "pod": ".*"}

_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "atan2",
        "inf",
        "nan",
    }
)
_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_NUMBER = re.compile(r"^(?:bool\s+)?[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?$")


def substitute(
    expr: str, *, rate_interval: str = "1m", variables: Mapping[str, str] | None = None
) -> str:
    """`expr` with Grafana's variables replaced, so Prometheus itself can run it."""
    values = {
        "__rate_interval": rate_interval,
        "__interval": rate_interval,
        "__range": rate_interval,
        **DEFAULT_VARIABLES,
        **(variables or {}),
    }

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise ValueError(f"unknown template variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (histogram series keep their suffix)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )  # grouping label lists
    names = set()
    for match in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        name, is_call = match.group(1), match.group(2)
        if is_call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def family(name: str) -> str:
    """The documented family of a series name (`x_bucket` -> `x` for histograms)."""
    for suffix in _HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and METRICS.get(base) == "histogram":
            return base
    return name


def strip_threshold(expr: str) -> str:
    """The signal an alert compares: `absent(X == 1)` -> `X`, `X > 0.95` -> `X`.

    An alert expression that returns nothing is healthy, so a "returns data" check
    has to run the signal instead. Raises ValueError for any other shape.
    """
    text = expr.strip()
    if text.startswith("absent(") and _closing_paren(text, len("absent")) == len(text) - 1:
        text = text[len("absent(") : -1].strip()
    cut = _last_top_level_comparison(text)
    if cut is None:
        raise ValueError(f"no top-level `<signal> <op> <number>` in {expr!r}")
    start, end = cut
    if not _NUMBER.match(text[end:].strip()):
        raise ValueError(f"threshold is not a number in {expr!r}")
    return text[:start].strip()


def dashboard_queries(
    path: Path | str = DASHBOARD,
    *,
    rate_interval: str = "1m",
    variables: Mapping[str, str] | None = None,
) -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel, variables substituted."""
    dashboard = json.loads(Path(path).read_text())
    return [
        (
            panel["title"],
            substitute(target["expr"], rate_interval=rate_interval, variables=variables),
        )
        for panel in iter_panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def alert_queries(path: Path | str = ALERTS) -> list[tuple[str, str]]:
    """(alert name, expr) for every alerting rule, exactly as Prometheus evaluates it."""
    return [(rule["alert"], rule["expr"].strip()) for rule in _alert_rules(path)]


def alert_signals(path: Path | str = ALERTS) -> list[tuple[str, str]]:
    """(alert name, signal) for every alerting rule: the expr without its threshold.

    Use this, not `alert_queries`, to assert each rule's input returns data on a
    healthy server (where every alert expression is, by design, empty).
    """
    return [(name, strip_threshold(expr)) for name, expr in alert_queries(path)]


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def _alert_rules(path: Path | str) -> list[dict[str, Any]]:
    doc = yaml.safe_load(Path(path).read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def _scan_top_level(text: str) -> Iterator[int]:
    """Indexes of the characters of `text` outside brackets and string literals."""
    depth, quote, i = 0, "", 0
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0:
            yield i
        i += 1


def _closing_paren(text: str, open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return -1


def _last_top_level_comparison(text: str) -> tuple[int, int] | None:
    found = None
    top = set(_scan_top_level(text))
    i = 0
    while i < len(text):
        if i in top:
            op = next((op for op in _COMPARISONS if text.startswith(op, i)), None)
            if op and all(j in top for j in range(i, i + len(op))):
                found = (i, i + len(op))
                i += len(op)
                continue
        i += 1
    return found
