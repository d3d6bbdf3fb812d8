"""remote_parallel_map on a real cluster (burlad + 2 agents x 2 workers), as a user calls it."""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

import pytest

import burla
from burla import remote_parallel_map
from tests.cluster import Cluster, run_client

pytestmark = pytest.mark.e2e


def double(x):
    return x * 2


def test_results_come_back_in_input_order(cluster: Cluster) -> None:
    assert remote_parallel_map(double, range(1000), spinner=False) == [x * 2 for x in range(1000)]


def test_each_input_is_the_single_argument_as_with_map(cluster: Cluster) -> None:
    inputs = [(1, 2), [3, 4], {"a": 5}, None, "text"]
    assert remote_parallel_map(repr, inputs, spinner=False) == list(map(repr, inputs))


def test_inputs_from_a_generator(cluster: Cluster) -> None:
    assert remote_parallel_map(double, (i for i in range(25_000)), spinner=False) == [i * 2 for i in range(25_000)]


def test_empty_inputs_return_an_empty_list_without_a_job(cluster: Cluster) -> None:
    before = cluster.status()["daemon"].get("jobs", 0)
    assert remote_parallel_map(double, [], spinner=False) == []
    assert list(remote_parallel_map(double, iter(()), generator=True, spinner=False)) == []
    assert cluster.status()["daemon"].get("jobs", 0) == before


def test_calls_run_on_every_worker_of_every_node(cluster: Cluster) -> None:
    def where(_: int) -> tuple[int, str]:
        time.sleep(0.3)
        return os.getpid(), os.environ.get("BURLA_WORKER_SLOT", "")

    pids = {pid for pid, _ in remote_parallel_map(where, range(4), spinner=False)}
    assert len(pids) == 4  # 2 agents x 2 workers, all at once


def slow_then_fast(x: int) -> int:
    time.sleep(2.0 if x == 0 else 0.0)
    return x


def test_generator_yields_results_as_they_arrive(cluster: Cluster) -> None:
    started = time.monotonic()
    results = remote_parallel_map(slow_then_fast, range(8), generator=True, spinner=False)
    first = next(results)
    first_at = time.monotonic() - started
    rest = list(results)
    assert first != 0 and first_at < 1.5  # a fast one, long before the slow one finished
    assert sorted([first, *rest]) == list(range(8))


