"""`llmgrpc chat`: an interactive multi-turn chat with the served model.

Reads one user message a line from stdin, sends the whole conversation (the
--system message, then the user and assistant turns) as chat input, which the
server renders with the model's chat template, and prints the reply as it
streams. The prompt and the greeting appear only when stdin is a terminal, so
piped input gives the replies alone on stdout, one a line. A reply is at most
--max-tokens tokens (default 256), sampled at --temperature 0.2 and --top-p 0.9
unless given (what SmolLM2's authors suggest: a small model rambles at 1.0).

    /reset          forget the conversation (the --system message stays)
    /exit, /quit    end (so does Ctrl-D); Ctrl-C stops a reply, or ends at the prompt
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Generator, Iterator
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from llmgrpc.cli import _client, _connection_args, _model_arg, _sampling, _sampling_args
from llmgrpc.client import Client
from llmgrpc.v1 import llm_service_pb2 as pb

PROMPT = "you> "
START_DEADLINE_S = 5.0  # the first call's deadline: an unreachable server fails fast
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE, DEFAULT_TOP_P = 0.2, 0.9
Messages = list[tuple[str, str]]


def add_parser(subparsers: Any) -> None:
    """Register the `chat` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser(
        "chat", help="an interactive multi-turn chat with the model", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--system", help="a system message that starts the conversation")
    _model_arg(p)
    _sampling_args(p)
    p.set_defaults(max_tokens=DEFAULT_MAX_TOKENS, temperature=DEFAULT_TEMPERATURE,
                   top_p=DEFAULT_TOP_P)
    p.add_argument("-v", "--verbose", action="store_true", help="print each reply's token usage")
    _connection_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """0 at EOF or /exit; 1 when the chat cannot start; 130 on Ctrl-C at the prompt."""
    interactive = sys.stdin.isatty()
    if interactive:
        # Ctrl-C must work even when the parent started us with SIGINT blocked
        # or ignored (a mask and SIG_IGN are inherited across exec).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with _client(args) as client:
            try:
                with _sigint_blocked():  # grpc starts its threads here: they inherit it
                    info = client.model_info(timeout=args.timeout or START_DEADLINE_S)
            except grpc.RpcError as e:
                _note(f"llmgrpc chat: cannot start with {args.target}: "
                      f"{e.code().name}: {e.details()}")  # fmt: skip
                return 1
            if not info.capabilities.chat_template:
                _note(f"llmgrpc chat: {info.model_name} has no chat template; "
                      "use `llmgrpc generate` with a prompt")  # fmt: skip
                return 1
            if interactive:
                _line_editing()
                name = f"{args.model} on {info.model_name}" if args.model else info.model_name
                _note(f"Chatting with {name}. /reset forgets the conversation, "
                      "/exit or Ctrl-D ends.")  # fmt: skip
            _converse(client, args, interactive)
    except KeyboardInterrupt:
        print(file=sys.stderr)  # after the "^C" the terminal echoed
        return 130
    return 0


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread meanwhile, so in the threads it starts.

    Ctrl-C then always reaches this (the main) thread: one that the kernel
    handed to a grpc thread would not interrupt readline's wait at the
    prompt, and the chat would not end."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _converse(client: Client, args: argparse.Namespace, interactive: bool) -> None:
    """The read-send-print loop, until EOF or /exit."""
    start: Messages = [("system", args.system)] if args.system else []
    history = list(start)
    options = {**_sampling(args), "model": args.model}
    while (line := _read(interactive)) is not None:
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = list(start)
            _note("(the conversation is forgotten)")
        elif text:
            turn: Messages = [("user", text)]
            reply = _reply(client, history + turn, options, args.verbose)
            if reply is not None:  # a failed or stopped turn is not kept
                history += [*turn, ("assistant", reply)]


def _read(interactive: bool) -> str | None:
    """The next line of input; None at EOF."""
    try:
        return input(PROMPT if interactive else "")
    except EOFError:
        if interactive:
            print(file=sys.stderr)  # so the shell's prompt starts a line of its own
        return None


def _reply(client: Client, messages: Messages, options: dict[str, Any], verbose: bool
           ) -> str | None:  # fmt: skip
    """Stream the answer to `messages` to stdout; its text, or None if it failed or was stopped.

    `options`: the model and sampling keywords of `Client.stream`."""
    parts: list[str] = []
    final = None
    # Client.stream is a generator function; closing it cancels the call.
    stream = cast(Generator[pb.GenerateResponse], client.stream(messages=messages, **options))
    try:
        with contextlib.closing(stream):  # on Ctrl-C too: the engine request is aborted
            for delta in stream:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                parts.append(delta.text)
                final = delta
    except KeyboardInterrupt:
        print()
        _note("(reply stopped; it is not kept in the conversation)")
        return None
    except grpc.RpcError as e:
        if parts:
            print()
        _report(e)
        return None
    print()
    if verbose and final is not None and final.HasField("usage"):
        _note(f"({final.usage.prompt_tokens} prompt tokens, "
              f"{final.usage.completion_tokens} completion tokens)")  # fmt: skip
    return "".join(parts)


def _report(e: grpc.RpcError) -> None:
    _note(f"llmgrpc chat: {e.code().name}: {e.details()}")
    if _too_long(e):
        _note("llmgrpc chat: the conversation is too long for the server; /reset starts anew")


def _too_long(e: grpc.RpcError) -> bool:
    """Whether the server refused the conversation for its length (tokens or messages)."""
    if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
        return False
    status = rpc_status.from_call(e)
    for packed in status.details if status else ():
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if packed.Unpack(info) and info.reason == "PROMPT_TOO_LONG":
            return True
        if packed.Unpack(bad) and any(v.field == "chat.messages" for v in bad.field_violations):
            return True
    return False


def _line_editing() -> None:
    """Arrow keys and line history for input(), where the platform has readline."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  # importing it is what turns it on


def _note(text: str) -> None:
    print(text, file=sys.stderr)
