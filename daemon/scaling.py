"""How many machines the cluster runs, and which job holds which: plain logic with no I/O.

The daemon feeds `plan` what it knows (the node groups and limits of the cluster spec, every
node it keeps with its state, and what each running job still wants) and gets back one `Plan`:
nodes to create, nodes to delete, nodes that failed to boot in time, free nodes to hand to a
job, and one line per job for its caller's spinner. The provider (Compute Engine, or local
subprocesses) carries the plan out; its results come back as node states on the next call.

The rules ("How Burla works", sections 1 to 3, and the end of a job):

* Standby: while the cluster is started, each group keeps `standby` nodes free (READY or IDLE,
  held by no job) or booting for no job. A standby node that is taken by a job, fails or
  vanishes is replaced at once.
* Nodes are single-tenant: a job holds whole nodes until it ends. Jobs are served in the order
  they came; each takes free nodes of a group whose one call fits (func_cpu and func_ram), as
  many as its parallel calls need: standby nodes when it starts, and later nodes that other jobs
  gave back (not the standby nodes restored meanwhile: those wait for the next job).
* Grow: a job with `grow` also gets new nodes for what the free ones lack, started at once,
  all together; the first group (in the spec's order) that fits one call is the one started.
  With 5 free 96-CPU standby nodes and 1,000 calls of 1 CPU, that is 6 nodes for the job and
  5 more to restore standby: 11 in all.
* The CPU cap: the CPUs of every node kept (booting included) never pass `max_cpus`. Jobs come
  before standby when the cap is near; a job that wants more than the cap is told so.
* Idle: a free node beyond its group's standby count is deleted after `idle_timeout` seconds
  with no job; standby nodes are deleted after `standby_idle_timeout` (None: never), and then
  the cluster stops keeping standby until it is started again (`Plan.standby_off`).
* A node that is still booting after `boot_timeout` seconds failed: it is deleted, with why.
* A node with a job, or with leases, is never deleted here; `burla cluster stop` is the
  provider's own business.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Sequence


class NodeState(enum.StrEnum):
    BOOTING = "BOOTING"  # created; its agent has not registered yet
    READY = "READY"  # registered, never held by a job
    BUSY = "BUSY"  # held by a job
    IDLE = "IDLE"  # registered, held by a job before, none now
    DELETING = "DELETING"  # being deleted; counts against the cap until gone
    FAILED = "FAILED"  # did not boot, or the cloud stopped it; being cleaned up


FREE = (NodeState.READY, NodeState.IDLE)


@dataclasses.dataclass(frozen=True)
class Group:
    """A kind of node of the cluster spec: its machine type's size and how many to keep on standby."""

    name: str
    cpus: int
    ram_bytes: int
    standby: int = 0
    gpus: int = 0

    def calls(self, func_cpu: float, func_ram: int, func_gpu: int = 0) -> int:
        """How many calls of this shape one node of the group runs at once (0: one call does not fit)."""
        if func_cpu <= 0 or func_cpu > self.cpus or func_ram > self.ram_bytes or func_gpu > self.gpus:
            return 0
        by_cpu = math.floor(self.cpus / func_cpu + 1e-9)
        by_ram = self.ram_bytes // func_ram if func_ram > 0 else by_cpu
        by_gpu = self.gpus // func_gpu if func_gpu > 0 else by_cpu
        return max(0, min(by_cpu, by_ram, by_gpu))


@dataclasses.dataclass(frozen=True)
class Policy:
    groups: Sequence[Group]
    max_cpus: int
    idle_timeout: float = 60.0  # a free node beyond standby, with no job for this long, is deleted
    standby_idle_timeout: float | None = None  # standby nodes too, then standby stops (None: never)
    boot_timeout: float = 600.0
    standby_on: bool = True  # `burla cluster start` turns it on, `stop` and standby_idle_timeout off

    def group(self, name: str) -> Group | None:
        return next((g for g in self.groups if g.name == name), None)


@dataclasses.dataclass(frozen=True)
class Node:
    name: str
    group: str
    state: NodeState
    since: float  # when it entered this state
    job: str | None = None  # the job holding it (BUSY), or the job it boots for (BOOTING)
    leases: int = 0  # leases it runs now: a node with leases is never deleted


@dataclasses.dataclass(frozen=True)
class Demand:
    """What a running job wants: `calls` calls at once, each of this shape; in arrival order."""

    job_id: str
    calls: int  # min(inputs not yet done, max_parallelism)
    func_cpu: float = 1.0
    func_ram: int = 0
    func_gpu: int = 0
    grow: bool = False


@dataclasses.dataclass(frozen=True)
class Create:
    group: str
    count: int
    job: str | None  # the job these nodes boot for (None: standby)


@dataclasses.dataclass
class Plan:
    create: list[Create] = dataclasses.field(default_factory=list)
    delete: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (node, why)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (node, why): delete it too
    assign: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (node, job): it now holds it
    # no longer a job's: the job ended (a BUSY node becomes IDLE; a booting one boots for standby)
    release: list[str] = dataclasses.field(default_factory=list)
    notes: dict[str, str] = dataclasses.field(default_factory=dict)  # job -> why it has fewer nodes than it wants
    standby_off: bool = False

    def created(self) -> int:
        return sum(c.count for c in self.create)