def overlap(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, delta in points:
        running += delta
        peak = max(peak, running)
    return peak


def timed_call(_: int) -> tuple[float, float]:
    start = time.time()
    time.sleep(0.25)
    return start, time.time()


def test_max_parallelism_caps_calls_running_at_once(cluster: Cluster) -> None:
    intervals = remote_parallel_map(timed_call, range(6), max_parallelism=2, spinner=False)
    assert overlap(intervals) == 2


def test_func_cpu_decides_how_many_calls_a_node_runs_at_once(cluster: Cluster) -> None:
    cpus = cluster.status()["nodes"][0]["cpus"]
    intervals = remote_parallel_map(timed_call, range(6), func_cpu=cpus, spinner=False)
    assert overlap(intervals) == 2  # one call per node, two nodes


def test_a_request_no_node_can_satisfy_fails_at_once(cluster: Cluster) -> None:
    started = time.monotonic()
    with pytest.raises(burla.UnsatisfiableError, match="func_cpu=512") as info:
        remote_parallel_map(double, range(3), func_cpu=512, spinner=False)
    assert time.monotonic() - started < 5
    assert "largest node" in str(info.value)


def chatty(x: int) -> int:
    print(f"out line from input {x}")
    print(f"err line from input {x}", file=__import__("sys").stderr)
    return x


def test_prints_reach_the_callers_stdout_and_stderr(cluster: Cluster, capfd: pytest.CaptureFixture[str]) -> None:
    remote_parallel_map(chatty, range(20), spinner=False)
    out, err = capfd.readouterr()
    assert sorted(out.splitlines()) == sorted(f"out line from input {x}" for x in range(20))
    assert sorted(err.splitlines()) == sorted(f"err line from input {x}" for x in range(20))


def flood(x: int) -> None:
    for i in range(5000):
        print(f"input {x} line {i} " + "x" * 40)


def test_a_flood_of_output_arrives_whole_and_complete(cluster: Cluster, capfd: pytest.CaptureFixture[str]) -> None:
    remote_parallel_map(flood, range(8), spinner=False)
    lines = capfd.readouterr().out.splitlines()
    assert len(lines) == 8 * 5000
    assert set(lines) == {f"input {x} line {i} " + "x" * 40 for x in range(8) for i in range(5000)}


def test_prints_appear_while_the_job_runs(cluster: Cluster, tmp_path: Path) -> None:
    script = """
import sys, time
from burla import remote_parallel_map
def f(x):
    if x == 0:
        print("early line", flush=True)
    time.sleep(3)
    return x
remote_parallel_map(f, range(2), spinner=False)
print("job finished")
"""
    path = tmp_path / "client.py"
    path.write_text(script)
    import subprocess
    import sys

    seen = {}
    with subprocess.Popen(
        [sys.executable, str(path)], env={**os.environ, **cluster.client_env()}, stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen[line.strip()] = time.monotonic()
        assert proc.wait(60) == 0
    assert seen["job finished"] - seen["early line"] > 1.5


class CustomError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)
        self.code = code


def inner_helper(x: int) -> int:
    if x == 7:
        raise CustomError(f"bad input {x}", 42)
    return x


def raises_on_seven(x: int) -> int:
    return inner_helper(x)


def test_a_remote_exception_is_raised_locally_as_itself(cluster: Cluster) -> None:
    with pytest.raises(CustomError) as info:
        remote_parallel_map(raises_on_seven, range(10), spinner=False)
    exc = info.value
    assert exc.args == ("bad input 7", 42) and exc.code == 42
    assert exc.burla_input_index == 7  # type: ignore[attr-defined]
    assert any("input #7" in note for note in exc.__notes__)
    frames = traceback.extract_tb(exc.__traceback__)
    names = [f.name for f in frames]
    assert names[-2:] == ["raises_on_seven", "inner_helper"]
    assert frames[-1].filename == __file__
    assert frames[-1].line == 'raise CustomError(f"bad input {x}", 42)'


def _refuse_to_load(text: str) -> Exception:
    raise RuntimeError("this exception cannot be unpickled here")


class UnloadableError(Exception):
    """Pickles fine on the worker, but cannot be rebuilt by the client."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_refuse_to_load, (str(self),))


def raises_unloadable(_: int) -> None:
    raise UnloadableError("raised by a class the client cannot rebuild")


def test_an_exception_that_cannot_be_rebuilt_arrives_as_remote_error(cluster: Cluster) -> None:
    with pytest.raises(burla.RemoteError) as info:
        remote_parallel_map(raises_unloadable, [1], spinner=False)
    assert info.value.input_index == 0
    assert info.value.type_name.endswith("UnloadableError")
    assert "raised by a class the client cannot rebuild" in str(info.value)
    assert "raises_unloadable" in info.value.remote_traceback
    assert "Remote traceback" in str(info.value)


def fails_fast_others_slow(x: int) -> int:
    if x == 0:
        raise ValueError("first call fails")
    time.sleep(30)
    return x


def test_a_failure_cancels_the_rest_of_the_job_within_a_second(cluster: Cluster) -> None:
    started = time.monotonic()
    with pytest.raises(ValueError, match="first call fails"):
        remote_parallel_map(fails_fast_others_slow, range(4), spinner=False)
    assert time.monotonic() - started < 10

    def settled() -> bool:
        status = cluster.status()
        return all(n["busy"] == 0 for n in status["nodes"]) and all(j["state"] != "running" for j in status["jobs"])

    from tests.cluster import wait_for

    wait_for(settled, 3, "workers freed after the failure")
    assert remote_parallel_map(double, range(4), spinner=False) == [0, 2, 4, 6]  # and the cluster is fine


def sleepy(x: int) -> int:
    time.sleep(1.5)
    return x


def test_burla_status_shows_nodes_workers_and_running_jobs(cluster: Cluster, tmp_path: Path) -> None:
    results = remote_parallel_map(sleepy, range(8), generator=True, spinner=False)
    result = run_client(
        "import sys\nfrom burla.cli import main\nsys.exit(main(['status']))\n", cluster.client_env(), tmp_path
    )
    assert sorted(results) == list(range(8))
    assert result.returncode == 0, result.stderr
    assert "Nodes" in result.stdout and "workers" in result.stdout and "Jobs" in result.stdout
    assert result.stdout.count("│ process ") == 2  # two nodes, process runtime
    row = next(line for line in result.stdout.splitlines() if "sleepy" in line)
    assert "running" in row and "│ 8 " in row  # the job, its state and its input count


def noisy_below_python(x: int) -> int:
    import ctypes
    import subprocess

    os.write(1, f"raw fd write from {x}\n".encode())
    subprocess.run(["echo", f"subprocess echo from {x}"], check=True)
    libc = ctypes.CDLL(None)
    libc.puts(f"C puts from {x}".encode())
    libc.fflush(None)
    os.write(2, f"raw stderr from {x}\n".encode())
    return x


def test_output_of_c_code_and_subprocesses_arrives_too(cluster: Cluster, capfd: pytest.CaptureFixture[str]) -> None:
    assert remote_parallel_map(noisy_below_python, range(3), spinner=False) == [0, 1, 2]
    out, err = capfd.readouterr()
    for x in range(3):
        for line in (f"raw fd write from {x}", f"subprocess echo from {x}", f"C puts from {x}"):
            assert line in out.splitlines()
        assert f"raw stderr from {x}" in err.splitlines()


USER_SCRIPT = """
import sys
import traceback

from burla import remote_parallel_map
from helpers_beside import parse


def check(x):
    try:
        parse(x)
    except ValueError as e:
        raise RuntimeError(f"input {x!r} is not a number") from e


def several(x):
    problems = []
    for i in range(2):
        try:
            raise KeyError(f"member {i}")
        except KeyError as e:
            problems.append(e)
    raise ExceptionGroup("two failed", problems)


for fn in (check, several):
    try:
        remote_parallel_map(fn, ["1", "x"] if fn is check else [0], spinner=False)
    except BaseException:
        traceback.print_exc(file=sys.stdout)
    print("=====")
"""


def test_a_user_script_sees_its_files_lines_and_chained_causes(cluster: Cluster, tmp_path: Path) -> None:
    """As run from a terminal: the script and a module beside it, their lines, the cause and the group."""
    (tmp_path / "helpers_beside.py").write_text("def parse(text):\n    value = int(text)\n    return value\n")
    result = run_client(USER_SCRIPT, cluster.client_env(), tmp_path)
    assert result.returncode == 0, result.stderr
    chained, grouped, _ = result.stdout.split("=====\n")
    script, helper = tmp_path / "client_script.py", tmp_path / "helpers_beside.py"
    assert f'File "{helper}", line 2, in parse\n    value = int(text)\n' in chained
    assert f'File "{script}", line 11, in check\n    parse(x)\n' in chained
    assert "ValueError: invalid literal for int() with base 10: 'x'" in chained
    assert "The above exception was the direct cause of the following exception:" in chained
    assert (
        f'File "{script}", line 13, in check\n    raise RuntimeError(f"input {{x!r}} is not a number") from e\n'
        in chained
    )
    assert chained.index("ValueError: invalid literal") < chained.index("RuntimeError: input 'x' is not a number")
    assert "raised remotely by input #1" in chained
    assert "<dynamic-code>" not in chained + grouped
    assert "ExceptionGroup: two failed (2 sub-exceptions)" in grouped
    members = "\n".join(row.lstrip(" |") for row in grouped.splitlines())  # members print behind "  | "
    assert f'File "{script}", line 20, in several\nraise KeyError(f"member {{i}}")\n' in members
    assert "KeyError: 'member 1'" in grouped
