"""The client's Python environment, replicated on the workers and cached, on both runtimes.

Clients run as users run them: a script in its own project folder, in its own
environment (packages installed with pip --target on its PYTHONPATH), calling
remote_parallel_map on a real cluster whose workers lack those packages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster, run_client, wait_for

pytestmark = pytest.mark.e2e

PYPI_PACKAGE = "humanize==4.9.0"  # small, pure Python, not a dependency of burla or its tests


def build_wheel(folder: Path, name: str, version: str, body: str) -> Path:
    """A pure-Python wheel, made by hand: no build backend, no network."""
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": body,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: burla-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{dist_info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(f"{dist_info}/RECORD", record)
    return wheel


def pip_target(target: Path, *what: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
         "--target", str(target), *what],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def client_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Packages only the client has: a wheel built here (travels as files) and one from PyPI (as a pin)."""
    site = tmp_path_factory.mktemp("client-site")
    wheel = build_wheel(tmp_path_factory.mktemp("wheels"), "burlatestpkg", "1.0", "def answer():\n    return 42\n")
    pip_target(site, str(wheel), PYPI_PACKAGE)
    assert json.loads((site / "burlatestpkg-1.0.dist-info" / "direct_url.json").read_text())["url"].startswith("file:")
    return site


PROJECT_SCRIPT = """
import json, sys
from burla import remote_parallel_map

def uses_everything(x):
    import helpers                  # a module beside this script, imported remotely
    import burlatestpkg             # installed here from a wheel built by the test
    import humanize                 # installed here from PyPI
    return [helpers.double(x), burlatestpkg.answer(), humanize.__version__, humanize.__file__]

out = remote_parallel_map(uses_everything, range(3), spinner=False, **json.loads(sys.argv[1]))
print("RESULT", json.dumps(out))
"""


def project(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "helpers.py").write_text("def double(x):\n    return 2 * x\n")
    (root / "main.py").write_text(PROJECT_SCRIPT)
    return root


def run_project(root: Path, cluster: Cluster, site: Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **cluster.client_env(), "PYTHONPATH": str(site)}
    return subprocess.run(
        [sys.executable, str(root / "main.py"), json.dumps(kwargs)],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def node_stats(cluster: Cluster) -> dict[str, int]:
    return dict(cluster.status()["nodes"][0]["stats"])


def check_replication(cluster: Cluster, client_site: Path, tmp_path: Path) -> None:
    root = project(tmp_path / "project")
    phases: set[str] = set()
    done = threading.Event()

    def watch() -> None:  # what the spinner shows while the node installs
        while not done.is_set():
            phases.update(j["phase"] for j in cluster.status()["jobs"])
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        first = run_project(root, cluster, client_site)
    finally:
        done.set()
        watcher.join()
    assert first.returncode == 0, first.stderr[-3000:]
    assert any(re.fullmatch(r"installing \d+ packages? on 1 node", p) for p in phases), phases
    results = json.loads(first.stdout.split("RESULT", 1)[1])
    assert [r[:3] for r in results] == [[0, 42, "4.9.0"], [2, 42, "4.9.0"], [4, 42, "4.9.0"]]
    assert all("/envs/" in r[3] or "/burla/env/" in r[3] for r in results)  # from the node's cache
    stats = node_stats(cluster)
    assert stats["installs"] >= 2  # humanize from PyPI, burlatestpkg from its files
    # the warm workers had run nothing: they took the environment's path as it was, none was restarted
    assert stats.get("environments_adopted", 0) >= 1 and stats.get("environment_switches", 0) == 0, stats

    second = run_project(root, cluster, client_site)
    assert second.returncode == 0, second.stderr[-3000:]
    again = node_stats(cluster)
    assert again["installs"] == stats["installs"]  # nothing installed the second time
    assert again["environments_prepared"] == stats["environments_prepared"]  # the prepared one was reused

    cluster.kill_agent(0, signal.SIGTERM)  # the cache lives in the agent's state dir: it survives a restart
    cluster.start_agent(0)
    wait_for(lambda: cluster.status()["nodes"] and node_stats(cluster).get("idle", 0) == 2, 60, "the agent back")
    third = run_project(root, cluster, client_site)
    assert third.returncode == 0, third.stderr[-3000:]
    restarted = node_stats(cluster)
    assert restarted.get("installs", 0) == 0 and restarted["dists_reused"] >= 2

    failed = run_project(root, cluster, client_site, requirements=["burla-no-such-package==9.9.9"])
    assert failed.returncode != 0
    assert "InstallError" in failed.stderr and "burla-no-such-package==9.9.9 failed to install on node" in failed.stderr


@pytest.fixture
def process_cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path / "cluster", agents=1, workers=2)
    yield cluster
    cluster.stop()


def test_process_workers_get_the_clients_packages_and_local_code(
    process_cluster: Cluster, client_site: Path, tmp_path: Path
) -> None:
    check_replication(process_cluster, client_site, tmp_path)


