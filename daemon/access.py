"""Who may act on what: each agent's own token, and what an agent may read and report.

An agent speaks only for the jobs it works for (it holds one of their leases, or the daemon wants a
pool of theirs on it), reads only those jobs' blobs, functions and batches, and reports results
only inside its own leases. The control plane asks here before it decides anything.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Sequence

from burla.schemas import messages as m
from burla.schemas.environment import Environment

from .blobs import BlobStore
from .delivery import Couriers
from .errors import BadRequest
from .scheduler import ActiveLease, Scheduler

log = logging.getLogger("burla.daemon")


class Access:
    def __init__(self, scheduler: Scheduler, couriers: Couriers, blobs: BlobStore, agent_key: bytes) -> None:
        self.scheduler, self.couriers, self.blobs = scheduler, couriers, blobs
        self._agent_key = agent_key
        self._blob_closure: dict[str, frozenset[str]] = {}  # job -> blobs its agents may read

    def agent_token(self, agent_id: str) -> str:
        """The token of one agent: its routes take no other, so no agent can act as another.

        Derived from a secret of the daemon's own (kept in SQLite), so it survives a restart
        without a table of tokens; an agent that is forgotten (expired) must register again.
        """
        return hmac.new(self._agent_key, agent_id.encode(), hashlib.sha256).hexdigest()

    def is_agent(self, agent_id: str, token: str) -> bool:
        return hmac.compare_digest(self.agent_token(agent_id).encode(), token.encode())

    def held(self, agent_id: str) -> list[ActiveLease]:
        """The leases an agent holds now."""
        node = self.scheduler.nodes.get(agent_id)
        if node is None:
            return []
        held = []
        for lease_id in node.leases:
            job = self.scheduler.jobs.get(self.scheduler.lease_owner.get(lease_id, ""))
            active = job.leases.get(lease_id) if job is not None else None
            if active is not None and active.agent_id == agent_id:
                held.append(active)
        return held

    def jobs_of(self, agent_id: str, held: Sequence[ActiveLease] | None = None) -> set[str]:
        """Jobs an agent works for: it holds one of their leases (`held`, if known), or the daemon wants a
        pool of them there."""
        link = self.couriers.links.get(agent_id)
        wanted = {w.job_id for w in link.wants} if link is not None else set()
        return wanted | {a.lease.job_id for a in (self.held(agent_id) if held is None else held)}

    def job_blobs(self, job_id: str) -> frozenset[str]:
        """The content-addressed blobs a job's agents may read: its build context, manifest, code, packages."""
        found = self._blob_closure.get(job_id)
        if found is not None:
            return found
        job = self.scheduler.jobs.get(job_id)
        if job is None:
            return frozenset()
        digests = {d for d in (job.spec.build, job.spec.env) if d}
        if job.spec.env and self.blobs.has(job.spec.env):
            try:
                manifest = Environment.loads(self.blobs.read(job.spec.env))
            except (OSError, ValueError) as e:
                log.warning("job %s: its environment manifest does not load: %s", job_id, e)
            else:
                digests |= {manifest.code} | {d.blob for d in manifest.distributions}
        found = self._blob_closure[job_id] = frozenset(d for d in digests if d)
        return found

    def may_read_blob(self, agent_id: str, digest: str) -> bool:
        return any(digest in self.job_blobs(j) for j in self.jobs_of(agent_id))

    def forget(self, job_id: str) -> None:
        self._blob_closure.pop(job_id, None)


def within(result: m.LeaseResult, lease: m.Lease) -> bool:
    """A result covers only its own lease: its job, and inputs inside the lease's range."""
    end = result.lo + result.n_ok + (1 if result.error is not None else 0)
    in_range = lease.lo <= result.lo and end <= lease.hi
    error_in_range = result.error is None or result.error.index == -1 or lease.lo <= result.error.index < lease.hi
    return result.job_id == lease.job_id and in_range and error_in_range


def check_blob_indices(report: m.AgentReport, count: int) -> None:
    """Every blob a report names is in its body: a result is accepted only with its payload at hand."""

    def check(index: int | None, what: str) -> None:
        if index is not None and not 0 <= index < count:
            raise BadRequest(f"{what}: names blob {index}, but the report carries {count}")

    for i, result in enumerate(report.results):
        check(result.results_blob, f"results[{i}].results_blob")
        if result.error is not None:
            check(result.error.exc_blob, f"results[{i}].error.exc_blob")
    for i, chunk in enumerate(report.logs):
        check(chunk.blob, f"logs[{i}].blob")
