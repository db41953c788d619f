"""`llmgrpc chat` as a user runs it: a subprocess talking to a fake-engine
server, its stdin piped or a pseudo-terminal."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pty
import select
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from llmgrpc_server.errors import Overloaded

from tests.fake_server import FakeServer, start_fake
from tests.fakes import FakeEngine
from tests.waiting import eventually

DEADLINE_S = 10.0  # for any one wait on the CLI; the tests take a second or two each
FAIL = "please fail"  # a user turn the engine refuses


class RecordingEngine(FakeEngine):
    """The fake engine, keeping every request's chat messages; it refuses FAIL."""

    def __init__(self) -> None:
        super().__init__(max_model_len=256)
        self.chats: list[list[tuple[str, str]]] = []
        self.chat_template = True

    def model_info(self):  # type: ignore[no-untyped-def]
        return dataclasses.replace(super().model_info(), has_chat_template=self.chat_template)

    async def generate(self, request):  # type: ignore[no-untyped-def]
        turns = [(t.role, t.content) for t in request.chat.turns]
        self.chats.append(turns)
        if turns[-1] == ("user", FAIL):
            raise Overloaded("the server is at its admission limit")
        async for delta in super().generate(request):
            yield delta


@pytest.fixture
async def server() -> AsyncIterator[FakeServer]:
    srv = await start_fake(engine=RecordingEngine())
    yield srv
    await srv.running.server.stop(grace=0)


def chat_argv(target: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "llmgrpc.cli", "chat", "--target", target,
            "--max-tokens", "5", *args]  # fmt: skip