def test_workers_of_another_user_get_the_clients_packages_and_local_code(client_site: Path, tmp_path: Path) -> None:
    """agent.worker_user: the node's cache (in the agent's state dir) is the worker user's group's to read."""
    from tests.e2e.test_worker_user import WORKER_USER, require_worker_user

    require_worker_user()
    root = Path(tempfile.mkdtemp(prefix="burla-worker-env-"))  # pytest's tmp dirs are 0700: not passable
    root.chmod(0o755)
    cluster = Cluster(root / "cluster", agents=1, workers=2, env={"BURLA_AGENT_WORKER_USER": WORKER_USER})
    try:
        check_replication(cluster, client_site, tmp_path)
        # installed as the worker user, then the agent's: no later job's calls can change a cached package
        cache = root / "cluster" / "agent0" / "envs"
        found = [p for p in cache.rglob("*") if not p.is_symlink()]
        assert any(p.name == "humanize" for p in found)
        assert not [p for p in found if p.stat().st_uid != os.geteuid() or p.stat().st_mode & 0o022]
        assert not [p for p in found if p.name == ".burla-install-home"]
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_an_environment_does_not_leak_into_another_jobs_workers(
    process_cluster: Cluster, client_site: Path, tmp_path: Path
) -> None:
    root = project(tmp_path / "project")
    assert run_project(root, process_cluster, client_site).returncode == 0
    plain = run_client(
        "from burla import remote_parallel_map\n"
        "def probe(_):\n"
        "    import importlib.util\n"
        "    return [importlib.util.find_spec(m) is None for m in ('burlatestpkg', 'humanize', 'helpers')]\n"
        "print('RESULT', remote_parallel_map(probe, range(2), spinner=False))\n",
        process_cluster.client_env(),
        tmp_path / "elsewhere" if (tmp_path / "elsewhere").mkdir() is None else tmp_path,
    )
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.split("RESULT", 1)[1].strip() == "[[True, True, True], [True, True, True]]"


SLOW_PROJECT_SCRIPT = """
import json, time
from burla import remote_parallel_map

def slow_uses_everything(x):
    import helpers, burlatestpkg, humanize
    time.sleep(0.3)
    return [helpers.double(x), burlatestpkg.answer(), humanize.__version__]

print("RESULT", json.dumps(remote_parallel_map(slow_uses_everything, range(20), spinner=False)))
"""


def test_burlad_restarted_while_a_job_with_its_own_environment_installs_loses_nothing(
    process_cluster: Cluster, client_site: Path, tmp_path: Path
) -> None:
    root = project(tmp_path / "project")
    (root / "main.py").write_text(SLOW_PROJECT_SCRIPT)
    env = {**os.environ, **process_cluster.client_env(), "PYTHONPATH": str(client_site)}
    with subprocess.Popen(
        [sys.executable, str(root / "main.py")], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    ) as client:  # fmt: skip
        try:
            wait_for(
                lambda: any(j["phase"].startswith("installing") for j in process_cluster.status()["jobs"]),
                120,
                "the node installing the job's packages",
                interval=0.02,
            )
            process_cluster.restart_daemon()  # SIGKILL, then a new burlad on the same state
            out, err = client.communicate(timeout=300)
        finally:
            client.kill()
    assert client.returncode == 0, err[-3000:]
    assert json.loads(out.split("RESULT", 1)[1]) == [[2 * x, 42, "4.9.0"] for x in range(20)]  # each once, in order
    assert process_cluster.status()["daemon"].get("jobs_restored", 0) == 1
    stats = node_stats(process_cluster)
    assert stats["environments_prepared"] == 1 and stats.get("environment_failures", 0) == 0


def test_a_package_built_for_another_platform_is_refused_before_any_call(
    process_cluster: Cluster, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    wheel = build_wheel(tmp_path, "burlamacpkg", "1.0", "X = 1\n")
    pip_target(site, str(wheel))
    wheel_file = site / "burlamacpkg-1.0.dist-info" / "WHEEL"
    wheel_file.write_text(wheel_file.read_text().replace("Tag: py3-none-any", "Tag: cp311-cp311-macosx_11_0_arm64"))
    script = (
        "from burla import remote_parallel_map\n"
        "def f(x):\n    import burlamacpkg\n    return burlamacpkg.X\n"
        "remote_parallel_map(f, [1], spinner=False)\n"
    )
    result = run_client(script, {**process_cluster.client_env(), "PYTHONPATH": str(site)}, tmp_path)
    assert result.returncode != 0
    assert "InstallError" in result.stderr
    assert "burlamacpkg 1.0 was built for cp311-cp311-macosx_11_0_arm64" in result.stderr


@pytest.fixture(scope="module")
def podman_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from tests.e2e.test_podman import BASE, USER, require_podman

    require_podman()
    cluster = Cluster(
        tmp_path_factory.mktemp("podman-env"),
        agents=1,
        workers=2,
        env={"BURLA_STANDBY_IMAGES": BASE},
        podman_user=USER,
    )
    yield cluster
    cluster.stop()


@pytest.mark.podman
def test_containers_get_the_clients_packages_and_local_code(
    podman_cluster: Cluster, client_site: Path, tmp_path: Path
) -> None:
    wait_for(lambda: podman_cluster.status()["nodes"][0]["workers"] == 2, 60, "warm containers")
    check_replication(podman_cluster, client_site, tmp_path)
