"""The Podman runtime, for real: warm rootless containers run by an agent of a non-root user.

Needs what scripts/setup-podman makes (a user, rootless Podman, local images:
no registry is reachable in CI). Skipped where that is missing, unless
BURLA_REQUIRE_PODMAN=1 (as in CI), where its absence fails the run.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import burla
from burla import remote_parallel_map
from burla.node_agent.podman_runtime import RUN_DIR
from tests.cluster import BackgroundMap, Cluster, as_user, skip_or_fail, wait_for
from tests.e2e.test_worker_user import tokens_in

pytestmark = [pytest.mark.e2e, pytest.mark.podman]

USER = os.environ.get("BURLA_PODMAN_USER", "burla")
BASE = "localhost/burla-base:py3"
ALT = "localhost/burla-alt:py3"
NO_PYTHON = "localhost/burla-nopython:latest"
OTHER_PYTHON = "localhost/burla-otherpy:latest"


def podman(*args: str) -> subprocess.CompletedProcess[str]:
    home = pwd.getpwnam(USER).pw_dir
    return subprocess.run(
        [*as_user(USER, home, Path(f"/tmp/burla-podman-{USER}")), "podman", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def podman_missing() -> str | None:
    if shutil.which("podman") is None or shutil.which("runuser") is None:
        return "podman is not installed (scripts/setup-podman)"
    if os.geteuid() != 0:
        return "the Podman tests run agents as another user: run them as root"
    if podman("image", "exists", BASE).returncode != 0:
        return f"no {BASE} image for user {USER} (scripts/setup-podman)"
    return None


def require_podman() -> None:
    """Skip the calling test where Podman is missing; fail it under BURLA_REQUIRE_PODMAN=1."""
    skip_or_fail(podman_missing(), "BURLA_REQUIRE_PODMAN")


@pytest.fixture(scope="module")
def podman_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_podman()
    cluster = Cluster(
        tmp_path_factory.mktemp("podman"),
        agents=1,
        workers=2,
        env={"BURLA_STANDBY_IMAGES": BASE, "BURLA_DAEMON_AGENT_TIMEOUT": "10"},
        podman_user=USER,
    )
    yield cluster
    cluster.stop()


@pytest.fixture
def containers(podman_cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Cluster:
    podman_cluster.use(monkeypatch)
    # These tests are about containers: the tests' own environment (dozens of packages) is not
    # replicated into them; test_environment.py covers replication into containers.
    monkeypatch.setenv("BURLA_CLIENT_REPLICATE_ENVIRONMENT", "false")
    wait_standby(podman_cluster, 60, "the node back on standby")
    return podman_cluster


def pools(cluster: Cluster) -> list[dict[str, object]]:
    return list(cluster.status()["nodes"][0]["pools"])


def standby_ready(cluster: Cluster) -> bool:
    """The node is on standby: its standby pool is warm, jobs' pools are parked or gone (none draining)."""
    current = pools(cluster)
    standby = [p for p in current if p["state"] != "parked"]
    return len(standby) == 1 and all(
        p["image"] == BASE and p["state"] == "ready" and p["ready"] == 2 and not p["job_id"] for p in standby
    )


def wait_standby(cluster: Cluster, timeout: float, what: str) -> None:
    try:
        wait_for(lambda: standby_ready(cluster), timeout, what)
    except TimeoutError as e:
        raise TimeoutError(f"{e}; the node's pools: {pools(cluster)}\n{cluster.log_text()[-4000:]}") from None


def container_ids(pool: dict[str, Any]) -> set[str]:
    return {container for container, _ in pool["containers"]}  # type: ignore[attr-defined]


def pool_of(cluster: Cluster, image: str) -> dict[str, Any] | None:
    """The node's pool of `image` in one CPU's shape (its containers by id), if it has one."""
    found = [p for p in pools(cluster) if p["image"] == image and p["cpus"] == 1]
    assert len(found) <= 1, found
    return found[0] if found else None


def agent_stats(cluster: Cluster) -> dict[str, int]:
    return dict(cluster.status()["nodes"][0]["stats"])


def hostname(_: int) -> str:
    import socket

    return socket.gethostname()  # Podman names a container's host by the start of its id


def in_container(x: int) -> tuple[int, str, int]:
    with open("/proc/1/cmdline", "rb") as f:
        pid1 = f.read().split(b"\0")[0].decode()
    return x * 2, pid1, os.getpid()


