"""The node keeper's view of the control plane: what running jobs want, and what to do about nodes.

`NodeKeeper` (node_keeper.py) asks this adapter for the jobs' demands and tells it which agent holds
which job, which node is gone, and which job's growth failed; the adapter turns each into a decision
of the `ControlPlane`, so those stay one transaction each and the scheduler stays pure.
"""

from __future__ import annotations

import math

from burla.schemas import messages as m

from .scaling import Demand
from .service import ControlPlane


class PlaneCluster:
    def __init__(self, plane: ControlPlane, grow_every_job: bool = False) -> None:
        self.plane, self.grow_every_job = plane, grow_every_job

    def demands(self) -> list[Demand]:
        """Running jobs, oldest first, with the calls they can run at once: inputs not done, capped by
        max_parallelism (inputs still uploading count as they arrive)."""
        wanted = []
        jobs = sorted(self.plane.scheduler.jobs.values(), key=lambda j: j.created)
        for job in jobs:
            if job.state != m.RUNNING or job.spec.image or job.spec.build:
                continue  # cluster nodes run processes; container jobs go to container nodes
            leased = sum(a.lease.hi - a.lease.lo for a in job.leases.values())
            calls = job.pending.size + leased
            if job.n_inputs is None:
                calls = max(calls, 1)  # still uploading: at least one call's worth
            if job.spec.max_parallelism is not None:
                calls = min(calls, job.spec.max_parallelism)
            if calls <= 0:
                continue
            wanted.append(
                Demand(
                    job.job_id,
                    calls=calls,
                    func_cpu=job.spec.func_cpu,
                    func_ram=math.ceil(job.spec.func_ram * 1e9),
                    grow=job.spec.grow or self.grow_every_job,
                )
            )
        return wanted

    def hold(self, agent_id: str, job_id: str) -> None:
        self.plane.hold(agent_id, job_id)

    def release(self, agent_id: str) -> None:
        self.plane.hold(agent_id, None)

    def node_gone(self, agent_id: str, why: str) -> None:
        self.plane.forget_agent(agent_id, why)

    def growth_failed(self, job_id: str, why: str) -> None:
        self.plane.fail_job(
            job_id, m.ErrorType.NODE_START, f"the cluster could not start the nodes this job asked for: {why}"
        )

    def note(self, job_id: str, text: str) -> None:
        if text:
            self.plane.notes[job_id] = text
        else:
            self.plane.notes.pop(job_id, None)
