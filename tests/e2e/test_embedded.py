"""The embedded default: a local cluster started on demand, shared, stopped when idle."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from burla import _local, remote_parallel_map
from burla.schemas.local import local_cluster_home
from tests.cluster import run_client, wait_for

pytestmark = pytest.mark.e2e

CLIENT = """
from burla import remote_parallel_map
def square(x):
    print("squaring", x)
    return x * x
assert remote_parallel_map(square, range(10), spinner=False) == [x * x for x in range(10)]
print("ok")
"""


@pytest.fixture
def local_home() -> Iterator[Path]:
    yield local_cluster_home()
    _local.stop()


def discovery(home: Path) -> dict[str, object]:
    return dict(json.loads((home / "daemon.json").read_text()))


def test_the_first_call_starts_a_local_cluster_and_later_ones_reuse_it(local_home: Path, tmp_path: Path) -> None:
    assert _local.discover() is None
    assert remote_parallel_map(abs, [-1, -2, -3], spinner=False) == [1, 2, 3]
    first = discovery(local_home)
    result = run_client(CLIENT, {}, tmp_path)  # another process of the same user
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("squaring") == 10 and result.stdout.strip().endswith("ok")
    assert discovery(local_home)["pid"] == first["pid"]


def test_concurrent_first_calls_start_one_cluster(local_home: Path, tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    procs = [
        subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.strip().endswith("ok")
    log = (local_home / "daemon.log").read_text()
    assert log.count("serving on") == 1


def test_the_local_cluster_stops_when_idle_and_starts_again(local_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BURLA_EMBEDDED_IDLE_TIMEOUT", "1.5")
    assert remote_parallel_map(abs, [-5], spinner=False) == [5]
    pid = int(discovery(local_home)["pid"])  # type: ignore[arg-type]
    wait_for(lambda: _local.discover() is None, 20, "the idle local cluster to stop")
    wait_for(lambda: not _local._alive(pid), 10, "the idle daemon process to exit")
    assert remote_parallel_map(abs, [-6], spinner=False) == [6]  # a new one, found by the same client
    assert int(discovery(local_home)["pid"]) != pid  # type: ignore[arg-type]


def test_the_wheel_installs_only_the_burla_package(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(root)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("burla-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"burla"}
    for part in ("burla/daemon/cli.py", "burla/node_agent/worker_shim.py", "burla/schemas/envelope.py"):
        assert part in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "burla = burla.cli:main" in text and "burlad = burla.daemon.cli:main" in text
