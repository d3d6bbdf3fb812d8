"""A real burlad bound to 127.0.0.1 port 0 inside the test's nursery, and an in-process agent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from burla.common.config import AgentConfig, DaemonConfig
from burla.daemon.server import Running, serve
from burla.node_agent.agent import Agent


@pytest.fixture
async def daemon(tmp_path: Path, nursery: trio.Nursery) -> Running:
    config = DaemonConfig(port=0, state_dir=str(tmp_path / "daemon"), poll_timeout=0.5, agent_timeout=3,
                          bad_token_burst=1_000_000)  # tests send many bad tokens on purpose  # fmt: skip
    running: Running = await nursery.start(serve, config)
    return running


@pytest.fixture
async def agent(daemon: Running, tmp_path: Path, nursery: trio.Nursery) -> Agent:
    config = AgentConfig(url=daemon.url, token=daemon.node_token, workers=2, state_dir=str(tmp_path / "agent"))
    started: Agent = await nursery.start(Agent(config).run)
    with trio.fail_after(30):
        while daemon.plane.scheduler.nodes[started.agent_id].stats.get("idle", 0) < 2:
            await trio.sleep(0.05)
    return started


@pytest.fixture
async def admin(daemon: Running) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=daemon.url, headers={"authorization": f"Bearer {daemon.admin_token}"}) as c:
        yield c