def test_a_job_runs_on_warm_containers(containers: Cluster, tmp_path: Path) -> None:
    started = time.monotonic()
    results = remote_parallel_map(in_container, range(6), spinner=False)
    assert time.monotonic() - started < 1.0  # warm: no container starts for a job
    assert [r[0] for r in results] == [x * 2 for x in range(6)]
    assert {r[1] for r in results} == {"python3"}  # the shim is the container's first process
    assert {r[2] for r in results} == {1}
    names = podman("ps", "--format", "{{.Image}} {{.Labels}}").stdout
    assert names.count(BASE) == 2  # one warm container per CPU of the standby image
    from tests.cluster import run_client

    status = run_client("import sys\nfrom burla.cli import main\nsys.exit(main(['status']))\n",
                        containers.client_env(), tmp_path)  # fmt: skip
    assert status.returncode == 0 and BASE in status.stdout and "Containers" in status.stdout


def test_prints_of_python_c_and_subprocesses_in_containers_arrive(
    containers: Cluster, capfd: pytest.CaptureFixture[str]
) -> None:
    from tests.e2e.test_map import noisy_below_python

    remote_parallel_map(noisy_below_python, range(2), spinner=False)
    out, err = capfd.readouterr()
    assert {"raw fd write from 1", "subprocess echo from 1", "C puts from 1"} <= set(out.splitlines())
    assert "raw stderr from 0" in err.splitlines()


def marker(_: int) -> str:
    for path in ("/etc/burla-built", "/etc/burla-image"):
        if os.path.exists(path):
            with open(path) as f:
                return f.read().strip()
    return "base"


def test_image_runs_another_local_image_and_the_node_returns_to_standby(containers: Cluster) -> None:
    assert remote_parallel_map(marker, range(3), image=ALT, spinner=False) == ["burla-alt"] * 3
    started = time.monotonic()
    assert remote_parallel_map(marker, range(3), image=ALT, spinner=False) == ["burla-alt"] * 3
    assert time.monotonic() - started < 3  # the image is kept: no pull the second time
    wait_standby(containers, 30, "standby restored, the image's containers gone")
    assert remote_parallel_map(marker, range(2), spinner=False) == ["base", "base"]