def plan(policy: Policy, nodes: Iterable[Node], demands: Sequence[Demand], now: float) -> Plan:
    """One round of decisions; apply it, then call again with the nodes' new states."""
    out = Plan()
    nodes = list(nodes)
    live: dict[str, Node] = {}
    for node in nodes:
        if node.state == NodeState.BOOTING and now - node.since >= policy.boot_timeout:
            out.failed.append((node.name, f"its agent did not register within {policy.boot_timeout:.0f} s of boot"))
            continue
        if node.state in (NodeState.DELETING, NodeState.FAILED):
            continue
        live[node.name] = node
    used_cpus = _cpus(policy, nodes)  # failed and deleting nodes count until they are gone
    wanted = {d.job_id for d in demands}

    for node in list(live.values()):
        if node.state == NodeState.READY and node.job is not None:  # booted for a job: its own, if it still runs
            if node.job in wanted:
                out.assign.append((node.name, node.job))
                live[node.name] = dataclasses.replace(node, state=NodeState.BUSY, since=now)
            else:
                out.release.append(node.name)
                live[node.name] = dataclasses.replace(node, job=None)
        elif node.state == NodeState.BUSY and node.job not in wanted:  # the job ended
            out.release.append(node.name)
            live[node.name] = dataclasses.replace(node, state=NodeState.IDLE, since=now, job=None)
        elif node.state == NodeState.BOOTING and node.job is not None and node.job not in wanted:
            out.release.append(node.name)
            live[node.name] = dataclasses.replace(node, job=None)  # boots for standby now

    spare: dict[str, list[Node]] = {g.name: [] for g in policy.groups}  # free nodes, by group
    booting: dict[str, int] = {g.name: 0 for g in policy.groups}  # booting for no job, by group
    held: dict[str, list[Node]] = {}  # by job: the nodes it holds or that boot for it
    for node in live.values():
        if node.job is not None:
            held.setdefault(node.job, []).append(node)
        elif node.state in FREE and node.group in spare:
            spare[node.group].append(node)
        elif node.state == NodeState.BOOTING and node.group in booting:
            booting[node.group] += 1
    for free in spare.values():  # the longest idle last: jobs take them first, and they go first
        free.sort(key=lambda n: -n.since)

    for demand in demands:
        fits = [(g, g.calls(demand.func_cpu, demand.func_ram, demand.func_gpu)) for g in policy.groups]
        fits = [(g, per) for g, per in fits if per > 0]
        if not fits:
            out.notes[demand.job_id] = "no node group of the cluster fits one call (func_cpu, func_ram, func_gpu)"
            continue
        per_node = {g.name: per for g, per in fits}
        mine = held.get(demand.job_id, [])
        have = sum(per_node.get(n.group, 0) for n in mine)
        for group, per in fits:
            free = spare[group.name]
            # A job takes standby (READY) nodes when it starts, holding none; later only nodes other jobs
            # gave back (IDLE): otherwise each standby node restored would go to it, and it would grow
            # without grow=True.
            takes = free if not mine else [n for n in free if n.state == NodeState.IDLE]
            for node in list(reversed(takes)):
                if have >= demand.calls:
                    break
                free.remove(node)
                out.assign.append((node.name, demand.job_id))
                have += per
        if have >= demand.calls:
            continue
        if not demand.grow:
            if have == 0:
                out.notes[demand.job_id] = "waiting for a free node (grow=True would start new ones)"
            continue
        group, per = fits[0]
        count = math.ceil((demand.calls - have) / per)
        room = max(0, (policy.max_cpus - used_cpus) // group.cpus)
        if count > room:
            out.notes[demand.job_id] = (
                f"runs on at most {policy.max_cpus} CPUs, the cluster's max_cpus: "
                f"{count - room} more {group.name} nodes would pass it"
            )
            count = room
        if count:
            out.create.append(Create(group.name, count, demand.job_id))
            used_cpus += count * group.cpus

    standby_on = policy.standby_on
    if standby_on and policy.standby_idle_timeout is not None and not demands and live:
        if all(n.state in FREE and now - n.since >= policy.standby_idle_timeout for n in live.values()):
            standby_on = False  # the whole cluster sat unused for that long
            out.standby_off = True
    timeout = 0.0 if out.standby_off else policy.idle_timeout
    for group in policy.groups:
        target = group.standby if standby_on else 0
        free = spare[group.name]
        deficit = target - len(free) - booting[group.name]
        if deficit > 0:
            count = min(deficit, max(0, (policy.max_cpus - used_cpus) // group.cpus))
            if count:
                out.create.append(Create(group.name, count, None))
                used_cpus += count * group.cpus
        for node in free[target:]:
            if node.leases == 0 and now - node.since >= timeout:
                out.delete.append((node.name, f"idle for {now - node.since:.0f} s"))
    return out


def _cpus(policy: Policy, nodes: Iterable[Node]) -> int:
    total = 0
    for node in nodes:
        group = policy.group(node.group)
        total += group.cpus if group is not None else 0
    return total
