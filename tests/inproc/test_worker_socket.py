"""The agent's socket for its workers: every connection it accepts is closed, the agent stopping included."""

from __future__ import annotations

import gc
from pathlib import Path

import trio

from burla.node_agent.process_runtime import ProcessRuntime
from burla.node_agent.startup import WorkerStarter


async def test_a_connection_still_saying_hello_is_closed_when_the_agent_stops(tmp_path: Path) -> None:
    starter = WorkerStarter(ProcessRuntime(), 0.1)
    client = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with client:
        async with trio.open_nursery() as nursery:
            await starter.listen(nursery, tmp_path)
            await client.connect(starter.socket_path)
            await trio.sleep(0.05)  # accepted: its greeter waits for a hello that never comes
            nursery.cancel_scope.cancel()
        gc.collect()  # a socket left open warns here (the suite turns warnings into errors)
        with trio.fail_after(2):
            assert await client.recv(1) == b""  # the agent closed its end
