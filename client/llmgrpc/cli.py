"""`llmgrpc`: the command-line client.

llmgrpc generate "Hello" --stream --max-tokens 32
llmgrpc generate "Hello" --model tiny-llama-gqa-lora-a
llmgrpc tokenize "Hello world"
llmgrpc info
llmgrpc health
llmgrpc chat --system "Be brief."
llmgrpc adapters list --token-file admin.token
llmgrpc plan llama-3.1-70b --gpu-memory-gib 80 --tp 2
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from llmgrpc.client import SERVICE_NAME, Client, Security
from llmgrpc.v1 import llm_service_pb2 as pb


def _connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--target", default="localhost:50051", help="host:port of the server")
    g.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    g.add_argument("--tls", action="store_true", help="use TLS with the system roots")
    g.add_argument("--ca-cert", type=Path, help="PEM CA to verify the server (implies TLS)")
    g.add_argument("--client-cert", type=Path, help="PEM client certificate (mTLS)")
    g.add_argument("--client-key", type=Path, help="PEM client key (mTLS)")
    g.add_argument("--server-name", help="expected TLS server name (SNI override)")
    g.add_argument("--token-file", type=Path, help="file holding a bearer token (first line)")


def _token(path: Path | None) -> str | None:
    """The first non-empty line of --token-file, so a server's token file works too."""
    if path is None:
        return None
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise SystemExit(f"llmgrpc: --token-file {path} holds no token")
    return lines[0]


def _security(args: argparse.Namespace) -> Security:
    return Security(
        ca_cert=args.ca_cert, client_cert=args.client_cert, client_key=args.client_key,
        token=_token(args.token_file), tls=args.tls, server_name=args.server_name,
    )  # fmt: skip


def _client(args: argparse.Namespace) -> Client:
    return Client(args.target, security=_security(args), timeout=args.timeout)


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="", metavar="NAME",
                   help="the served model or one of its LoRA adapters (llmgrpc info lists "
                        "them); default: the served model")  # fmt: skip


def _print_json(msg: Any) -> None:
    print(json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True), indent=2))


def _sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling flags `generate` and `chat` share (generate adds --logprobs)."""
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--ignore-eos", action="store_true", default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    fields = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "logprobs",
              "ignore_eos", "repetition_penalty", "n")  # fmt: skip
    kw = {f: v for f in fields if (v := getattr(args, f, None)) is not None}
    if args.stop:
        kw["stop"] = args.stop
    return kw


def _logit_bias(pairs: list[str] | None) -> dict[int, float]:
    """--logit-bias ID=BIAS flags as a map."""
    bias = {}
    for pair in pairs or ():
        token, sep, value = pair.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise SystemExit(f"llmgrpc: --logit-bias takes TOKEN_ID=BIAS, got {pair!r}")
    return bias


def _generation_args(p: argparse.ArgumentParser) -> None:
    """generate's flags beyond the shared sampling ones."""
    p.add_argument("--logprobs", type=int)
    p.add_argument("-n", "--n", type=int, help="completions of the prompt (sampling.n)")
    p.add_argument("--truncate-prompt-tokens", type=int, metavar="K",
                   help="keep only the last K prompt tokens")  # fmt: skip
    p.add_argument("--logit-bias", action="append", metavar="ID=BIAS",
                   help="add BIAS to token ID's logit (repeatable)")  # fmt: skip
    p.add_argument("--allowed-token-id", action="append", type=int, metavar="ID",
                   dest="allowed_token_ids", help="only these tokens may be generated "
                   "(repeatable)")  # fmt: skip
    p.add_argument("--bad-word", action="append", dest="bad_words", metavar="WORD",
                   help="a word that must not be generated (repeatable)")  # fmt: skip
    p.add_argument("--request-id", default="", help="the request's id (default: the server's)")
    p.add_argument("--prompt-logprobs", type=int, metavar="K",
                   help="the prompt's logprobs, K alternatives each (see --json)")  # fmt: skip
    p.add_argument("--priority", type=int, default=0,
                   help="lower runs first (server: --scheduling-policy priority)")  # fmt: skip


