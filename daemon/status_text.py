"""The scheduler's facts in words: why a job cannot run, what it waits on.

The scheduler decides and reports facts (`placement.Unfit`,
`scheduler.Phase`); the text a user reads in an error or in `burla status`
is written here, so the wording changes without touching the decisions.
"""

from __future__ import annotations

import dataclasses

from burla.schemas import messages as m

from .placement import NeedsContainers, NoPython, Unfit
from .scheduler import Phase, Progress


def _plural(word: str, count: int) -> str:
    return f"{count} {word}{'s' * (count != 1)}"


def unfit(reason: Unfit) -> str:
    """Why no node could ever run a job, and what to do about it."""
    if isinstance(reason, NeedsContainers):
        what = "dockerfile=" if reason.build else "image="
        return (
            f"{what} needs nodes that run containers, but this cluster's {_plural('node', reason.nodes)} "
            "run plain processes. Start agents with `burlad agent URL --runtime podman`, or leave out the image."
        )
    if isinstance(reason, NoPython):
        have = ", ".join(f"Python {v} ({_plural('node', c)})" for v, c in reason.have)
        return (
            f"no node runs Python {reason.wanted}, the version of this client; the cluster has {have}. "
            f"Call remote_parallel_map from a Python {' or '.join(v for v, _ in reason.have)} environment, "
            f"or add nodes that run Python {reason.wanted}."
        )
    return (
        f"func_cpu={reason.func_cpu:g} and func_ram={reason.func_ram:g} GB do not fit on any node; "
        f"the largest node has {reason.cpus} CPUs and {reason.ram_bytes / 1e9:.1f} GB of RAM. "
        f"Ask for at most that much per call, or add larger nodes."
    )


def phase(p: Phase) -> str:
    """What the cluster is doing for a job, in a few words."""
    if not p.nodes:
        return "waiting for a node to join the cluster"
    if p.preparing:  # nodes pulling, building or installing for it (its leases wait on them)
        what, count = p.preparing
        return f"{what} on {_plural('node', count)}"
    if p.running:
        return f"running on {_plural('worker', p.running)}"
    if p.pending:
        return "queued: waiting for free workers"
    return "waiting for inputs"


def job_status(progress: Progress) -> m.JobStatus:
    """The wire status of a job, its phase in words."""
    return dataclasses.replace(progress.status, phase=phase(progress.phase))