def test_dockerfile_builds_once_then_runs_on_its_warm_containers(containers: Cluster, tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {BASE}\nCOPY note.txt /etc/burla-built\n")
    (context / "note.txt").write_text(f"built {time.time()}\n")  # a context no earlier run built
    (context / "big.bin").write_bytes(b"x" * 1000)
    (context / ".dockerignore").write_text("big.bin\n")
    expected = (context / "note.txt").read_text().strip()
    builds = agent_stats(containers).get("builds", 0)
    phases: set[str] = set()

    def watch() -> None:  # what the spinner shows while the image builds
        while not done.is_set():
            phases.update(j["phase"] for j in containers.status()["jobs"])
            time.sleep(0.05)

    done = threading.Event()
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = remote_parallel_map(marker, range(2), dockerfile=context / "Dockerfile", spinner=False)
    finally:
        done.set()
        watcher.join()
    assert results == [expected] * 2
    assert any(p.startswith("building image localhost/burla-build:") and p.endswith("on 1 node") for p in phases)
    assert agent_stats(containers)["builds"] == builds + 1
    reused = agent_stats(containers).get("parked_pools_reused", 0)
    assert remote_parallel_map(marker, range(2), dockerfile=context / "Dockerfile", spinner=False) == [expected] * 2
    stats = agent_stats(containers)
    assert stats["builds"] == builds + 1 and stats["parked_pools_reused"] == reused + 1  # no build, no start


def test_a_failed_build_shows_the_tail_of_its_log(containers: Cluster, tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(f"FROM {BASE}\nRUN echo about to fail && exit 3\n")
    with pytest.raises(burla.ImageError) as info:
        remote_parallel_map(marker, [1], dockerfile=tmp_path / "Dockerfile", spinner=False)
    text = str(info.value)
    assert "did not build" in text and "about to fail" in text and "on node" in text


def overlap(intervals: list[tuple[float, float]]) -> int:
    return max(sum(1 for s2, e2 in intervals if s2 < e and s < e2) for s, e in intervals)


def timed(_: int) -> tuple[float, float, int]:
    start = time.time()
    time.sleep(0.4)
    return start, time.time(), len(os.sched_getaffinity(0))


def test_func_cpu_2_halves_the_calls_a_node_runs_at_once(containers: Cluster) -> None:
    one = remote_parallel_map(timed, range(4), spinner=False)
    two = remote_parallel_map(timed, range(4), func_cpu=2, spinner=False)
    assert overlap([(s, e) for s, e, _ in one]) == 2
    assert overlap([(s, e) for s, e, _ in two]) == 1
    assert {cpus for _, _, cpus in two} == {2} and {cpus for _, _, cpus in one} == {1}


def hog(x: int) -> int:
    blocks = []
    for _ in range(40):
        blocks.append(bytearray(25 * 1024 * 1024))
        time.sleep(0.01)
    return x


def test_a_call_over_func_ram_is_killed_and_named(containers: Cluster) -> None:
    with pytest.raises(burla.MemoryLimitError) as info:
        remote_parallel_map(hog, [7], func_ram=0.3, spinner=False)
    assert info.value.input_index == 0
    assert "func_ram of 0.3 GB" in str(info.value) and "image localhost/burla-base:py3" in str(info.value)


def sleeper(x: int) -> int:
    time.sleep(5)
    return x


def test_a_container_killed_mid_job_fails_its_input_and_the_node_recovers(containers: Cluster) -> None:
    def kill_one() -> None:
        wait_for(lambda: containers.status()["nodes"][0]["busy"] == 2, 10, "both containers busy")
        (ids,) = [container_ids(p) for p in pools(containers) if p["state"] == "ready"]  # not a parked pool's
        podman("kill", sorted(ids)[0])

    killer = threading.Thread(target=kill_one)
    killer.start()
    with pytest.raises(burla.WorkerDiedError) as info:
        remote_parallel_map(sleeper, range(2), spinner=False)
    killer.join()
    assert "was killed by SIGKILL" in str(info.value) and f"image {BASE}" in str(info.value)
    wait_standby(containers, 30, "a fresh warm container")
    assert remote_parallel_map(abs, [-1, -2], spinner=False) == [1, 2]


def test_an_image_without_python3_or_with_another_python_is_refused(containers: Cluster) -> None:
    with pytest.raises(burla.ImageError, match=rf"image {NO_PYTHON} on node .*: it has no python3"):
        remote_parallel_map(abs, [1], image=NO_PYTHON, spinner=False)
    if podman("image", "exists", OTHER_PYTHON).returncode == 0:
        with pytest.raises(burla.ImageError, match=r"its python3 is Python 3\.\d+, but the client runs Python 3\.11"):
            remote_parallel_map(abs, [1], image=OTHER_PYTHON, spinner=False)
    with pytest.raises(burla.ImageError, match="cannot pull it"):
        remote_parallel_map(abs, [1], image="localhost/no-such-image:1", spinner=False)
    wait_standby(containers, 30, "standby restored")
    assert remote_parallel_map(abs, [-3], spinner=False) == [3]


def interfaces(_: int) -> list[str]:
    import socket

    return sorted(name for _, name in socket.if_nameindex())


def test_containers_have_network_unless_turned_off(containers: Cluster, tmp_path: Path) -> None:
    assert remote_parallel_map(interfaces, [0], spinner=False)[0] != ["lo"]
    offline = Cluster(
        tmp_path / "offline",
        agents=1,
        workers=1,
        env={"BURLA_STANDBY_IMAGES": BASE, "BURLA_AGENT_CONTAINER_NETWORK": "false"},
        podman_user=USER,
    )
    try:
        client = burla.Client(offline.url, offline.admin_token)
        assert client.map(interfaces, [0], spinner=False) == [["lo"]]
        client.close()
    finally:
        offline.stop()


def long_first(x: int) -> tuple[int, str]:
    time.sleep(8 if x == 0 else 0.2)  # the first call outlasts the restart; the others come and go around it
    return x, marker(x)


def test_burlad_restarted_mid_job_on_a_podman_node_keeps_each_lease_on_its_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two standby images, two containers each: the base image's calls never take more than its two."""
    require_podman()
    cluster = Cluster(
        tmp_path / "cluster",
        agents=1,
        env={"BURLA_STANDBY_IMAGES": f"{BASE},{ALT}", "BURLA_DAEMON_AGENT_TIMEOUT": "10"},
        podman_user=USER,
        agent_args=["--cpus", "2"],
    )
    try:
        cluster.use(monkeypatch)
        monkeypatch.setenv("BURLA_CLIENT_REPLICATE_ENVIRONMENT", "false")
        wait_for(lambda: cluster.status()["nodes"][0]["workers"] == 4, 120, "two warm containers per image")
        job = BackgroundMap(long_first, range(16))
        wait_for(lambda: cluster.status()["nodes"][0]["busy"] == 2, 30, "both base containers busy")
        time.sleep(0.3)
        cluster.restart_daemon()  # SIGKILL, then a new burlad on the same state
        busy: list[int] = []
        deadline = time.monotonic() + 90
        while job.is_alive() and time.monotonic() < deadline:
            busy.append(cluster.status()["nodes"][0]["busy"])
            time.sleep(0.05)
        job.join(1)
        assert not job.is_alive(), cluster.log_text()[-4000:]
        assert not job.errors, job.errors
        assert job.results == [(x, "base") for x in range(16)]  # every input once, in order
        assert cluster.status()["daemon"].get("jobs_restored", 0) == 1
        assert max(busy) <= 2, busy  # never more calls on the base image than its two containers
        assert remote_parallel_map(marker, range(4), image=ALT, spinner=False) == ["burla-alt"] * 4
        assert remote_parallel_map(marker, range(4), spinner=False) == ["base"] * 4
    finally:
        cluster.stop()


def test_an_idle_podman_node_takes_jobs_after_burlad_restarts(containers: Cluster) -> None:
    """A restarted burlad knows nothing of a node's pools until its agent reports them again."""
    containers.restart_daemon()
    containers.wait_nodes(1)
    results: list[str] = []
    thread = threading.Thread(target=lambda: results.extend(remote_parallel_map(marker, range(2), spinner=False)))
    thread.daemon = True  # if the job never runs, do not hold the test session open
    thread.start()
    thread.join(30)
    assert results == ["base", "base"], containers.status()["nodes"][0]["pools"]


def snoop_container(targets: dict[str, str]) -> dict[str, Any]:
    """In a container: its environment, what it could read of each target, whether it can change the shim."""
    read: dict[str, str] = {}
    for name, path in targets.items():
        try:
            if os.path.isdir(path):
                read[name] = "listed: " + ",".join(sorted(os.listdir(path)))
            else:
                with open(path, "rb") as f:
                    read[name] = "read: " + f.read().decode(errors="replace")
        except OSError as e:
            read[name] = type(e).__name__
    try:
        with open("/burla/shim/burla/__init__.py", "a"):
            shim = "writable"
    except OSError as e:
        shim = type(e).__name__
    return {"env": dict(os.environ), "read": read, "shim": shim}


def test_a_call_in_a_container_sees_no_token_and_none_of_the_agents_files(containers: Cluster) -> None:
    assert containers.daemon is not None
    daemon = containers.root / "daemon"
    agent_state = containers.agent_dirs[0]
    paths = {"tokens.json": str(daemon / "tokens.json"), "daemon state dir": str(daemon),
             "agent state dir": str(agent_state), "agent node_id": str(agent_state / "node_id"),
             "run dir": RUN_DIR}  # fmt: skip
    (seen,) = remote_parallel_map(snoop_container, [paths], spinner=False)
    env_text = "\n".join(f"{k}={v}" for k, v in seen["env"].items())
    assert not tokens_in(containers, env_text), "a token in the container's environment"
    assert not [k for k in seen["env"] if "TOKEN" in k.upper() or "API_KEY" in k.upper()]
    read = seen["read"]
    for name in ("tokens.json", "daemon state dir", "agent state dir", "agent node_id"):
        assert read[name] == "FileNotFoundError", f"a call in a container read {name}: {read[name][:200]}"
    # of the agent's run dir, only its socket and this worker's progress file: no Podman API, no writable shim
    listed = read["run dir"].removeprefix("listed: ").split(",")
    assert listed[0] == "agent.sock" and len(listed) == 2 and listed[1].endswith(".progress"), read["run dir"]
    assert seen["shim"] in ("OSError", "PermissionError"), seen["shim"]


def test_a_second_job_of_an_image_or_a_dockerfile_runs_on_the_same_containers_and_so_does_standby(
    containers: Cluster, tmp_path: Path
) -> None:
    """A job's containers stay warm after it (parked), standby's stay running beside them: nothing starts
    again for the second job of the image, nor for a plain job after it."""
    (tmp_path / "Dockerfile").write_text(f"FROM {BASE}\nRUN echo {time.time()} > /etc/burla-built\n")
    standby = pool_of(containers, BASE)
    assert standby is not None
    for kwargs in ({"image": ALT}, {"dockerfile": tmp_path / "Dockerfile"}):
        first = set(remote_parallel_map(hostname, range(4), spinner=False, **kwargs))  # type: ignore[arg-type]
        wait_standby(containers, 30, "standby taking jobs again")
        image = ALT if "image" in kwargs else next(p["image"] for p in pools(containers) if "burla-build" in p["image"])
        parked = pool_of(containers, image)
        assert parked is not None and parked["state"] == "parked" and not parked["job_id"], pools(containers)
        assert first <= {c[:12] for c in container_ids(parked)}
        assert container_ids(pool_of(containers, BASE) or {}) == container_ids(standby)  # standby kept running
        count = agent_stats(containers)["containers_started"]
        second = set(remote_parallel_map(hostname, range(4), spinner=False, **kwargs))  # type: ignore[arg-type]
        assert second <= {c[:12] for c in container_ids(parked)}, (first, second, parked)
        plain = set(remote_parallel_map(hostname, range(4), spinner=False))
        assert plain <= {c[:12] for c in container_ids(standby)}, (plain, standby)
        assert agent_stats(containers)["containers_started"] == count  # neither job started a container
    assert agent_stats(containers).get("parked_pools_reused", 0) >= 2


def test_when_room_is_short_the_least_recently_used_image_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Room for 4 containers on 2 CPUs: standby's 2 and one other image's; the older image goes."""
    require_podman()
    cluster = Cluster(
        tmp_path / "cluster",
        agents=1,
        workers=2,
        env={"BURLA_STANDBY_IMAGES": BASE, "BURLA_AGENT_WARM_CONTAINERS_PER_CPU": "2"},
        podman_user=USER,
        agent_args=["--cpus", "2"],
    )
    try:
        cluster.use(monkeypatch)
        monkeypatch.setenv("BURLA_CLIENT_REPLICATE_ENVIRONMENT", "false")
        wait_standby(cluster, 120, "standby warm")
        standby = container_ids(pool_of(cluster, BASE) or {})
        alt = set(remote_parallel_map(hostname, range(4), image=ALT, spinner=False))
        wait_standby(cluster, 30, "standby taking jobs again")
        assert pool_of(cluster, ALT) is not None and agent_stats(cluster).get("pools_evicted", 0) == 0
        dockerfile = tmp_path / "ctx" / "Dockerfile"  # its folder is the build context: not the cluster's logs
        dockerfile.parent.mkdir()
        dockerfile.write_text(f"FROM {BASE}\nRUN echo {time.time()} > /etc/burla-built\n")
        remote_parallel_map(hostname, range(4), dockerfile=dockerfile, spinner=False)
        wait_standby(cluster, 30, "standby taking jobs again")
        assert pool_of(cluster, ALT) is None, pools(cluster)  # the least recently used: stopped for the build's
        assert agent_stats(cluster)["pools_evicted"] == 1
        assert "parked pool" in cluster.log_text() and "stopped: the node's room of 4 containers" in cluster.log_text()
        again = set(remote_parallel_map(hostname, range(4), image=ALT, spinner=False))
        assert not again & alt  # new containers: the first ones were stopped
        wait_standby(cluster, 30, "standby taking jobs again")
        assert agent_stats(cluster)["pools_evicted"] == 2  # now the build's pool was the older one
        assert not [p for p in pools(cluster) if "burla-build" in p["image"]], pools(cluster)
        assert container_ids(pool_of(cluster, BASE) or {}) == standby  # standby's stayed running throughout
        assert set(remote_parallel_map(hostname, range(4), spinner=False)) <= {c[:12] for c in standby}
        remote_parallel_map(hostname, range(2), dockerfile=dockerfile, spinner=False)
        stats = agent_stats(cluster)
        assert stats["builds"] == 1 and stats["build_cache_hits"] == 1  # its image is kept when its pool is not
    finally:
        cluster.stop()
