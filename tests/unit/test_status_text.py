"""burla.daemon.status_text: the scheduler's facts in the words a user reads."""

from __future__ import annotations

from burla.daemon import status_text
from burla.daemon.placement import NeedsContainers, NoPython, TooLarge
from burla.daemon.scheduler import Phase, Progress
from burla.schemas import messages as m


def test_needs_containers() -> None:
    text = status_text.unfit(NeedsContainers(build=False, nodes=1))
    assert text.startswith("image= needs nodes that run containers, but this cluster's 1 node run plain processes.")
    assert "--runtime podman" in text
    text = status_text.unfit(NeedsContainers(build=True, nodes=3))
    assert text.startswith("dockerfile= needs nodes that run containers, but this cluster's 3 nodes run")


def test_no_python_names_each_version_and_its_nodes() -> None:
    text = status_text.unfit(NoPython("3.11", (("3.10", 1), ("3.12", 2))))
    assert text == (
        "no node runs Python 3.11, the version of this client; the cluster has Python 3.10 (1 node), "
        "Python 3.12 (2 nodes). Call remote_parallel_map from a Python 3.10 or 3.12 environment, "
        "or add nodes that run Python 3.11."
    )


def test_too_large_names_the_largest_node() -> None:
    text = status_text.unfit(TooLarge(func_cpu=32.0, func_ram=1.5, cpus=16, ram_bytes=64 * 10**9))
    assert text == (
        "func_cpu=32 and func_ram=1.5 GB do not fit on any node; the largest node has 16 CPUs and 64.0 GB of RAM. "
        "Ask for at most that much per call, or add larger nodes."
    )


def test_phase_in_order_of_what_matters() -> None:
    assert status_text.phase(Phase(0, None, 0, 5)) == "waiting for a node to join the cluster"
    assert status_text.phase(Phase(2, ("pulling image", 1), 3, 5)) == "pulling image on 1 node"
    assert status_text.phase(Phase(2, ("installing", 2), 0, 0)) == "installing on 2 nodes"
    assert status_text.phase(Phase(2, None, 1, 5)) == "running on 1 worker"
    assert status_text.phase(Phase(2, None, 3, 0)) == "running on 3 workers"
    assert status_text.phase(Phase(2, None, 0, 5)) == "queued: waiting for free workers"
    assert status_text.phase(Phase(2, None, 0, 0)) == "waiting for inputs"


def test_job_status_fills_in_the_phase_only() -> None:
    status = m.JobStatus("j1", m.RUNNING, "square", n_inputs=8, n_uploaded=8, n_done=4, running=1, workers=2)
    out = status_text.job_status(Progress(status, Phase(1, None, 1, 3)))
    assert out.phase == "running on 1 worker"
    assert out == m.JobStatus(**{**status.__dict__, "phase": "running on 1 worker"})
