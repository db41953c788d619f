"""The multi-node leader's side (vllm_adapter/multinode.py), without an engine.

The flags are vLLM's own and reach its EngineArgs through our parser; the
rendezvous count is read from real sockets (a listening one stands in for
node 0's TCPStore, one connection per rank, as torch's store holds them);
the whole run on the engine is tests/integration/test_multinode.py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest
from llmgrpc_server.main import parse
from llmgrpc_server.vllm_adapter import multinode
from llmgrpc_server.vllm_adapter.multinode import Topology, rendezvous_connections, topology

from tests.ports import free_port
from tests.waiting import eventually


def leader(master_port: int = 29517) -> list[str]:
    return ["--model", "tiny-llama-gqa", "--nnodes", "2", "--node-rank", "0",
            "--master-addr", "127.0.0.1", "--master-port", str(master_port),
            "--pipeline-parallel-size", "2"]  # fmt: skip


def test_the_multi_node_flags_reach_vllms_engine_args() -> None:
    _, args = parse(leader())
    assert (args.nnodes, args.node_rank, args.master_addr, args.master_port) == (
        2, 0, "127.0.0.1", 29517,
    )  # fmt: skip
    assert args.pipeline_parallel_size == 2
    assert topology(args) == Topology(2, 0, "127.0.0.1", 29517, world_size=2)
    # vLLM's own config accepts them as the leader's (no engine is started).
    parallel = args.create_engine_config().parallel_config
    assert (parallel.nnodes, parallel.node_rank, parallel.world_size) == (2, 0, 2)
    assert parallel.local_world_size == 1


def test_one_node_is_not_multi_node() -> None:
    _, args = parse(["--model", "tiny-llama-gqa"])
    assert not topology(args).multi_node


def test_a_worker_rank_is_refused_naming_vllms_headless_mode() -> None:
    with pytest.raises(ValueError, match=r"node 0 \(the leader\).*--headless --node-rank 1"):
        Topology(2, 1, "10.0.0.1", 29500, world_size=2)
    with pytest.raises(ValueError, match="below --nnodes"):
        Topology(2, 2, "10.0.0.1", 29500, world_size=2)
    with pytest.raises(ValueError, match="do not divide"):
        Topology(2, 0, "10.0.0.1", 29500, world_size=3)


def test_nodes_missing_counts_whole_nodes() -> None:
    # TP 8 x PP 2 on 2 nodes: 8 ranks per node.
    where = Topology(2, 0, "10.0.0.1", 29500, world_size=16)
    assert [where.nodes_missing(n) for n in (0, 1, 8, 9, 15, 16)] == [1, 1, 1, 1, 1, 0]


@contextmanager
def store(ranks: int) -> Iterator[tuple[int, ExitStack]]:
    """A listening socket with `ranks` clients connected; the stack connects more."""
    with ExitStack() as stack:
        server = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        port = server.getsockname()[1]
        for _ in range(ranks):
            connect(stack, port, server)
        yield port, stack


def connect(stack: ExitStack, port: int, server: socket.socket) -> None:
    stack.enter_context(socket.create_connection(("127.0.0.1", port)))
    stack.enter_context(server.accept()[0])


def test_rendezvous_connections_counts_the_stores_clients() -> None:
    with store(0) as (port, _):
        assert rendezvous_connections(port) == 0
    with store(2) as (port, _):
        assert rendezvous_connections(port) == 2
    assert rendezvous_connections(port) is None  # nothing listens any more


class Lines(logging.Handler):
    """The log's lines as they come, for a test to wait on."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self.changed.set()

    async def until(self, text: str) -> None:
        while not any(text in line for line in self.lines):
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 10)


