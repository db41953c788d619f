"""The /metrics endpoint, always in the Prometheus text format.

prometheus_client's own server negotiates OpenMetrics when the scraper asks
for it (Prometheus 2.x does), and its OpenMetrics writer mangles names with a
colon (`vllm:kv_cache_usage_perc` → `vllm_kv_cache_usage_perc`,
prometheus/client_python#1177): every dashboard and gateway reading vLLM's
names would see nothing. The text format keeps the names as they are.
"""

from __future__ import annotations

import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# Rendering vLLM's histograms (~50 kB of text) holds the GIL for milliseconds,
# taken from the event loop that streams tokens; scrapes closer together than
# this share one rendering (docs/benchmarks.md).
RENDER_MAX_AGE = 0.1


class _DualStackServer(ThreadingHTTPServer):
    daemon_threads = True


class RenderedPage:
    """The text exposition of `registry`, rendered at most once per `max_age` s.

    Concurrent scrapes wait for one rendering instead of each doing their own.
    """

    def __init__(self, registry: CollectorRegistry, max_age: float = RENDER_MAX_AGE) -> None:
        self._registry = registry
        self._max_age = max_age
        self._lock = threading.Lock()
        self._body = b""
        self._rendered_at = -math.inf

    def body(self) -> bytes:
        with self._lock:
            now = time.monotonic()
            if now - self._rendered_at >= self._max_age:
                self._body = generate_latest(self._registry)
                self._rendered_at = now
            return self._body


def start_metrics_server(
    port: int, host: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY
) -> ThreadingHTTPServer:
    """Serve `registry` on http://host:port/metrics from a daemon thread."""
    page = RenderedPage(registry)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            body = page.body()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # scrapes every second would flood the log

    if ":" in host:
        import socket

        _DualStackServer.address_family = socket.AF_INET6
    server = _DualStackServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
