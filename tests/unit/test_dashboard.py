"""Static checks of the Grafana dashboard (deploy/grafana/llmgrpc.json).

Whether each query returns data is checked against a live Prometheus in the
integration tests; here: structure, layout, variables, metric names, PromQL syntax.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from tests import promql

DOCS = promql.REPO / "docs" / "observability.md"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRID_COLUMNS = 24
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range"}
MODEL = 'model_name=~"$model_name"'
POD = 'pod=~"$pod"'
# grpc_server_*, vllm:cache_config_info and vllm:lora_requests_info carry no
# model_name label: their selectors are kept to the targets that serve the
# selected models.
SCOPE = 'and on (job, instance) llmgrpc_model_info{model_name=~"$model_name", pod=~"$pod"}'
UNSCOPED = ("grpc_server_", "vllm:cache_config_info", "vllm:lora_requests_info")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(promql.DASHBOARD.read_text())


@pytest.fixture(scope="module")
def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in promql.iter_panels(dashboard) if p["type"] != "row"]


@pytest.fixture(scope="module")
def exprs(panels: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(title, raw expr) with Grafana's variables left in."""
    return [(p["title"], t["expr"]) for p in panels for t in p["targets"]]


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def test_is_a_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] == "llmgrpc"
    assert dashboard["title"]
    assert dashboard["id"] is None, "an exported dashboard must not pin a database id"
    ids = [p["id"] for p in promql.iter_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_panel_queries_the_datasource_variable(panels: list[dict[str, Any]]) -> None:
    assert panels
    for panel in panels:
        title = panel["title"]
        assert title, f"panel {panel['id']} has no title"
        assert panel["type"] in {"timeseries", "stat", "table", "gauge", "bargauge"}, title
        assert panel["datasource"] == DATASOURCE, title
        assert panel["targets"], f"{title}: no target"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"{title}: duplicate refId"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"{title}: empty expr"
            assert target.get("datasource", DATASOURCE) == DATASOURCE, title


def test_grid_fits_24_columns_without_overlap(dashboard: dict[str, Any]) -> None:
    boxes = []
    for panel in promql.iter_panels(dashboard):
        g = panel["gridPos"]
        assert g["w"] > 0 and g["h"] > 0, panel["title"]
        assert g["x"] >= 0 and g["y"] >= 0, panel["title"]
        assert g["x"] + g["w"] <= GRID_COLUMNS, f"{panel['title']} overflows the 24 columns"
        if panel["type"] == "row":
            assert (g["x"], g["w"], g["h"]) == (0, GRID_COLUMNS, 1), panel["title"]
        boxes.append((panel["title"], g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"]))
    for a, b in itertools.combinations(boxes, 2):
        overlap = a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]
        assert not overlap, f"panels {a[0]!r} and {b[0]!r} overlap"


def test_every_panel_sits_under_a_row(dashboard: dict[str, Any]) -> None:
    top = dashboard["panels"]
    assert top[0]["type"] == "row", "the dashboard starts with a row"
    ordered = sorted(top, key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    assert ordered == top, "panels are listed in reading order (Grafana's export order)"


def test_variables(dashboard: dict[str, Any]) -> None:
    v = variables(dashboard)
    assert v["datasource"]["type"] == "datasource"
    assert v["datasource"]["query"] == "prometheus"

    model = v["model_name"]
    assert model["type"] == "query"
    assert model["datasource"] == DATASOURCE
    assert model["definition"] == "label_values(vllm:num_requests_running, model_name)"
    assert model["query"]["query"] == model["definition"]

    pod = v["pod"]
    assert pod["type"] == "query"
    assert pod["datasource"] == DATASOURCE
    assert pod["definition"] == f"label_values(vllm:num_requests_running{{{MODEL}}}, pod)"
    assert pod["query"]["query"] == pod["definition"]
    # A bare Prometheus scrape has no pod label; only the regex .* matches that.
    assert pod["includeAll"] is True
    assert pod["allValue"] == ".*"
    assert pod["current"]["value"] == ["$__all"]


def test_every_variable_used_is_defined(dashboard: dict[str, Any], exprs: list) -> None:
    defined = set(variables(dashboard)) | BUILTIN_VARIABLES
    texts = (
        [e for _, e in exprs]
        + [json.dumps(p["datasource"]) for p in promql.iter_panels(dashboard) if "datasource" in p]
        + [v.get("definition", "") for v in dashboard["templating"]["list"]]
    )
    used = {
        m.group(1) or m.group(2)
        for text in texts
        for m in re.finditer(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", text)
    }
    assert used - defined == set()
    assert {"datasource", "model_name", "pod"} <= used


def test_every_metric_is_a_documented_one(exprs: list[tuple[str, str]]) -> None:
    for title, expr in exprs:
        names = promql.metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        unknown = {n for n in names if promql.family(n) not in promql.METRICS}
        assert not unknown, f"{title}: unknown metric(s) {unknown} (typo?)"
        for name in names:
            family = promql.family(name)
            if promql.METRICS[family] == "histogram":
                assert name.endswith(("_bucket", "_sum", "_count")), f"{title}: {name}"
            if promql.METRICS[family] == "counter":
                assert re.search(rf"(rate|increase)\({re.escape(name)}\{{", expr), (
                    f"{title}: counter {name} used without rate()/increase()"
                )


def test_selectors_follow_the_variables(exprs: list[tuple[str, str]]) -> None:
    for title, expr in exprs:
        unscoped = 0
        for name in promql.metric_names(expr):
            for matchers in _selectors(expr, name):
                assert matchers, f"{title}: {name} has no label matchers"
                assert POD in matchers, f"{title}: {name} ignores $pod"
                if name.startswith(UNSCOPED):
                    unscoped += 1
                else:
                    assert MODEL in matchers, f"{title}: {name} ignores $model_name"
        assert expr.count(SCOPE) >= unscoped, (
            f"{title}: every selector of {UNSCOPED} needs `{SCOPE}`"
        )


def test_required_panels_are_there(exprs: list[tuple[str, str]], dashboard: dict) -> None:
    all_exprs = "\n".join(e for _, e in exprs)

    def has(*needles: str) -> bool:
        return any(all(n in e for n in needles) for _, e in exprs)

    for gauge in (
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "llmgrpc_active_streams",
    ):
        assert gauge in all_exprs, gauge
    assert has("rate(vllm:prefix_cache_hits_total", "/", "rate(vllm:prefix_cache_queries_total")
    for counter in (
        "vllm:num_preemptions_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "llmgrpc_requests_cancelled_total",
        "llmgrpc_requests_deadline_exceeded_total",
    ):
        assert has(f"rate({counter}"), counter
    for histogram in (
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
    ):
        for q in ("0.5", "0.9", "0.99"):
            assert has(f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket"), (
                f"{histogram} p{q}"
            )
    assert has("rate(grpc_server_started_total")
    assert has("by (grpc_code)", "grpc_server_handled_total{", 'grpc_code!="OK"', "/")
    assert has("by (finished_reason)", "rate(vllm:request_success_total")

    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    facts = next(r for r in rows if r["title"] == "Model facts")
    below = [p for p in dashboard["panels"] if p["gridPos"]["y"] > facts["gridPos"]["y"]]
    facts_exprs = "\n".join(t["expr"] for p in below for t in p.get("targets", []))
    assert "llmgrpc_model_info" in facts_exprs
    assert "vllm:cache_config_info" in facts_exprs
    for label in ("attention_kind", "num_kv_heads", "num_experts", "kv_cache_bytes_per_token"):
        assert label in json.dumps(below), label


def test_the_adapters_row(dashboard: dict[str, Any]) -> None:
    """Requests and tokens by adapter, swaps, and vLLM's running/waiting adapters
    with max_lora: under the Adapters row, before the next row."""
    top = dashboard["panels"]
    start = next(i for i, p in enumerate(top) if p["type"] == "row" and p["title"] == "Adapters")
    end = next((i for i in range(start + 1, len(top)) if top[i]["type"] == "row"), len(top))
    exprs = [t["expr"] for p in top[start + 1 : end] for t in p["targets"]]
    for needle in ("sum by (lora_adapter) (rate(llmgrpc_lora_requests_total{",
                   "sum by (lora_adapter) (rate(llmgrpc_lora_generated_tokens_total{",
                   "rate(llmgrpc_lora_adapter_activations_total{",
                   "rate(llmgrpc_lora_adapter_loads_total{",
                   "topk by (job, instance) (1, vllm:lora_requests_info{"):  # fmt: skip
        assert any(needle in e for e in exprs), needle
    table = next(p for p in top[start + 1 : end] if p["type"] == "table")
    shown = table["transformations"][0]["options"]["indexByName"]
    assert {"running_lora_adapters", "waiting_lora_adapters", "max_lora"} <= set(shown)


def test_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every query, once Grafana's variables are substituted."""
    promtool = require_promtool()
    queries = promql.dashboard_queries()
    assert len(queries) >= 30
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, (_, e) in enumerate(queries)]
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_dashboard_queries_substitute_variables() -> None:
    for title, expr in promql.dashboard_queries(rate_interval="30s"):
        assert "$" not in expr, title
    kv = dict(promql.dashboard_queries())["KV cache usage"]
    assert 'model_name=~".*", pod=~".*"' in kv
    assert promql.substitute("rate(x[$__rate_interval])", rate_interval="2m") == "rate(x[2m])"
    assert promql.substitute('x{a=~"${pod}"}', variables={"pod": "p-0"}) == 'x{a=~"p-0"}'
    with pytest.raises(ValueError, match="unknown template variable"):
        promql.substitute("x{a=~'$nope'}")


def test_metric_names_parser() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, grpc_method) (rate(a_bucket{x="b{c}"}[5m])))'
        " / on () group_left sum(rate(b:c_total[1m] offset 5m)) > bool 1e3"
    )
    assert promql.metric_names(expr) == {"a_bucket", "b:c_total"}


