"""How many machines the cluster runs, and which job holds which: plain logic with no I/O.

The daemon feeds `plan` what it knows (the node groups and limits of the cluster spec, every
node it keeps with its state, and what each running job still wants) and gets back one `Plan`:
nodes to create, nodes to delete, nodes that failed to boot in time, free nodes to hand to a
job, busy nodes to hand from one user's job to another's, and one line per job for its caller's
spinner. The provider (Compute Engine, or local subprocesses) carries the plan out; its results
come back as node states on the next call.

The rules ("How Burla works", sections 1 to 3, and the end of a job):

* Standby: while the cluster is started, each group keeps `standby` nodes free (READY or IDLE,
  held by no job) or booting for no job. A standby node that is taken by a job, fails or
  vanishes is replaced at once.
* Nodes are single-tenant: a job holds whole nodes, and runs there alone. A job takes free nodes of
  a group whose one call fits (func_cpu and func_ram), as many as its parallel calls need: standby
  nodes when it starts, and later nodes that other jobs gave back (not the standby nodes restored
  meanwhile: those wait for the next job).
* Fair share between users (`Demand.user`): free nodes go to users in turn, one node per turn to
  the user whose jobs hold the fewest (booting nodes count), not first come first served. Within
  one user, its jobs are served in the order they came.
* Grow: a job with `grow` also gets new nodes for what the free ones lack, started at once,
  all together; the first group (in the spec's order) that fits one call is the one started.
  With 5 free 96-CPU standby nodes and 1,000 calls of 1 CPU, that is 6 nodes for the job and
  5 more to restore standby: 11 in all.
* The CPU cap: the CPUs of every node kept (booting included) never pass `max_cpus`. Jobs come
  before standby when the cap is near; a job that wants more than the cap is told so. When the
  new nodes the jobs want do not all fit, they are shared out between users in turn too.
* Handover: a user below its fair share of the nodes jobs hold (max-min fair, water-filling: each
  user gets what its jobs need, up to one level for all who need more), with a job that lacks
  nodes, gets BUSY nodes of users above theirs (`Plan.handover`). The node changes hands between
  leases: it finishes the calls it runs, then takes the new job's, so no call is preempted. A
  user gives first the nodes its jobs do not need, then those of its newest job. Otherwise a job
  holds its nodes until it ends.
* Idle: a free node beyond its group's standby count is deleted after `idle_timeout` seconds
  with no job; standby nodes are deleted after `standby_idle_timeout` (None: never), and then
  the cluster stops keeping standby until it is started again (`Plan.standby_off`).
* A node that is still booting after `boot_timeout` seconds failed: it is deleted, with why.
* A node with a job, or with leases, is never deleted here; `burla cluster stop` is the
  provider's own business.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import heapq
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
    user: str = ""  # who made the job ("": one anonymous user): nodes are shared between users in turn


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
    # (node, job): a BUSY node of another job now takes this job's leases, once its own are done (fair share)
    handover: list[tuple[str, str]] = dataclasses.field(default_factory=list)
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

    users = _wants(policy, demands, held, out)
    _share_free(users, spare, out)
    moved = {name for name, _ in out.assign}  # taken this round: not handed over in the same one
    used_cpus = _grow(policy, users, used_cpus, out)
    _hand_over(users, moved, out)
    for user in users.values():
        for want in user.wants:
            if not want.demand.grow and want.have == 0 and want.demand.job_id not in out.notes:
                out.notes[want.demand.job_id] = "waiting for a free node (grow=True would start new ones)"

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


# ---- fair share: nodes go to users in turn ----------------------------------------------------


@dataclasses.dataclass
class _Want:
    """A job's demand through one round: the nodes it has, and what they run."""

    demand: Demand
    order: int  # its place in arrival order
    fits: list[tuple[Group, int]]  # the groups one call fits, in the spec's order, with calls per node
    nodes: list[Node]  # held, or booting for it
    have: int  # calls its nodes run at once
    fresh: bool  # held no node when the round began: it may take standby (READY) nodes
    created: int = 0  # nodes started for it this round
    per_node: dict[str, int] = dataclasses.field(default_factory=dict)  # group -> calls a node runs

    def __post_init__(self) -> None:
        self.per_node = {g.name: per for g, per in self.fits}

    @property
    def job_id(self) -> str:
        return self.demand.job_id

    @property
    def unmet(self) -> bool:
        return self.have < self.demand.calls

    def per(self, group: str) -> int:
        return self.per_node.get(group, 0)

    def need(self) -> int:
        """The nodes it needs: the fewest of its own that run all its calls, or those and what it lacks."""
        if self.unmet:
            return len(self.nodes) + self.created + math.ceil((self.demand.calls - self.have) / self.fits[0][1])
        count, covered = 0, 0
        for per in sorted((self.per(n.group) for n in self.nodes), reverse=True) + [self.fits[0][1]] * self.created:
            if covered >= self.demand.calls:
                break
            count, covered = count + 1, covered + per
        return count


