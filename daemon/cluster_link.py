"""The node keeper's view of the control plane: what running jobs want, and what to do about nodes.

`NodeKeeper` (node_keeper.py) asks this adapter for the jobs' demands and tells it which agent holds
which job, which node is gone, and which job's growth failed; the adapter turns each into a decision
of the `ControlPlane`, so those stay one transaction each and the scheduler stays pure.
"""

from __future__ import annotations

import json
import math
from typing import Any

from burla.schemas import messages as m

from .errors import Conflict, Unsatisfiable
from .providers import ProviderError
from .scaling import Demand
from .service import ControlPlane


class PlaneCluster:
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    def demands(self) -> list[Demand]:
        """Running jobs, oldest first, with their users and the calls they can run at once: inputs not
        done, capped by max_parallelism (inputs still uploading count as they arrive)."""
        wanted = []
        grow_every_job = self.plane.keeper is not None and self.plane.keeper.config.grow  # `[cluster] grow`
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
                    grow=job.spec.grow or grow_every_job,
                    user=job.owner,  # nodes are shared between users in turn (scaling.plan)
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


_NO_PROVIDER = (
    'this daemon starts no nodes of its own: set [cluster] provider = "local" or "gce" in burla.toml '
    "(see burla.toml.example) and restart burlad"
)


class ClusterAdmin:
    """What `burla cluster start|stop|restart|nodes|spec` asks of a daemon that keeps its own machines."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    def cluster_nodes(self) -> dict[str, Any]:
        keeper = self.plane.keeper
        if keeper is None:
            return {"provider": "", "standby_on": False, "cpus": 0, "max_cpus": 0, "nodes": [], "failures": []}
        return {
            "provider": keeper.provider.name,
            "standby_on": keeper.standby_on,
            "cpus": keeper.cpus(),
            "max_cpus": keeper.config.max_cpus,
            "nodes": keeper.describe(),
            "failures": keeper.failures,
            # why nodes failed, kept after they are deleted: newest first
            "failed": [
                {"name": name, "at": at, "why": why}
                for name, at, state, why in self.plane.store.node_events(limit=2000)
                if state == "FAILED"
            ][:20],
        }

    def cluster_spec(self) -> m.ClusterSpec:
        if self.plane.keeper is None:
            raise Conflict(_NO_PROVIDER)
        return self.plane.keeper.spec()

    async def set_cluster_spec(self, spec: m.ClusterSpec) -> m.ClusterSpec:
        """`burla cluster spec set`: kept in SQLite (burla.toml's groups win when burlad starts)."""
        if self.plane.keeper is None:
            raise Conflict(_NO_PROVIDER)
        try:
            await self.plane.keeper.update(spec)
        except ProviderError as e:
            raise Unsatisfiable(f"the cluster spec was not changed: {e}") from None
        except Exception as e:  # noqa: BLE001 - the cloud's API unreachable, say: nothing changed
            raise Unsatisfiable(f"the cluster spec was not changed: {type(e).__name__}: {e}") from None
        self.plane.store.set_meta("cluster_spec", json.dumps(spec.to_wire()))
        return self.plane.keeper.spec()

    async def cluster_action(self, action: str) -> str:
        """`burla cluster start|stop|restart`."""
        keeper = self.plane.keeper
        if keeper is None:
            raise Conflict(_NO_PROVIDER)
        if action in ("stop", "restart"):
            running = [j.job_id for j in self.plane.scheduler.jobs.values() if j.state == m.RUNNING]
            for job_id in running:
                self.plane.cancel_job(job_id, f"the cluster was stopped (burla cluster {action}) while the job ran")
            await keeper.stop()
        if action in ("start", "restart"):
            keeper.start()
        groups = ", ".join(f"{g.standby} x {g.machine_type}" for g in keeper.config.groups if g.standby)
        if action == "stop":
            return "cluster stopped: every node deleted" + (
                f", {len(running)} running jobs cancelled" if running else ""
            )
        return f"cluster {action}ed: keeping standby ({groups or 'no standby nodes'}) from now on"
