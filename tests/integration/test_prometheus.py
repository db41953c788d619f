"""A real Prometheus scrapes a real server; every dashboard and alert query returns data.

The server is the shared `smollm` one: LoRA on, with two adapters and one
adapter slot, so the dashboard's Adapters row has data too (requests naming
the adapters swap them in the slot).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from llmgrpc import Client

from tests import promql
from tests.ports import free_port
from tests.server_process import ServerProcess

pytestmark = pytest.mark.engine
PROMETHEUS = shutil.which("prometheus")
RATE_WINDOW = "30s"
# The smollm server's adapters (--lora-modules in tests/server_process.py).
ADAPTERS = ("smollm2-135m-instruct-lora-a", "smollm2-135m-instruct-lora-b")


@pytest.fixture(scope="module")
def prometheus(smollm: ServerProcess) -> Iterator[str]:
    assert PROMETHEUS, "prometheus is missing: apt-get install prometheus (make install does it)"
    workdir = Path(tempfile.mkdtemp(prefix="llmgrpc-prom-"))
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: llmgrpc\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{smollm.metrics_port}']\n"
    )
    port = free_port()  # Prometheus cannot report a port it picked itself
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=(workdir / "prometheus.log").open("wb"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, (workdir / "prometheus.log").read_text()
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


def _query(url: str, expr: str) -> list[dict]:
    q = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def _drive_load(target: str, seconds: float) -> None:
    """Mixed traffic: unary, streams, cancelled, bad input, deadline exceeded, tokenize,
    and the base model and both adapters in turn."""
    deadline = time.monotonic() + seconds
    models = itertools.cycle(("", *ADAPTERS))
    with Client(target, timeout=60) as client:
        while time.monotonic() < deadline:
            client.generate("The metrics test", model=next(models), max_tokens=24, temperature=0.0)
            for _ in client.stream("A shared prefix for the prefix cache", max_tokens=24):
                pass
            stream = client.stream("Cancelled early", max_tokens=500, ignore_eos=True)
            next(stream)
            stream.close()
            client.tokenize("count me")
            for bad in ({"max_tokens": 1, "prompt": ""},  # INVALID_ARGUMENT
                        {"max_tokens": 1500, "prompt": "slow", "ignore_eos": True,
                         "timeout": 0.2}):  # DEADLINE_EXCEEDED  # fmt: skip
                try:
                    client.generate(**bad)
                except grpc.RpcError:
                    pass


def test_every_dashboard_and_alert_query_returns_data(
    smollm: ServerProcess, prometheus: str
) -> None:
    # Several parallel clients for ~25 s: rate() windows need samples on both sides.
    # A client's unexpected error fails the test (a thread would only print it).
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        for load in [pool.submit(_drive_load, smollm.target, 25) for _ in range(3)]:
            load.result()
    queries = [("panel " + t, e) for t, e in promql.dashboard_queries(rate_interval=RATE_WINDOW)]
    queries += [("alert " + n, e) for n, e in promql.alert_signals()]
    assert len(queries) > 40
    empty: list[str] = []
    deadline = time.monotonic() + 45
    while True:
        empty = [f"{name}: {expr}" for name, expr in queries if not _query(prometheus, expr)]
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not empty, "queries without data:\n" + "\n".join(empty)