def _generation(args: argparse.Namespace) -> dict[str, Any]:
    kw = _sampling(args)
    if args.truncate_prompt_tokens is not None:
        kw["truncate_prompt_tokens"] = args.truncate_prompt_tokens
    if args.logit_bias:
        kw["logit_bias"] = _logit_bias(args.logit_bias)
    for name in ("allowed_token_ids", "bad_words"):
        if getattr(args, name):
            kw[name] = getattr(args, name)
    kw["request_id"] = args.request_id
    kw["priority"] = args.priority
    if args.prompt_logprobs is not None:
        kw["prompt_logprobs"] = args.prompt_logprobs
    return kw


def cmd_generate(args: argparse.Namespace) -> int:
    kw = _generation(args)
    if args.json_schema:
        kw["json_schema"] = Path(args.json_schema).read_text()
    if args.regex:
        kw["regex"] = args.regex
    if args.choice:
        kw["choice"] = args.choice
    kw["model"] = args.model
    if args.chat:
        kw["messages"] = [("user", args.prompt)]
        prompt = None
    else:
        prompt = args.prompt
    with _client(args) as client:
        if args.stream:
            return _print_stream(client.stream(prompt, **kw), args.n or 1, args.verbose)
        resp = client.generate(prompt, **kw)
        if args.json:
            _print_json(resp)
        elif resp.completions:
            for c in resp.completions:
                print(f"[{c.index}] {c.text}")
        else:
            print(resp.text)
        return 0


