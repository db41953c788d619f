"""The server's own settings, parsed once at the edge (main.py).

Engine settings are vLLM's own `AsyncEngineArgs`; this holds only what the
gRPC front end adds.
"""

from __future__ import annotations

import argparse
import ssl
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import grpc

from llmgrpc_server.domain import SizeCaps
from llmgrpc_server.models import default_models_dir
from llmgrpc_server.policy import DEFAULT_COALESCE_BUDGET_S

DEFAULT_PORT = 50051
TRANSPORTS = ("grpcio", "batched")
DEFAULT_METRICS_PORT = 9400
# Below this even a short request with its metadata may not fit.
MIN_MESSAGE_BYTES = 4096


def service_version() -> str:
    try:
        return version("llmgrpc")
    except PackageNotFoundError:
        return "0+unknown"


# The size caps' flags and their ServerConfig (and SizeCaps) field names.
SIZE_CAP_FLAGS = (
    ("--max-stop-strings", "max_stop_strings"),
    ("--max-stop-string-chars", "max_stop_string_chars"),
    ("--max-stop-token-ids", "max_stop_token_ids"),
    ("--max-structured-output-chars", "max_structured_output_chars"),
    ("--max-chat-messages", "max_chat_messages"),
    ("--max-tokenize-chars", "max_tokenize_chars"),
    ("--max-detokenize-tokens", "max_detokenize_tokens"),
    ("--max-logit-bias", "max_logit_bias"),
    ("--max-allowed-token-ids", "max_allowed_token_ids"),
    ("--max-bad-words", "max_bad_words"),
    ("--max-bad-word-chars", "max_bad_word_chars"),
    ("--max-n-sequences", "max_n_sequences"),
)
_SIZE_CAP_HELP = {
    "max_stop_strings": "stop strings in one request",
    "max_stop_string_chars": "characters in one stop string (vLLM holds back that many "
    "characters of streamed text)",
    "max_stop_token_ids": "stop token ids in one request",
    "max_structured_output_chars": "characters of a JSON schema, regex or grammar, or of "
    "all choices together",
    "max_chat_messages": "chat messages in one request",
    "max_tokenize_chars": "characters Tokenize accepts (text, or all chat contents)",
    "max_detokenize_tokens": "token ids Detokenize accepts",
    "max_logit_bias": "sampling.logit_bias entries in one request",
    "max_allowed_token_ids": "sampling.allowed_token_ids in one request",
    "max_bad_words": "sampling.bad_words in one request",
    "max_bad_word_chars": "characters in one of sampling.bad_words",
    "max_n_sequences": "completions (sampling.n) of one request; vLLM's own cap is "
    "VLLM_MAX_N_SEQUENCES",
}