@dataclasses.dataclass
class _User:
    name: str
    order: int  # arrival of its oldest job: who goes first in a tie
    wants: list[_Want]  # its jobs, in arrival order
    nodes: int = 0  # its jobs hold or boot, this round's included
    queue: collections.deque[_Want] = dataclasses.field(default_factory=collections.deque)


def _wants(policy: Policy, demands: Sequence[Demand], held: dict[str, list[Node]], out: Plan) -> dict[str, _User]:
    users: dict[str, _User] = {}
    for order, demand in enumerate(demands):
        fits = [(g, g.calls(demand.func_cpu, demand.func_ram, demand.func_gpu)) for g in policy.groups]
        fits = [(g, per) for g, per in fits if per > 0]
        if not fits:
            out.notes[demand.job_id] = "no node group of the cluster fits one call (func_cpu, func_ram, func_gpu)"
            continue
        mine = held.get(demand.job_id, [])
        want = _Want(demand, order, fits, list(mine), 0, fresh=not mine)
        want.have = sum(want.per(n.group) for n in mine)
        user = users.setdefault(demand.user, _User(demand.user, order, []))
        user.wants.append(want)
        user.nodes += len(mine)
    return users


def _turns(users: Iterable[_User]) -> list[tuple[int, int, str]]:
    """A heap of users by (nodes they have, arrival): the next turn is the user with the fewest."""
    heap = [(u.nodes, u.order, u.name) for u in users]
    heapq.heapify(heap)
    return heap


def _share_free(users: dict[str, _User], spare: dict[str, list[Node]], out: Plan) -> None:
    """Free nodes, one per turn, to the user with the fewest; within a user, to its oldest job that lacks
    nodes and can take one. A job takes standby (READY) nodes when it starts, holding none; later only
    nodes other jobs gave back (IDLE): otherwise each standby node restored would go to it, and it would
    grow without grow=True."""
    for user in users.values():
        user.queue = collections.deque(w for w in user.wants if w.unmet)
    heap = _turns(users.values())
    while heap:
        user = users[heapq.heappop(heap)[2]]
        while user.queue:
            want = user.queue[0]
            if want.unmet and _take(want, spare, out):
                user.nodes += 1
                heapq.heappush(heap, (user.nodes, user.order, user.name))
                break
            user.queue.popleft()  # met, or nothing free fits it: not this round


def _take(want: _Want, spare: dict[str, list[Node]], out: Plan) -> bool:
    for group, per in want.fits:
        free = spare[group.name]
        for i in range(len(free) - 1, -1, -1):  # the longest idle first
            if want.fresh or free[i].state == NodeState.IDLE:
                node = free.pop(i)
                out.assign.append((node.name, want.job_id))
                want.nodes.append(dataclasses.replace(node, state=NodeState.BUSY, job=want.job_id))
                want.have += per
                return True
    return False


def _grow(policy: Policy, users: dict[str, _User], used_cpus: int, out: Plan) -> int:
    """New nodes for what the free ones lack, for jobs with grow, in the first group that fits a call.
    Within max_cpus they are shared out as free nodes are: one per turn to the user with the fewest."""
    lack: dict[str, int] = {}  # job -> nodes it would start
    growing = [w for u in users.values() for w in u.wants if w.demand.grow and w.unmet]
    for want in growing:
        lack[want.job_id] = math.ceil((want.demand.calls - want.have) / want.fits[0][1])
    room = policy.max_cpus - used_cpus
    if sum(lack[w.job_id] * w.fits[0][0].cpus for w in growing) <= room:
        for want in growing:
            want.created = lack[want.job_id]
    else:
        for user in users.values():
            user.queue = collections.deque(w for w in user.wants if w.job_id in lack)
        heap = _turns(users.values())
        while heap:
            user = users[heapq.heappop(heap)[2]]
            while user.queue:
                want = user.queue[0]
                cpus = want.fits[0][0].cpus
                if want.created < lack[want.job_id] and cpus <= room:
                    want.created += 1
                    room -= cpus
                    user.nodes += 1
                    heapq.heappush(heap, (user.nodes, user.order, user.name))
                    break
                user.queue.popleft()
    for want in sorted(growing, key=lambda w: w.order):
        group, per = want.fits[0]
        missing = lack[want.job_id] - want.created
        if missing:
            out.notes[want.job_id] = (
                f"runs on at most {policy.max_cpus} CPUs, the cluster's max_cpus: "
                f"{missing} more {group.name} nodes would pass it"
            )
        if want.created:
            out.create.append(Create(group.name, want.created, want.job_id))
            used_cpus += want.created * group.cpus
            want.have += want.created * per
    return used_cpus