async def test_the_leader_logs_the_nodes_it_waits_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(multinode, "POLL_INTERVAL", 0.01)
    logger, lines = logging.getLogger(multinode.__name__), Lines()
    monkeypatch.setattr(logger, "level", logging.INFO)
    logger.addHandler(lines)
    port = free_port()  # nobody listens there (yet): no store is open
    _, args = parse(leader(port))
    loaded = asyncio.Event()

    async def load() -> str:
        await loaded.wait()
        return "engine"

    waiting = asyncio.ensure_future(multinode.while_joining(args, load))
    where = f"127.0.0.1:{port}"
    try:
        await lines.until(f"waiting for 1 of 2 nodes to join at {where}")
        await lines.until(f"waiting for node 0's rendezvous to open at {where}")
        with ExitStack() as stack:  # node 0's worker opens the store and connects
            server = stack.enter_context(socket.create_server(("127.0.0.1", port)))
            connect(stack, port, server)
            await lines.until(
                f"waiting for 1 of 2 nodes to join at {where} (1 of 2 ranks connected)"
            )
            connect(stack, port, server)  # node 1's rank
            await lines.until(f"all 2 nodes joined at {where} (2 ranks)")
            assert not waiting.done()  # the engine's start goes on
            loaded.set()
            assert await asyncio.wait_for(waiting, 10) == "engine"
    finally:
        logger.removeHandler(lines)


async def test_an_engine_up_between_two_polls_still_logs_that_all_joined(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(multinode, "POLL_INTERVAL", 3600.0)
    logger, lines = logging.getLogger(multinode.__name__), Lines()
    monkeypatch.setattr(logger, "level", logging.INFO)
    logger.addHandler(lines)
    port = free_port()
    _, args = parse(leader(port))

    async def load() -> str:
        await lines.until("waiting for node 0's rendezvous to open")  # the one poll
        return "engine"

    try:
        assert await asyncio.wait_for(multinode.while_joining(args, load), 10) == "engine"
        assert lines.lines[-1] == f"all 2 nodes joined at 127.0.0.1:{port} (2 ranks)"
    finally:
        logger.removeHandler(lines)


class Llm:
    """AsyncLLM's two members NodeWatch reads: each check answers after `answer_after` s."""

    def __init__(self, answer_after: float) -> None:
        self.errored = False
        self.answer_after = answer_after
        self.checks = 0

    async def collective_rpc(self, method: str, timeout: float) -> list[None]:
        assert (method, timeout) == ("check_health", multinode.CHECK_TIMEOUT)
        self.checks += 1
        if self.answer_after > timeout:  # vLLM's executor gives up at its timeout
            await asyncio.sleep(timeout)
            raise TimeoutError("RPC call to check_health timed out.")
        await asyncio.sleep(self.answer_after)
        return [None, None]


TWO_NODES = Topology(2, 0, "127.0.0.1", 29517, world_size=2)


async def test_node_watch_counts_a_node_that_does_not_answer_as_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(multinode, "CHECK_INTERVAL", 0.01)
    monkeypatch.setattr(multinode, "CHECK_TIMEOUT", 0.2)
    healthy, gone = Llm(answer_after=0.0), Llm(answer_after=60.0)
    watches = [multinode.NodeWatch(healthy, TWO_NODES), multinode.NodeWatch(gone, TWO_NODES)]
    try:
        assert await eventually(lambda: watches[1].lost, 10)
        assert gone.checks == 1
        assert await eventually(lambda: healthy.checks >= 5, 10)
        assert not watches[0].lost
    finally:
        for watch in watches:
            watch.stop()


async def test_node_watch_leaves_a_dead_engine_and_one_node_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(multinode, "CHECK_INTERVAL", 0.01)
    dead, alone = Llm(answer_after=0.0), Llm(answer_after=0.0)
    dead.errored = True  # vLLM already says so: nothing to add
    watches = [multinode.NodeWatch(dead, TWO_NODES),
               multinode.NodeWatch(alone, Topology(1, 0, "127.0.0.1", 29517, world_size=1))]  # fmt: skip
    await asyncio.sleep(0.2)
    assert (dead.checks, alone.checks) == (0, 0)
    assert not any(watch.lost for watch in watches)
    for watch in watches:
        watch.stop()
