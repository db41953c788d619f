"""One model across nodes: the leader's side of vLLM's multi-node launch.

vLLM runs a model over N nodes without Ray: node 0 runs the engine with
`--nnodes N --node-rank 0 --master-addr ADDR --master-port PORT` and the
tensor/pipeline parallel sizes, every other node runs `vllm serve --headless
--node-rank K` with the same model and sizes. llmgrpc-server is node 0.

The engine's start then blocks in torch.distributed's rendezvous: node 0's
first worker listens on ADDR:PORT (a TCPStore) until every rank of the world
(tensor x pipeline x context parallel) has connected, for as long as
torch's process-group timeout (30 minutes). vLLM logs nothing meanwhile. This
module says what the leader waits for: it counts the store's connections
(one per rank) in the kernel's socket table, so it joins no group and
changes nothing in vLLM, and logs each change. Health stays NOT_SERVING
throughout, as during any load (server.py).

Once up, vLLM notices a lost node only inside a step: its worker monitor
watches local processes only, so a node that dies or hangs while the engine
is idle goes unseen until the next request fails (docs/spikes/multinode-cpu.md).
`NodeWatch` closes that gap with vLLM's own health RPC to every rank.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
POLL_INTERVAL = 1.0
# The nodes' liveness check once up: vLLM's Executor.check_health timeout (10 s),
# every CHECK_INTERVAL seconds; a lost node is seen within their sum.
CHECK_INTERVAL = 5.0
CHECK_TIMEOUT = 10.0
# While nothing changes, the wait is logged again this often.
REMIND_INTERVAL = 30.0
_TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
_LISTEN, _ESTABLISHED = "0A", "01"


@dataclass(frozen=True)
class Topology:
    """Where this engine sits in a multi-node world (vLLM's own flags)."""

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    # Ranks in the world: tensor x pipeline x prefill-context parallel.
    world_size: int

    def __post_init__(self) -> None:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} must be below --nnodes {self.nnodes}")
        if self.nnodes > 1 and self.node_rank != 0:
            raise ValueError(
                f"--node-rank {self.node_rank}: llmgrpc-server is node 0 (the leader); "
                f"run the other nodes as vLLM headless workers "
                f"(python -m vllm.entrypoints.cli.main serve MODEL --headless "
                f"--node-rank {self.node_rank} ...)"
            )
        if self.world_size % self.nnodes:
            raise ValueError(
                f"the world's {self.world_size} ranks (tensor x pipeline parallel) "
                f"do not divide over --nnodes {self.nnodes}"
            )

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    @property
    def address(self) -> str:
        return f"{self.master_addr}:{self.master_port}"

    def nodes_missing(self, ranks_connected: int) -> int:
        """Nodes not yet joined, counting whole nodes' ranks; node 0 is this one."""
        joined = max(1, ranks_connected // self.ranks_per_node)
        return self.nnodes - min(joined, self.nnodes)


def topology(args: Any) -> Topology:
    """The topology `AsyncEngineArgs` describe."""
    world = (
        int(args.tensor_parallel_size)
        * int(args.pipeline_parallel_size)
        * int(getattr(args, "prefill_context_parallel_size", 1) or 1)
    )
    return Topology(
        nnodes=int(args.nnodes),
        node_rank=int(args.node_rank),
        master_addr=str(args.master_addr),
        master_port=int(args.master_port),
        world_size=world,
    )


def rendezvous_connections(port: int, tables: tuple[Path, ...] = _TCP_TABLES) -> int | None:
    """Ranks connected to the rendezvous store listening on `port` here, or
    None while nothing listens on it (node 0's worker has not started it).

    Each rank, node 0's own included, holds one connection to the store; its
    server side is an established socket whose local port is `port`.
    """
    listening, established = False, 0
    for table in tables:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue  # no IPv6, say
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) != port:
                continue
            listening |= fields[3] == _LISTEN
            established += fields[3] == _ESTABLISHED
    return established if listening else None


async def while_joining(args: Any, start: Callable[[], Awaitable[T]]) -> T:
    """Await `start()` (the engine's start); on a multi-node leader, log the
    nodes it waits for until it is done. A topology this server cannot lead
    is a ValueError before anything starts."""
    where = topology(args)
    if not where.multi_node:
        return await start()
    log.info(
        "multi-node engine: this is node 0 of %d (%d ranks, %d per node); waiting for "
        "%d of %d nodes to join at %s",
        where.nnodes, where.world_size, where.ranks_per_node,
        where.nnodes - 1, where.nnodes, where.address,
    )  # fmt: skip
    watch = asyncio.ensure_future(_watch(where))
    try:
        engine = await start()
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
    if watch.cancelled():  # the engine came up between two polls: all had joined
        _log_joined(where)
    return engine


async def _watch(where: Topology) -> None:
    """Log each change in the rendezvous until the world is complete."""
    loop = asyncio.get_running_loop()
    last: int | None = -1
    logged_at = loop.time()
    while True:
        connected = rendezvous_connections(where.master_port)
        if connected is not None and connected >= where.world_size:
            _log_joined(where)
            return
        if connected != last or loop.time() - logged_at >= REMIND_INTERVAL:
            _log_waiting(where, connected)
            last, logged_at = connected, loop.time()
        await asyncio.sleep(POLL_INTERVAL)


def _log_joined(where: Topology) -> None:
    log.info("all %d nodes joined at %s (%d ranks)", where.nnodes, where.address, where.world_size)


def _log_waiting(where: Topology, connected: int | None) -> None:
    if connected is None:
        log.info("waiting for node 0's rendezvous to open at %s", where.address)
        return
    log.info(
        "waiting for %d of %d nodes to join at %s (%d of %d ranks connected)",
        where.nodes_missing(connected), where.nnodes, where.address,
        connected, where.world_size,
    )  # fmt: skip


class NodeWatch:
    """Every rank of a multi-node engine answers, or the engine counts as dead.

    Every CHECK_INTERVAL seconds, a `check_health` call to every worker of
    every node (`AsyncLLM.collective_rpc`, what vLLM's own
    `Executor.check_health` sends; the engine core runs it between steps).
    No answer within CHECK_TIMEOUT seconds: a node died or hangs, `lost`
    turns True, and the engine reports itself dead (the server then turns
    NOT_SERVING, fails the calls in flight UNAVAILABLE and exits 1).
    """

    def __init__(self, llm: Any, where: Topology) -> None:
        self.lost = False
        self._task = asyncio.ensure_future(self._watch(llm, where)) if where.multi_node else None

    async def _watch(self, llm: Any, where: Topology) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            if llm.errored:  # dead already: vLLM said so
                return
            try:
                await llm.collective_rpc("check_health", timeout=CHECK_TIMEOUT)
            except Exception:
                if llm.errored:
                    return
                log.exception(
                    "a node of the engine did not answer its health check within %g s "
                    "(dead or hung; the engine's world is at %s)", CHECK_TIMEOUT, where.address,
                )  # fmt: skip
                self.lost = True
                return

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
