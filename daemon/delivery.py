"""Delivery to node agents: what each agent has been sent, what waits for it, and its long-poll.

The scheduler decides which leases go where; the control plane records them;
this module puts them in the agent's mailbox, with the cancels and pool wants
meant for it, and packs them into the `Delivery` its next poll or report takes
home, with each function and input batch the agent lacks as a blob (sent once,
then remembered). Nothing here is durable: an agent that loses a delivery
reports the leases it holds, and the control plane requeues the rest.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import trio

from burla.common.trace import trace
from burla.schemas import messages as m

from .errors import NotFound
from .scheduler import ActiveLease, Scheduler
from .store import Store

_SENT_BATCHES_REMEMBERED = 256
_REQUEUED_REMEMBERED = 4096  # per agent: leases requeued as lost whose late result is still its own


@dataclasses.dataclass
class AgentLink:
    """Delivery state of one agent: what it has been sent, and what waits for it."""

    agent_id: str
    mailbox: list[ActiveLease] = dataclasses.field(default_factory=list)
    cancel_jobs: set[str] = dataclasses.field(default_factory=set)
    wake: trio.Event = dataclasses.field(default_factory=trio.Event)
    delivery_seq: int = 0
    sent_functions: set[str] = dataclasses.field(default_factory=set)
    sent_batches: collections.OrderedDict[tuple[str, int], None] = dataclasses.field(
        default_factory=collections.OrderedDict
    )
    reads_payloads: bool = False  # on this host, and proved it reads the payload dir
    wants: tuple[m.PoolWant, ...] = ()  # the pools the daemon wants of this node now
    wants_sent: tuple[m.PoolWant, ...] | None = None  # what the agent was last told (None: nothing yet)
    standby_sent: int = -1  # the standby version the agent was last told
    # leases of this agent requeued as lost: a result it still sends for one is its own, and is taken if
    # none of its range is done (it may save running the range again)
    requeued: collections.OrderedDict[int, m.Lease] = dataclasses.field(default_factory=collections.OrderedDict)

    def notify(self) -> None:
        self.wake.set()

    def has_mail(self, standby_version: int = -1) -> bool:
        return bool(
            self.mailbox or self.cancel_jobs or self.wants != self.wants_sent
            or (standby_version >= 0 and self.standby_sent != standby_version)
        )  # fmt: skip

    def remember_requeued(self, leases: Iterable[m.Lease]) -> None:
        for lease in leases:
            self.requeued[lease.lease_id] = lease
        while len(self.requeued) > _REQUEUED_REMEMBERED:
            self.requeued.popitem(last=False)


class Couriers:
    """The `AgentLink` of every registered agent, and the packing of their deliveries."""

    def __init__(self, store: Store, scheduler: Scheduler, boot_id: str, counters: collections.Counter[str]) -> None:
        self.store = store
        self.scheduler = scheduler
        self.boot_id = boot_id
        self.counters = counters
        self.links: dict[str, AgentLink] = {}
        self.standby_version = 0  # bumped when the standby spec changes: every agent is told again

    def add(self, agent_id: str) -> None:
        self.links[agent_id] = AgentLink(agent_id)

    def drop(self, agent_id: str) -> None:
        self.links.pop(agent_id, None)

    def drop_stale(self) -> list[str]:
        """Forget the links of agents the scheduler no longer has; returns their ids."""
        stale = [a for a in self.links if a not in self.scheduler.nodes]
        for agent_id in stale:
            del self.links[agent_id]
        return stale

    def link(self, agent_id: str) -> AgentLink:
        link = self.links.get(agent_id)
        if link is None or agent_id not in self.scheduler.nodes:
            raise NotFound(f"unknown agent {agent_id}: register again")
        return link

    # ---- what goes in the mailboxes ---------------------------------------------------

    def post(self, issued: Sequence[ActiveLease]) -> None:
        for active in issued:
            link = self.links[active.agent_id]
            link.mailbox.append(active)
            link.notify()

    def cancel(self, job_id: str, agent_ids: Iterable[str]) -> None:
        """Tell these agents to stop the job's work now."""
        for agent_id in agent_ids:
            link = self.links.get(agent_id)
            if link is not None:
                link.cancel_jobs.add(job_id)
                link.notify()

    def cancel_everywhere(self, job_id: str) -> None:
        """Whoever still runs the job's leases stops, on its next delivery."""
        for link in self.links.values():
            link.cancel_jobs.add(job_id)

    def want(self, plan: Mapping[str, tuple[m.PoolWant, ...]]) -> None:
        """The pools the daemon wants of each node now; an agent is woken only when its wants change."""
        for agent_id, wants in plan.items():
            link = self.links.get(agent_id)
            if link is not None and wants != link.wants:
                link.wants = wants
                link.notify()

    def standby_changed(self) -> None:
        self.standby_version += 1
        for link in self.links.values():
            link.notify()

    # ---- what an agent takes home -------------------------------------------------------

    async def wait(self, link: AgentLink, timeout: float) -> None:
        """Wait up to `timeout` for mail, unless some waits already."""
        if not link.has_mail(self.standby_version):
            with trio.move_on_after(timeout):
                await link.wake.wait()

    def drain(self, link: AgentLink) -> tuple[m.Delivery, list[bytes]]:
        """Empty the agent's mailbox into one delivery, with the functions and batches it lacks."""
        leases = [a for a in link.mailbox if a.lease.lease_id in self.scheduler.lease_owner]
        cancels = tuple(sorted(link.cancel_jobs))
        link.mailbox = []
        link.cancel_jobs = set()
        if link.wake.is_set():  # a poll may be waiting on an unset one: keep it
            link.wake = trio.Event()
        wants = link.wants if link.wants != link.wants_sent else None
        standby = None
        if link.standby_sent != self.standby_version:
            standby = tuple(self.scheduler.standby)
            link.standby_sent = self.standby_version
        link.wants_sent = link.wants
        if not leases and not cancels and wants is None and standby is None:
            return m.Delivery(self.boot_id), []
        link.delivery_seq += 1
        trace("daemon", f"deliver {link.agent_id[:6]} leases={[(a.lease.lo, a.lease.hi) for a in leases]}")
        blobs: list[bytes] = []
        functions: dict[str, int] = {}
        batches: list[list[Any]] = []
        batch_refs: list[list[Any]] = []
        for active in leases:
            active.delivered = link.delivery_seq
            lease = active.lease
            if lease.function_hash not in link.sent_functions and lease.function_hash not in functions:
                blob = self.store.function_blob(lease.function_hash)
                if blob is not None:
                    functions[lease.function_hash] = len(blobs)
                    blobs.append(blob)
            key = (lease.job_id, lease.batch_seq)
            if key not in link.sent_batches:
                ref = self.store.batch_ref(*key) if link.reads_payloads else None
                payload = None if ref else self.store.batch_payload(*key)
                if ref:
                    batch_refs.append([lease.job_id, lease.batch_seq, ref])
                elif payload is not None:
                    batches.append([lease.job_id, lease.batch_seq, len(blobs)])
                    blobs.append(payload)
                link.sent_batches[key] = None
                if len(link.sent_batches) > _SENT_BATCHES_REMEMBERED:
                    link.sent_batches.popitem(last=False)
            else:
                link.sent_batches.move_to_end(key)
        link.sent_functions.update(functions)
        self.counters["leases_delivered"] += len(leases)
        delivery = m.Delivery(
            self.boot_id,
            link.delivery_seq,
            tuple(a.lease for a in leases),
            cancels,
            functions,
            tuple(batches),
            tuple(batch_refs),
            wants,
            standby,
        )
        return delivery, blobs