@dataclass(frozen=True)
class ServerConfig:
    host: str = "[::]"
    port: int = DEFAULT_PORT
    # 0 picks a free port (logged); -1 disables the /metrics endpoint.
    metrics_port: int = DEFAULT_METRICS_PORT
    drain_timeout: float = 30.0
    max_in_flight: int = 256
    max_message_bytes: int = 16 * 1024 * 1024
    max_concurrent_streams: int = 1024
    # None: the model's context is the only bound.
    max_prompt_tokens: int | None = None
    max_tokens_limit: int | None = None
    # Adaptive coalescing of stream messages under load; 1 turns it off.
    max_tokens_per_message: int = 8
    # ... and no more tokens than the engine makes in this many milliseconds.
    coalesce_budget_ms: float = 1000 * DEFAULT_COALESCE_BUDGET_S
    # Caps on inputs whose cost grows with their size (docs/api.md, "Limits").
    max_stop_strings: int = SizeCaps.max_stop_strings
    max_stop_string_chars: int = SizeCaps.max_stop_string_chars
    max_stop_token_ids: int = SizeCaps.max_stop_token_ids
    max_structured_output_chars: int = SizeCaps.max_structured_output_chars
    max_chat_messages: int = SizeCaps.max_chat_messages
    max_tokenize_chars: int = SizeCaps.max_tokenize_chars
    max_detokenize_tokens: int = SizeCaps.max_detokenize_tokens
    max_logit_bias: int = SizeCaps.max_logit_bias
    max_allowed_token_ids: int = SizeCaps.max_allowed_token_ids
    max_bad_words: int = SizeCaps.max_bad_words
    max_bad_word_chars: int = SizeCaps.max_bad_word_chars
    max_n_sequences: int = SizeCaps.max_n_sequences
    # With vLLM's CPU backend: keep the front end off the worker's cores
    # (docs/deploy.md, "CPU placement"); nothing moves where nothing is bound.
    pin_front_end: bool = True
    # vLLM's --api-server-count: gRPC front-end processes on one port (frontends.py).
    api_server_count: int = 1
    # What carries the calls: llmgrpc's own HTTP/2 transport, which writes each
    # connection's messages once per loop turn (transport/), or grpcio's server.
    transport: str = "batched"
    # Which of them this process is (set by the manager, not a flag).
    frontend_index: int = 0
    models_dir: Path = field(default_factory=default_models_dir)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_tokens: tuple[str, ...] = ()
    # LoRA adapters loaded at startup: (name, directory), built-in names resolved.
    lora_modules: tuple[tuple[str, str], ...] = ()
    # AdminService: on with tokens of its own; adapters load from under adapter_dir.
    admin_tokens: tuple[str, ...] = ()
    adapter_dir: Path | None = None
    service_version: str = field(default_factory=service_version)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if self.drain_timeout < 0:
            raise ValueError("--drain-timeout must be >= 0")
        if self.max_in_flight < 1:
            raise ValueError("--max-in-flight must be >= 1")
        if self.max_message_bytes < MIN_MESSAGE_BYTES:
            raise ValueError(f"--max-message-bytes must be >= {MIN_MESSAGE_BYTES}")
        if self.max_concurrent_streams < 1:
            raise ValueError("--max-concurrent-streams must be >= 1")
        for flag, value in (("--max-prompt-tokens", self.max_prompt_tokens),
                            ("--max-tokens-limit", self.max_tokens_limit)):  # fmt: skip
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.max_tokens_per_message < 1 or not self.coalesce_budget_ms > 0:
            raise ValueError(
                "--max-tokens-per-message must be >= 1 and --coalesce-budget-ms > 0, "
                f"got {self.max_tokens_per_message} and {self.coalesce_budget_ms}"
            )
        for flag, name in SIZE_CAP_FLAGS:
            if getattr(self, name) < 1:
                raise ValueError(f"{flag} must be >= 1, got {getattr(self, name)}")
        self._check_transport()

    def _check_transport(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"--transport must be one of {', '.join(TRANSPORTS)}")

    def size_caps(self) -> SizeCaps:
        """The caps the request path checks (Limits.caps)."""
        values = {name: getattr(self, name) for _, name in SIZE_CAP_FLAGS}
        return SizeCaps(**values, max_message_bytes=self.max_message_bytes)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        pair = (self.tls_key.read_bytes(), self.tls_cert.read_bytes())
        ca = self.tls_client_ca.read_bytes() if self.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [pair], root_certificates=ca, require_client_auth=ca is not None
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """The same TLS settings for --transport batched (HTTP/2 over ALPN h2)."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls_cert, self.tls_key)
        if self.tls_client_ca is not None:
            context.load_verify_locations(self.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("llmgrpc server")
    g.add_argument("--host", default=ServerConfig.host, help="address to bind (default: all)")
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port (0: any free port)")
    g.add_argument(
        "--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
        help="HTTP port of /metrics (0: any free port, -1: disabled)",
    )  # fmt: skip
    g.add_argument(
        "--drain-timeout", type=float, default=ServerConfig.drain_timeout,
        help="seconds in-flight calls get to finish after SIGTERM",
    )  # fmt: skip
    g.add_argument(
        "--max-in-flight", type=int, default=ServerConfig.max_in_flight,
        help="generation requests in flight before RESOURCE_EXHAUSTED",
    )  # fmt: skip
    g.add_argument(
        "--max-message-bytes", type=int, default=ServerConfig.max_message_bytes,
        help="largest request or response message; larger: RESOURCE_EXHAUSTED",
    )  # fmt: skip
    g.add_argument(
        "--max-concurrent-streams", type=int, default=ServerConfig.max_concurrent_streams,
        help="service calls at once per connection; beyond it: RESOURCE_EXHAUSTED",
    )  # fmt: skip
    g.add_argument(
        "--max-prompt-tokens", type=int, default=None,
        help="longest prompt in tokens (default: the model's context - 1)",
    )  # fmt: skip
    g.add_argument(
        "--max-tokens-limit", type=int, default=None,
        help="largest sampling.max_tokens a request may ask (default: the model's context)",
    )  # fmt: skip
    g.add_argument(
        "--max-tokens-per-message", type=int, default=ServerConfig.max_tokens_per_message,
        help="under load, stream messages carry up to this many tokens (one more per 4 "
        "requests in flight); 1: one token per message",
    )  # fmt: skip
    g.add_argument(
        "--api-server-count", type=int, default=ServerConfig.api_server_count,
        help="gRPC front-end processes on one port (SO_REUSEPORT) over one engine core, "
        "as vLLM's own flag; connections spread over them (default: 1)",
    )  # fmt: skip
    g.add_argument(
        "--transport", choices=TRANSPORTS, default=ServerConfig.transport,
        help="batched (default): llmgrpc's own HTTP/2 transport, which writes each "
        "connection's messages once per event-loop turn (fewer writes and wake-ups at both "
        "ends under load; docs/benchmarks.md); grpcio: grpc's own server",
    )  # fmt: skip
    g.add_argument(
        "--coalesce-budget-ms", type=float, default=ServerConfig.coalesce_budget_ms,
        help="a message carries no more tokens than the engine makes in this time, so "
        "coalescing stretches the gap between a stream's messages by at most about this much",
    )  # fmt: skip
    for flag, name in SIZE_CAP_FLAGS:
        default = getattr(SizeCaps, name)
        g.add_argument(flag, type=int, default=default, help=f"most {_SIZE_CAP_HELP[name]}; "
                       f"beyond it: INVALID_ARGUMENT (default: {default})")  # fmt: skip
    g.add_argument(
        "--pin-front-end", action=argparse.BooleanOptionalAction,
        default=ServerConfig.pin_front_end,
        help="CPU backend: run this process and the engine core on the CPUs vLLM's worker "
        "is not bound to (its reserved ones); nothing happens where the worker is not bound "
        "(default: on; --no-pin-front-end leaves them to the kernel)",
    )  # fmt: skip
    g.add_argument(
        "--models-dir", type=Path,
        default=default_models_dir(),
        help="where embedded models are built (env LLMGRPC_MODELS_DIR)",
    )  # fmt: skip
    g.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS")
    g.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    g.add_argument("--tls-client-ca", type=Path, help="PEM CA bundle: require client certs (mTLS)")
    g.add_argument(
        "--auth-token-file", type=Path,
        help="bearer tokens, one per line; calls without one get UNAUTHENTICATED",
    )  # fmt: skip
    g.add_argument(
        "--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
        help="LoRA adapters to serve, by the name requests put in `model` (vLLM's syntax: "
        "NAME=PATH or JSON {\"name\": ..., \"path\": ...}); PATH may be a built-in adapter's "
        "name; turns on --enable-lora",
    )  # fmt: skip
    g.add_argument(
        "--admin-token-file", type=Path,
        help="turn on AdminService (adapters loaded and unloaded at run time) for these "
        "bearer tokens, one per line; serving tokens cannot call it",
    )  # fmt: skip
    g.add_argument(
        "--adapter-dir", type=Path,
        help="AdminService.LoadAdapter loads only from directories under this one",
    )  # fmt: skip


def from_namespace(ns: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=ns.host,
        port=ns.port,
        metrics_port=ns.metrics_port,
        drain_timeout=ns.drain_timeout,
        max_in_flight=ns.max_in_flight,
        max_message_bytes=ns.max_message_bytes,
        max_concurrent_streams=ns.max_concurrent_streams,
        max_prompt_tokens=ns.max_prompt_tokens,
        max_tokens_limit=ns.max_tokens_limit,
        max_tokens_per_message=ns.max_tokens_per_message,
        coalesce_budget_ms=ns.coalesce_budget_ms,
        transport=ns.transport,
        **{name: getattr(ns, name) for _, name in SIZE_CAP_FLAGS},
        pin_front_end=ns.pin_front_end,
        api_server_count=ns.api_server_count,
        models_dir=ns.models_dir,
        tls_cert=ns.tls_cert,
        tls_key=ns.tls_key,
        tls_client_ca=ns.tls_client_ca,
        auth_tokens=read_tokens(ns.auth_token_file) if ns.auth_token_file else (),
        admin_tokens=read_tokens(ns.admin_token_file) if ns.admin_token_file else (),
        adapter_dir=ns.adapter_dir,
    )


def read_tokens(path: Path) -> tuple[str, ...]:
    tokens = tuple(t.strip() for t in path.read_text().splitlines() if t.strip())
    if not tokens:
        raise ValueError(f"--auth-token-file {path} has no tokens")
    return tokens