def test_documented_metrics_match_the_list() -> None:
    """docs/observability.md names every metric of promql.METRICS, and no other."""
    text = DOCS.read_text()
    for name in promql.METRICS:
        assert f"`{name}`" in text, f"{name} is not documented"
    table_names = set(re.findall(r"^\|\s*`((?:vllm:|grpc_|llmgrpc_)[\w:]+)`", text, re.M))
    assert table_names == set(promql.METRICS)


def test_vllm_names_exist_in_the_installed_vllm() -> None:
    """vLLM's stat logger still declares the names (catches upstream renames)."""
    spec = importlib.util.find_spec("vllm")
    # `make install` installs vLLM for every test run: missing, it is a broken
    # install, which must fail this test rather than skip it.
    assert spec is not None and spec.origin is not None, "vLLM is not installed"
    source = (Path(spec.origin).parent / "v1" / "metrics" / "loggers.py").read_text()
    declared = set(re.findall(r'"(vllm:[a-z0-9_]+)"', source))
    for name, kind in promql.METRICS.items():
        if name.startswith("vllm:"):
            base = name.removesuffix("_total") if kind == "counter" else name
            assert base in declared, f"{name} is no longer declared by vLLM"


def test_service_metrics_match_the_list() -> None:
    """The server registers exactly the grpc_* and llmgrpc_* metrics listed."""
    metrics = importlib.import_module("llmgrpc_server.metrics")
    registry = CollectorRegistry()
    metrics.GrpcMetrics(registry)
    metrics.ServiceMetrics("m", registry)
    metrics.LoraSwapMetrics("m", lambda: (0, 0), registry)  # with LoRA on
    exposed = {
        f.name + ("_total" if f.type == "counter" else ""): f.type for f in registry.collect()
    }
    listed = {n: k for n, k in promql.METRICS.items() if not n.startswith("vllm:")}
    assert exposed == listed


def require_promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install Debian's Prometheus, `apt-get install prometheus`")
    return promtool


def _selectors(expr: str, name: str) -> list[str]:
    """The label matchers (`{...}`, or "" if none) of each selector of `name` in `expr`."""
    pattern = rf"(?<![\w:]){re.escape(name)}(?![\w:])(\{{[^}}]*\}})?"
    return [m.group(1) or "" for m in re.finditer(pattern, expr)]
