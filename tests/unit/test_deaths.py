"""Worker-death diagnosis as pure logic: the facts of a death in, the error its input reports out."""

from __future__ import annotations

from pathlib import Path

from burla.node_agent.deaths import Death, describe_exit, kernel_oom_since, oom_kills
from burla.schemas import messages as m

GB = 10**9


def death(**facts: object) -> Death:
    base: dict[str, object] = {"lo": 10, "hi": 20, "func_ram_bytes": 4 * GB, "node": "n1"}
    return Death(**(base | facts))  # type: ignore[arg-type]


def test_a_sigkill_is_blamed_on_memory_only_when_the_kernel_counted_an_oom_kill() -> None:
    assert "out-of-memory" not in describe_exit(-9).replace("no out-of-memory kill", "")
    assert "out-of-memory killer killed a process meanwhile" in describe_exit(-9, kernel_oom=True)
    assert describe_exit(-11) == "was killed by SIGSEGV (segmentation fault)"
    assert describe_exit(3) == "exited with code 3"
    count = oom_kills()
    assert count is None or count >= 0


def test_an_unknown_signal_is_named_by_its_number() -> None:
    assert describe_exit(-200) == "was killed by signal 200"


def test_the_input_is_the_one_the_progress_file_names_if_it_is_in_the_lease() -> None:
    assert death(progress=13).index == 13
    assert death(progress=-1).index == 10  # idle: the lease's first input
    assert death(progress=20).index == 10  # past the lease: stale
    assert death(progress=9).index == 10


def test_an_exit_is_a_worker_death_of_the_running_input() -> None:
    error = death(progress=12, code=3).error()
    assert error.kind == m.WORKER_DIED and error.type_name == m.ErrorType.WORKER_DIED
    assert error.index == 12 and error.node == "n1"
    assert error.message == "the worker running input #12 exited with code 3 on node n1."


def test_a_worker_that_stopped_answering_says_so_and_names_its_image() -> None:
    error = death(code=None, image="python:3.11").error()
    assert (
        error.message
        == "the worker running input #10 stopped answering on node n1, in a container of image python:3.11."
    )


def test_a_sigkill_during_a_kernel_oom_says_memory_is_most_likely() -> None:
    assert "out-of-memory killer" in death(code=-9, kernel_oom=True).error().message
    assert "not Burla's memory limit" in death(code=-9, kernel_oom=False).error().message
    assert death(code=-9, kernel_oom=True).error().kind == m.WORKER_DIED


def test_a_kill_by_the_agent_for_memory_reports_what_it_used() -> None:
    error = death(progress=15, code=-9, memory_kill=(5 * GB, 4 * GB)).error()
    assert error.kind == m.MEMORY and error.type_name == m.ErrorType.MEMORY_LIMIT and error.index == 15
    assert error.message.startswith("input #15 used 5.00 GB of memory, over its func_ram of 4 GB on node n1")
    assert "Pass a larger func_ram=" in error.message


def test_a_container_killed_for_its_memory_limit_is_a_memory_error_without_a_figure() -> None:
    error = death(code=-9, container_oom=True, func_ram_bytes=2 * GB, image="img").error()
    assert error.kind == m.MEMORY
    assert error.message.startswith("input #10 went over its func_ram of 2 GB on node n1, in a container of image img")


def test_the_kernel_oom_count_rose_only_against_a_known_count() -> None:
    assert not kernel_oom_since(None)
    now = oom_kills()
    if now is not None:
        assert not kernel_oom_since(now) and kernel_oom_since(now - 1)


def test_a_progress_file_cut_short_or_missing_reads_as_unknown(tmp_path: Path) -> None:
    """The worker's call can write its progress file (found in review: a short one crashed the agent's
    timeout watch, which read it with a struct error)."""
    from burla.node_agent.startup import read_progress
    from burla.schemas import worker as proto

    path = tmp_path / "progress"
    for data in (b"", b"\x01\x02\x03"):
        path.write_bytes(data)
        assert read_progress(path) == proto.IDLE
    assert read_progress(tmp_path / "missing") == proto.IDLE
    path.write_bytes(proto.PROGRESS.pack(7) + b"junk after")
    assert read_progress(path) == 7
