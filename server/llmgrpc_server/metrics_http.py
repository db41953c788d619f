"""The /metrics endpoint, always in the Prometheus text format.

prometheus_client's own server negotiates OpenMetrics when the scraper asks
for it (Prometheus 2.x does), and its OpenMetrics writer mangles names with a
colon (`vllm:kv_cache_usage_perc` → `vllm_kv_cache_usage_perc`,
prometheus/client_python#1177): every dashboard and gateway reading vLLM's
names would see nothing. The text format keeps the names as they are.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest


class _DualStackServer(ThreadingHTTPServer):
    daemon_threads = True


def start_metrics_server(
    port: int, host: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY
) -> ThreadingHTTPServer:
    """Serve `registry` on http://host:port/metrics from a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # scrapes every second would flood the log

    if ":" in host:
        import socket

        _DualStackServer.address_family = socket.AF_INET6
    server = _DualStackServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
