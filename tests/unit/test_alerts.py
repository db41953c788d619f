"""The Prometheus alert rules (deploy/prometheus/alerts.yaml) pass promtool.

`promtool check rules` validates syntax and templates; `promtool test rules` runs
the unit tests in alerts_test.yaml (each alert fires, and stays quiet, when it should).
promtool comes with Debian's `prometheus` package (`make system-deps`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from tests import promql

RULES_DIR = promql.ALERTS.parent
UNIT_TESTS = RULES_DIR / "alerts_test.yaml"
DOCS = promql.REPO / "docs" / "observability.md"
SEVERITIES = {"warning", "critical"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool not found: install Debian's Prometheus, `apt-get install prometheus`")
    return subprocess.run(
        [binary, *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def rules() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(promql.ALERTS.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}


def test_promtool_check_rules() -> None:
    run = promtool("check", "rules", promql.ALERTS.name)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_promtool_unit_tests() -> None:
    run = promtool("test", "rules", UNIT_TESTS.name)
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_alert_has_a_firing_unit_test(rules: dict[str, dict[str, Any]]) -> None:
    doc = yaml.safe_load(UNIT_TESTS.read_text())
    fired = {
        case["alertname"]
        for test in doc["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert set(rules) - fired == set()


def test_required_alerts(rules: dict[str, dict[str, Any]]) -> None:
    def find(*needles: str) -> dict[str, Any]:
        found = [r for r in rules.values() if all(n in r["expr"] for n in needles)]
        assert len(found) == 1, f"one alert on {needles}, found {len(found)}"
        return found[0]

    kv = find("vllm:kv_cache_usage_perc")
    assert kv["expr"].strip().endswith("> 0.95")
    assert kv["for"] == "5m"
    assert find("vllm:num_requests_waiting")["expr"].strip().endswith("> 50")
    assert "histogram_quantile(0.99" in find("vllm:time_to_first_token_seconds_bucket")["expr"]
    assert "rate(vllm:num_preemptions_total" in find("vllm:num_preemptions_total")["expr"]
    errors = find("grpc_server_handled_total")["expr"]
    for caller_code in ("OK", "CANCELLED", "INVALID_ARGUMENT"):
        assert re.search(rf'grpc_code!~"[^"]*\b{caller_code}\b', errors), caller_code
    assert find("absent(up{", "== 1)")["labels"]["severity"] == "critical"


def test_every_alert_is_labelled_and_explained(rules: dict[str, dict[str, Any]]) -> None:
    docs = DOCS.read_text()
    for name, rule in rules.items():
        assert name.startswith("LLMGrpc"), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["annotations"]["description"].strip(), name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), f"{name}: needs a `for:` duration"
        assert f"`{name}`" in docs, f"{name} is not in docs/observability.md"


def test_every_alert_selects_documented_metrics_of_the_job(
    rules: dict[str, dict[str, Any]],
) -> None:
    known = set(promql.METRICS) | promql.SYNTHETIC_METRICS
    for name, rule in rules.items():
        names = promql.metric_names(rule["expr"])
        assert {promql.family(n) for n in names} <= known, f"{name}: {names}"
        selectors = re.findall(r"(?<![\w:])[A-Za-z_:][\w:]*\{([^}]*)\}", rule["expr"])
        assert len(selectors) >= len(names), f"{name}: a selector without matchers"
        for matchers in selectors:
            assert 'job="llmgrpc"' in matchers, f"{name}: selector {{{matchers}}} lacks the job"


def test_alert_signals_for_live_checks() -> None:
    """Each alert reduces to a signal that returns data on a healthy server."""
    signals = dict(promql.alert_signals())
    assert signals.keys() == dict(promql.alert_queries()).keys()
    assert signals["LLMGrpcKVCacheNearlyFull"] == 'vllm:kv_cache_usage_perc{job="llmgrpc"}'
    assert signals["LLMGrpcNoHealthyTarget"] == 'up{job="llmgrpc"}'
    for name, signal in signals.items():
        assert not re.search(r"(?:[<>]=?|[=!]=)\s*(bool\s+)?[\d.]+\s*$", signal), name


@pytest.mark.parametrize(
    ("expr", "signal"),
    [
        ("x > 0.95", "x"),
        ('x{a!="b", c=~"d>1"} >= 1e3', 'x{a!="b", c=~"d>1"}'),
        (
            "sum by (a) (rate(x[5m])) / sum by (a) (rate(y[5m])) > bool 0.05",
            "sum by (a) (rate(x[5m])) / sum by (a) (rate(y[5m]))",
        ),
        ('absent(up{job="j"} == 1)', 'up{job="j"}'),
        (
            "histogram_quantile(0.99, sum by (le) (rate(h[5m]) > 0)) < 10",
            "histogram_quantile(0.99, sum by (le) (rate(h[5m]) > 0))",
        ),
    ],
)
def test_strip_threshold(expr: str, signal: str) -> None:
    assert promql.strip_threshold(expr) == signal


@pytest.mark.parametrize("expr", ["x", "x > y", "absent(x)", "(x > 1)", "x > 1 and y"])
def test_strip_threshold_refuses_other_shapes(expr: str) -> None:
    with pytest.raises(ValueError):
        promql.strip_threshold(expr)
