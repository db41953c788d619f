"""Which vLLM metrics appear and move on this engine; prints a Markdown table.

Starts a real llmgrpc-server on the embedded model, scrapes /metrics before,
during and after a mixed load (shared prefixes, long generations, several at
once), and reports for each `vllm:*` metric the dashboard uses whether it is
exposed and whether it changed. Used for docs/observability.md.

    .venv/bin/python scripts/measure_cpu_metrics.py
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmgrpc import Client

from tests import promql
from tests.metrics_scrape import scrape
from tests.server_process import launch

PREFIX = "A shared prefix so that the prefix cache has whole blocks to hit. " * 12
GAUGES = ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting")


Sample = dict[tuple[str, frozenset[tuple[str, str]]], float]


def family(sample: Sample, name: str) -> Sample:
    names = {name, f"{name}_count", f"{name}_sum", f"{name}_bucket"}
    return {k: v for k, v in sample.items() if k[0] in names}


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    # A small KV cache (1 MiB = 1,024 tokens = 7 usable blocks of 128, so max-model-len 896) and prompts
    # longer than a block, so that preemptions and prefix-cache hits can happen.
    server = launch(["--model", "tiny-llama-gqa", "--max-num-seqs", "4", "--kv-cache-memory-bytes", str(1 << 20),
                     "--max-model-len", "896"],
                    name="measure")  # fmt: skip
    try:
        server.wait_serving()
        url = server.metrics_url
        before = scrape(url)
        peak: dict[str, float] = {}
        client = Client(server.target, timeout=300)

        def load() -> None:
            for _ in range(4):
                client.generate(PREFIX, max_tokens=300, ignore_eos=True)

        threads = [threading.Thread(target=load) for _ in range(8)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            sample = scrape(url)
            for name in GAUGES:
                peak[name] = max(peak.get(name, 0.0), sum(family(sample, name).values()))
            time.sleep(0.2)
        after = scrape(url)
        print("| metric | exposed | moved under load | observed |")
        print("|---|---|---|---|")
        for name, kind in promql.METRICS.items():
            if not name.startswith("vllm:"):
                continue
            a, b = family(after, name), family(before, name)
            if name in GAUGES:
                moved, note = peak[name] > 0, f"peak {peak[name]:.4g} (after: {sum(a.values()):.4g})"
            elif name == "vllm:cache_config_info":
                labels = dict(next(iter(a))[1]) if a else {}
                moved = False
                note = f"block_size={labels.get('block_size')}, num_gpu_blocks={labels.get('num_gpu_blocks')}"
            else:
                moved = any(a.get(k, 0.0) != b.get(k, 0.0) for k in a)
                counts = [v for k, v in a.items() if k[0].endswith("_count")] or list(a.values())
                note = f"{'observations' if kind == 'histogram' else 'total'}: {sum(counts):.6g}"
            print(f"| `{name}` | {'yes' if a else 'no'} | {'yes' if moved else 'no'} | {note} |")
        sizes, times = [], []
        for _ in range(100):
            t0 = time.perf_counter()
            sizes.append(len(urllib.request.urlopen(url).read()))
            times.append(time.perf_counter() - t0)
        times.sort()
        print(f"\nidle scrape: p50 {times[50] * 1000:.2f} ms, p99 {times[98] * 1000:.2f} ms, "
              f"{sizes[-1]} bytes, {len(after)} series")  # fmt: skip
    finally:
        server.stop()
        shutil.rmtree(server.log_path.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