def _shares(users: dict[str, _User], total: int) -> dict[str, int]:
    """Max-min fair shares of `total` nodes (water-filling): each user gets what it needs, up to a level
    that is the same for all users that need more; the oldest users get the odd nodes."""
    needs = {name: sum(w.need() for w in u.wants) for name, u in users.items()}
    shares: dict[str, int] = {}
    left = total
    by_need = sorted(users, key=lambda name: (needs[name], users[name].order))
    for i, name in enumerate(by_need):
        k = len(by_need) - i
        if needs[name] * k <= left:
            shares[name] = needs[name]
            left -= needs[name]
            continue
        level, extra = divmod(left, k)
        for j, other in enumerate(sorted(by_need[i:], key=lambda n: users[n].order)):
            shares[other] = level + (1 if j < extra else 0)
        break
    return shares


def _hand_over(users: dict[str, _User], moved: set[str], out: Plan) -> None:
    """A user below its fair share of the nodes jobs hold, with a job that lacks nodes, gets nodes of
    users above theirs, one per turn: a BUSY node changes hands between leases (it finishes the leases
    it runs, then takes the new job's), so no call is preempted. A donor gives first the nodes its jobs
    do not need, then those of its newest job."""
    if len(users) < 2:
        return
    shares = _shares(users, sum(u.nodes for u in users.values()))
    donors = {name: _givable(u, moved) for name, u in users.items() if u.nodes > shares[name]}
    receivers = [u for name, u in users.items() if u.nodes < shares[name]]
    if not donors or not receivers:
        return
    heap = _turns(receivers)
    while heap:
        user = users[heapq.heappop(heap)[2]]
        if _receive(user, users, donors, shares, out):
            if user.nodes < shares[user.name]:
                heapq.heappush(heap, (user.nodes, user.order, user.name))


def _givable(user: _User, moved: set[str]) -> list[tuple[_Want, Node]]:
    """The nodes a user may hand over, in the order it gives them: first those its jobs do not need
    (each job keeping what runs all its calls), then its newest job's, the last taken first."""
    spare, rest = [], []
    for want in reversed(user.wants):
        nodes = [n for n in reversed(want.nodes) if n.state == NodeState.BUSY and n.name not in moved]
        keep = want.have
        for node in nodes:
            per = want.per(node.group)
            if keep - per >= want.demand.calls:
                spare.append((want, node))
                keep -= per
            else:
                rest.append((want, node))
    return spare + rest


_Donors = dict[str, list[tuple[_Want, Node]]]  # user -> the nodes it may hand over, in order


def _receive(user: _User, users: dict[str, _User], donors: _Donors, shares: dict[str, int], out: Plan) -> bool:
    """One node for `user` from the user most above its share that has one its lacking jobs can use."""
    lacking = [w for w in user.wants if w.unmet]
    for name in sorted(donors, key=lambda d: shares[d] - users[d].nodes):  # the most above its share first
        donor = users[name]
        if donor.nodes <= shares[name]:
            continue
        for i, (old, node) in enumerate(donors[name]):
            new = next((w for w in lacking if w.per(node.group) > 0), None)
            if new is None:
                continue
            del donors[name][i]
            old.nodes = [n for n in old.nodes if n is not node]
            old.have -= old.per(node.group)
            donor.nodes -= 1
            new.nodes.append(dataclasses.replace(node, job=new.job_id))
            new.have += new.per(node.group)
            user.nodes += 1
            out.handover.append((node.name, new.job_id))
            return True
    return False


def _cpus(policy: Policy, nodes: Iterable[Node]) -> int:
    total = 0
    for node in nodes:
        group = policy.group(node.group)
        total += group.cpus if group is not None else 0
    return total