async def chat(target: str, stdin: str, *args: str) -> tuple[int, str, str]:
    """Run `llmgrpc chat` with `stdin` piped in; its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *chat_argv(target, *args), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), DEADLINE_S)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_each_turn_sends_the_whole_conversation_and_streams_the_reply(
    server: FakeServer,
) -> None:
    code, out, err = await chat(server.target, "hi\nagain\n", "--system", "be brief")
    assert code == 0, err  # at EOF
    first, second = out.split("\n")[:2]
    assert out == f"{first}\n{second}\n" and len(first) == len(second) == 5
    assert server.engine.chats == [
        [("system", "be brief"), ("user", "hi")],
        [("system", "be brief"), ("user", "hi"), ("assistant", first), ("user", "again")],
    ]
    assert err == ""  # piped: no prompt, no greeting


async def test_a_failed_turn_is_reported_and_left_out_of_the_conversation(
    server: FakeServer,
) -> None:
    code, out, err = await chat(server.target, f"hi\n{FAIL}\nagain\n")
    assert code == 0
    assert err == "llmgrpc chat: RESOURCE_EXHAUSTED: the server is at its admission limit\n"
    first, _ = out.splitlines()
    assert server.engine.chats[2] == [("user", "hi"), ("assistant", first), ("user", "again")]


async def test_reset_forgets_all_but_the_system_message(server: FakeServer) -> None:
    code, out, err = await chat(server.target, "hi\n/reset\nagain\n", "--system", "s", "-v")
    assert code == 0
    assert len(out.splitlines()) == 2
    assert server.engine.chats[1] == [("system", "s"), ("user", "again")]
    assert "(the conversation is forgotten)" in err
    assert err.count(" prompt tokens, 5 completion tokens)") == 2  # --verbose


@pytest.mark.parametrize("command", ["/exit", "/quit"])
async def test_blank_lines_are_skipped_and_exit_ends(server: FakeServer, command: str) -> None:
    code, out, err = await chat(server.target, f"\n   \n{command}\nhi\n")
    assert (code, out, err) == (0, "", "")
    assert server.engine.chats == []


async def test_a_conversation_too_long_suggests_reset(server: FakeServer) -> None:
    code, out, err = await chat(server.target, "x" * 300 + "\nhi\n")
    assert code == 0
    assert "llmgrpc chat: INVALID_ARGUMENT: prompt: 306 prompt tokens exceed" in err
    assert "too long for the server; /reset" in err
    assert len(out.splitlines()) == 1  # and the chat goes on
    assert server.engine.chats[1] == [("user", "hi")]


async def test_a_model_without_a_chat_template_is_refused_at_start(server: FakeServer) -> None:
    server.engine.chat_template = False
    code, out, err = await chat(server.target, "hi\n")
    assert (code, out) == (1, "")
    assert err == ("llmgrpc chat: fake has no chat template; "
                   "use `llmgrpc generate` with a prompt\n")  # fmt: skip


async def test_an_unreachable_server_fails_fast() -> None:
    with socket.socket() as bound:  # bound, never listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        code, out, err = await chat(f"127.0.0.1:{bound.getsockname()[1]}", "hi\n")
    assert (code, out) == (1, "")
    assert err.startswith("llmgrpc chat: cannot start with 127.0.0.1:") and "UNAVAILABLE" in err


class Terminal:
    """The master side of a pseudo-terminal: what the CLI shows, and typing."""

    def __init__(self) -> None:
        self.fd, self.slave = pty.openpty()
        self.pending = b""

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    async def expect(self, text: str) -> str:
        """Everything shown up to and including the next `text`."""
        return await asyncio.to_thread(self._expect, text.encode())

    def _expect(self, needle: bytes) -> str:
        deadline = time.monotonic() + DEADLINE_S
        while (at := self.pending.find(needle)) < 0:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self.fd], [], [], left)[0], \
                f"no {needle!r} within {DEADLINE_S} s in {self.pending!r}"  # fmt: skip
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # EIO: the CLI closed the terminal
                chunk = b""
            assert chunk, f"the terminal closed before {needle!r}: {self.pending!r}"
            self.pending += chunk
        shown, self.pending = self.pending[: at + len(needle)], self.pending[at + len(needle) :]
        return shown.decode(errors="replace")

    def close(self) -> None:
        os.close(self.fd)


async def interactive_chat(target: str, term: Terminal, *args: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        *chat_argv(target, *args), stdin=term.slave, stdout=term.slave, stderr=term.slave
    )
    os.close(term.slave)
    return proc


async def test_on_a_terminal_it_prompts_and_ctrl_c_stops_only_the_reply(
    server: FakeServer,
) -> None:
    engine = server.engine
    engine.step_delay = 0.25  # a 200-token reply takes 50 s: it is interrupted, not over
    term = Terminal()
    proc = await interactive_chat(server.target, term, "--max-tokens", "200")
    try:
        assert "Chatting with fake." in await term.expect("you> ")
        term.type("hi\n")
        assert await eventually(lambda: bool(engine.running), timeout=DEADLINE_S)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        assert "(reply stopped" in await term.expect("you> ")
        assert await eventually(lambda: bool(engine.aborted), timeout=DEADLINE_S)
        engine.step_delay = 0.0
        term.type("again\n")
        await term.expect("you> ")
        term.type("\x04")  # Ctrl-D
        assert await asyncio.wait_for(proc.wait(), DEADLINE_S) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
        term.close()
    assert engine.chats == [[("user", "hi")], [("user", "again")]]


def _reading_the_terminal(pid: int) -> bool:
    """The CLI's main thread is asleep in readline's select() on the terminal.

    Seeing the prompt is not enough: readline shows it before it starts that
    select(), and a SIGINT in between is only noticed once a key is typed
    (CPython's readline_until_enter_or_signal checks signals after select()
    fails with EINTR). On a loaded machine the window is wide enough to hit
    (seen in CI: the test waited 10 s for an exit that needed a key)."""
    try:
        wchan = Path(f"/proc/{pid}/task/{pid}/wchan").read_text()
    except OSError:
        return False
    return "select" in wchan or "poll" in wchan


async def test_ctrl_c_at_the_prompt_ends_quietly_with_130(server: FakeServer) -> None:
    term = Terminal()
    proc = await interactive_chat(server.target, term)
    try:
        await term.expect("you> ")
        assert await eventually(lambda: _reading_the_terminal(proc.pid), timeout=DEADLINE_S)
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), DEADLINE_S) == 130
        shown = await asyncio.to_thread(_rest, term)
    finally:
        if proc.returncode is None:
            proc.kill()
        term.close()
    assert "Traceback" not in shown and "KeyboardInterrupt" not in shown


def _rest(term: Terminal) -> str:
    """What the terminal shows after the last expect, until the CLI closed it."""
    shown = term.pending
    while select.select([term.fd], [], [], DEADLINE_S)[0]:
        try:
            chunk = os.read(term.fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    return shown.decode(errors="replace")