def _print_stream(deltas: Iterator[pb.GenerateResponse], n: int, verbose: bool) -> int:
    """The text as it arrives; with n > 1 (completions interleave) each whole, by index."""
    final, texts = None, [""] * n
    for delta in deltas:
        if n == 1:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        else:
            texts[delta.index] += delta.text
        final = delta
    print("\n".join(f"[{i}] {t}" for i, t in enumerate(texts)) if n > 1 else "")
    if final is not None and verbose:
        _print_json(final)
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    with _client(args) as client:
        resp = client.tokenize(args.text, model=args.model,
                               truncate_prompt_tokens=args.truncate_prompt_tokens)  # fmt: skip
    if args.json:
        _print_json(resp)
        return 0
    for tid, tok, off in zip(resp.token_ids, resp.tokens, resp.offsets, strict=True):
        print(f"{tid:>8}  {tok!r:<20} [{off.start}, {off.end})  {resp.text[off.start : off.end]!r}")
    print(f"{len(resp.token_ids)} tokens (max_model_len {resp.max_model_len})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.model_info()
    if args.json:
        _print_json(info)
        return 0
    a, kv = info.architecture, info.kv_cache
    kind = pb.AttentionKind.Name(a.attention_kind).removeprefix("ATTENTION_KIND_")
    rows = [
        ("model", f"{info.model_name}  ({info.model_path})"),
        ("architecture", f"{', '.join(a.architectures)} ({a.model_type})"),
        ("engine / service", f"{info.engine_version} / llmgrpc {info.service_version}"),
        ("dtype / max_model_len", f"{info.dtype} / {info.max_model_len}"),
        ("layers / hidden", f"{a.num_layers} / {a.hidden_size}"),
        ("attention", f"{kind}: {a.num_attention_heads} heads, {a.num_kv_heads} KV heads "
                      f"(group {a.gqa_group_size}), head_dim {a.head_dim}"),
        ("position", a.position_encoding
         + (f" (theta {a.rope_theta:g})" if a.HasField("rope_theta") else "")),
        ("sliding window", str(a.sliding_window) if a.HasField("sliding_window") else "none"),
    ]  # fmt: skip
    if a.num_experts:
        rows.append(("experts", f"{a.num_experts} routed, {a.experts_per_token} per token, "
                                f"{a.num_shared_experts} shared"))  # fmt: skip
    rows += [
        ("parameters", f"{a.total_parameters:,} total, {a.active_parameters:,} active per token"),
        ("KV cache / token", f"{a.kv_cache_bytes_per_token:,} bytes ({a.kv_cache_dtype})"),
        ("KV cache", f"{kv.num_blocks:,} blocks x {kv.block_size} = {kv.token_capacity:,} tokens"
                     + (f" (predicted {kv.predicted_token_capacity:,})"
                        if kv.predicted_token_capacity else "")),
        ("full-context seqs", f"{kv.token_capacity // info.max_model_len:,} of "
                              f"{info.max_model_len:,} tokens fit in the KV cache"
         if info.max_model_len else "?"),
        ("vocab", str(info.vocab_size)),
        ("chat template", "yes" if info.capabilities.chat_template else "no"),
        ("sampling", f"n up to {info.capabilities.max_n}, logprobs up to "
                     f"{info.capabilities.max_logprobs}, priority "
                     + ("scheduled (lower first)" if info.capabilities.priority_scheduling
                        else "off (first come, first served)")),
        *_lora_rows(info),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _lora_rows(info: pb.GetModelInfoResponse) -> list[tuple[str, str]]:
    """The LoRA line, then one line per adapter."""
    lora = info.lora
    summary = "disabled"
    if lora.enabled:
        summary = (f"enabled: max_loras {lora.max_loras}, max_lora_rank {lora.max_lora_rank}, "
                   f"max_cpu_loras {lora.max_cpu_loras}")  # fmt: skip
    rows = [("lora", summary), *(("adapter", _adapter_line(a)) for a in info.adapters)]
    if lora.enabled and not info.adapters:
        rows.append(("adapter", "none"))
    return rows


def _adapter_line(a: pb.Adapter) -> str:
    """One adapter: name, rank, target modules, loaded or not, where it came from."""
    targets = ", ".join(a.target_modules) or "?"
    return (f"{a.name}: rank {a.rank}, targets {targets}, loaded {'yes' if a.loaded else 'no'}, "
            f"source {a.source or '?'}")  # fmt: skip


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmgrpc", description="Client for an llmgrpc server.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text")
    g.add_argument("prompt")
    g.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    _model_arg(g)
    _sampling_args(g)
    _generation_args(g)
    g.add_argument("--json-schema", help="file with a JSON schema the output must follow")
    g.add_argument("--regex")
    g.add_argument("--choice", action="append")
    g.add_argument("--json", action="store_true", help="print the whole response as JSON")
    g.add_argument("-v", "--verbose", action="store_true",
                   help="with --stream: print the final message")  # fmt: skip
    _connection_args(g)
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("tokenize", help="show token ids, strings and offsets")
    t.add_argument("text")
    _model_arg(t)
    t.add_argument("--truncate-prompt-tokens", type=int, metavar="K",
                   help="keep only the last K tokens")  # fmt: skip
    t.add_argument("--json", action="store_true")
    _connection_args(t)
    t.set_defaults(func=cmd_tokenize)

    i = sub.add_parser("info", help="describe the served model")
    i.add_argument("--json", action="store_true")
    _connection_args(i)
    i.set_defaults(func=cmd_info)

    h = sub.add_parser("health", help="gRPC health check")
    h.add_argument("--service", default=SERVICE_NAME, help='"" checks the process only')
    _connection_args(h)
    h.set_defaults(func=cmd_health)

    # Here, not at the top: these import this module's helpers.
    from llmgrpc import adapters_cli, chat

    chat.add_parser(sub)
    adapters_cli.add_parser(sub)
    try:
        from llmgrpc import plan
    except ImportError:  # pragma: no cover - plan ships with the package
        pass
    else:
        plan.add_parser(sub)
        sub.choices["plan"].set_defaults(func=plan.run)
    try:
        from llmgrpc import bench
    except ImportError:
        pass
    else:
        bench.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        raise SystemExit(args.func(args))
    except grpc.RpcError as e:
        print(f"llmgrpc: {e.code().name}: {e.details()}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
