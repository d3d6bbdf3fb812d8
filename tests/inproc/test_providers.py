"""The local provider's nodes are real agent processes; the daemon's own wheel installs and runs."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import trio

import burla
from burla.common.config import NodeGroupConfig
from burla.daemon.dist import Dist, build_wheel
from burla.daemon.providers import Boot, LocalProvider, cpus_of_machine_type


def test_machine_type_names_state_their_cpus() -> None:
    assert cpus_of_machine_type("e2-standard-4") == 4
    assert cpus_of_machine_type("n2-highcpu-96") == 96
    assert cpus_of_machine_type("a2-highgpu-1g") == 1
    assert cpus_of_machine_type("f1-micro") == 1


async def test_a_local_node_is_an_agent_process_until_deleted(tmp_path: Path) -> None:
    provider = LocalProvider(tmp_path / "nodes", "test")
    group = NodeGroupConfig(machine_type="e2-standard-2")
    assert await provider.machine(group) == (2, 8 * 10**9)
    # no daemon at this URL: the agent keeps trying to register, which is all this test needs
    instance = await provider.create("node-1", 0, group, Boot("http://127.0.0.1:9", "burla_node_x", burla.__version__))
    assert instance.name == "node-1"
    pid = int((tmp_path / "nodes" / "node-1" / "pid").read_text())
    assert [(i.name, i.group, i.status) for i in await provider.list()] == [("node-1", 0, "RUNNING")]
    environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    assert b"BURLA_AGENT_INSTANCE=node-1" in environ and b"BURLA_AGENT_TOKEN=burla_node_x" in environ
    assert b"burla_node_x" not in (Path("/proc") / str(pid) / "cmdline").read_bytes()  # never in argv
    await provider.delete("node-1")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert await provider.list() == []
    await provider.delete("node-1")  # gone already: fine
    await provider.aclose()


async def test_a_restarted_daemon_finds_the_local_nodes_still_running(tmp_path: Path) -> None:
    first = LocalProvider(tmp_path / "nodes", "test")
    await first.create("node-2", 1, NodeGroupConfig(cpus=1), Boot("http://127.0.0.1:9", "t", burla.__version__))
    await first.aclose()
    second = LocalProvider(tmp_path / "nodes", "test")
    assert [(i.name, i.group, i.status) for i in await second.list()] == [("node-2", 1, "RUNNING")]
    await second.delete("node-2")
    assert await second.list() == []
    await trio.sleep(0)


def test_the_daemons_wheel_is_the_same_for_the_same_source_and_installs_a_working_burlad(tmp_path: Path) -> None:
    one = build_wheel(tmp_path / "a", "9.9.9").read_bytes()
    two = build_wheel(tmp_path / "b", "9.9.9").read_bytes()
    assert one == two
    wheel = tmp_path / "a" / "burla-9.9.9-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    assert "burla/daemon/cli.py" in names and "burla/node_agent/worker_shim.py" in names
    assert "burla-9.9.9.dist-info/RECORD" in names and not any("__pycache__" in n for n in names)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True, timeout=120,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *sys.path[1:]])}
    out = subprocess.run(
        [sys.executable, "-P", "-c", "import burla, burla.daemon.cli; print(burla.__file__, burla.__version__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(target / "burla" / "__init__.py"), burla.__version__]
    assert (target / "bin" / "burlad").exists()


def test_dist_serves_only_its_own_names(tmp_path: Path) -> None:
    house = tmp_path / "wheelhouse"
    house.mkdir()
    (house / "trio-0.31.0-py3-none-any.whl").write_bytes(b"wheel")
    (house / "notes.txt").write_text("not a wheel")
    dist = Dist(tmp_path / "build", "1.2.3", str(house))
    assert set(dist.files()) == {"trio-0.31.0-py3-none-any.whl", "burla-1.2.3-py3-none-any.whl"}
    assert dist.file("../../etc/passwd") is None and dist.file("notes.txt") is None
    assert dist.file("trio-0.31.0-py3-none-any.whl") == house / "trio-0.31.0-py3-none-any.whl"
    assert 'href="trio-0.31.0-py3-none-any.whl#sha256=' in dist.index()


def test_many_nodes_asking_for_the_wheel_at_once_all_get_it(tmp_path: Path) -> None:
    import concurrent.futures

    dist = Dist(tmp_path / "build", "4.5.6")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        pages = list(pool.map(lambda _: dist.index(), range(8)))
    assert len(set(pages)) == 1 and "burla-4.5.6-py3-none-any.whl#sha256=" in pages[0]
    assert [p.name for p in (tmp_path / "build").iterdir()] == ["burla-4.5.6-py3-none-any.whl"]  # no temp files left
