"""The cluster's machines over time: the daemon's side of each node's life, from create to delete.

`NodeKeeper` runs in the daemon. Each round it hands `scaling.plan` the nodes it keeps and what the
running jobs want, and carries the plan out with the provider: creates (many at once, each in its
own task, the provider's blocking calls in threads), deletes, holds and releases. It also watches
what the provider says of its instances (a preempted, stopped or vanished instance is gone: its
leases run elsewhere and standby is restored), adopts the instances of its cluster after a restart,
and hears from agents as they register (READY) and from startup scripts that fail (FAILED).

Node states and their changes are the node book's (`NodeBook`, kept in SQLite by the store): each
change has its time and reason, so `burla cluster nodes` says why a node failed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import trio

from burla.common.config import ClusterConfig, NodeGroupConfig
from burla.schemas import messages as m

from . import scaling
from .providers import Boot, Instance, Provider, ProviderError
from .scaling import NodeState
from .store import Store

log = logging.getLogger("burla.daemon")

BOOT_FAILURES_TO_GIVE_UP = 3  # nodes of a group in a row that did not come up before a growing job fails
ROUND_SECONDS = 1.0  # a round at least this often; a job arriving or a node joining wakes one at once
WATCH_SECONDS = 10.0  # how often the provider's list of instances is read
GONE_STATUSES = {"STOPPING", "STOPPED", "TERMINATED", "SUSPENDING", "SUSPENDED"}


@dataclasses.dataclass
class NodeRecord:
    name: str
    group: int  # index into the cluster spec's groups
    state: NodeState
    since: float
    job: str | None = None  # holds it (BUSY), or it boots for it (BOOTING)
    zone: str = ""
    reason: str = ""  # why it is in this state (failed: what went wrong)
    agent_id: str = ""  # its agent, once registered
    created: float = 0.0
    token_hash: str = ""  # the hash of the token it registers with (the token itself is only in its metadata)


class NodeBook(Protocol):
    """Where node records and their state changes are kept (the store's `nodes` tables)."""

    def nodes(self) -> list[NodeRecord]: ...

    def standby_on(self) -> bool | None:
        """Whether standby was kept when the daemon last ran (None: never said)."""
        ...

    def set_standby_on(self, on: bool) -> None: ...

    def put_node(self, node: NodeRecord, event: str) -> None: ...

    def drop_node(self, name: str, event: str) -> None: ...


class MemoryBook:
    """A node book in memory: for tests, and for a daemon without a state dir."""

    def __init__(self) -> None:
        self.records: dict[str, NodeRecord] = {}
        self.events: list[tuple[str, str, str]] = []  # (node, state, why)
        self.standby: bool | None = None

    def nodes(self) -> list[NodeRecord]:
        return list(self.records.values())

    def standby_on(self) -> bool | None:
        return self.standby

    def set_standby_on(self, on: bool) -> None:
        self.standby = on

    def put_node(self, node: NodeRecord, event: str) -> None:
        self.records[node.name] = dataclasses.replace(node)
        self.events.append((node.name, node.state.value, event))

    def drop_node(self, name: str, event: str) -> None:
        self.records.pop(name, None)
        self.events.append((name, "GONE", event))


class StoreBook:
    """The node book in the daemon's SQLite file (tables `nodes` and `node_events`, store schema v5)."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store, self.clock = store, clock

    def nodes(self) -> list[NodeRecord]:
        records = []
        for row in self.store.node_rows():
            try:
                state = NodeState(row["state"])
            except ValueError:
                state = NodeState.FAILED
            records.append(NodeRecord(
                row["name"], int(row["grp"]), state, float(row["since"]), row["job"] or None, row["zone"] or "",
                row["reason"] or "", row["agent_id"] or "", float(row["created"] or 0), row["token_hash"] or "",
            ))  # fmt: skip
        return records

    def standby_on(self) -> bool | None:
        value = self.store.meta("cluster_standby_on")
        return None if value is None else value == "1"

    def set_standby_on(self, on: bool) -> None:
        self.store.set_meta("cluster_standby_on", "1" if on else "0")

    def put_node(self, node: NodeRecord, event: str) -> None:
        row = dataclasses.asdict(node)
        row["grp"], row["state"], row["job"] = row.pop("group"), node.state.value, node.job or ""
        self.store.put_node_row(row, self.clock(), event)

    def drop_node(self, name: str, event: str) -> None:
        self.store.drop_node_row(name, self.clock(), event)


class Cluster(Protocol):
    """What the keeper asks of the control plane."""

    def demands(self) -> list[scaling.Demand]:
        """Running jobs that may run on cluster nodes, oldest first, each with the user who made it."""
        ...

    def hold(self, agent_id: str, job_id: str) -> None:
        """From now on this agent takes leases of that job only: once the leases of the job it held
        before (a handover) are done, so no call is preempted."""
        ...

    def release(self, agent_id: str) -> None: ...

    def node_gone(self, agent_id: str, why: str) -> None:
        """The agent's machine is gone: its leases run elsewhere at once."""
        ...

    def growth_failed(self, job_id: str, why: str) -> None:
        """A node started for the job cannot be had, for a reason retrying will not fix."""
        ...

    def note(self, job_id: str, text: str) -> None:
        """Why the job has fewer nodes than it wants, for its caller's spinner ("" clears it)."""
        ...


class NodeKeeper:
    def __init__(
        self,
        config: ClusterConfig,
        provider: Provider,
        book: NodeBook,
        url: str,
        version: str,
        hash_token: Callable[[str], str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config, self.provider, self.book = config, provider, book
        self.url, self.version, self.hash_token, self.clock = url, version, hash_token, clock
        self.records: dict[str, NodeRecord] = {n.name: n for n in book.nodes()}
        self.sizes: list[tuple[int, int]] = []  # (CPUs, RAM) of each group, from the provider
        # Standby is kept from the first start on; `burla cluster stop` ends it until `start`, across restarts.
        kept = book.standby_on()
        self.standby_on = kept if kept is not None else any(g.standby for g in config.groups)
        self.cluster: Cluster | None = None
        self.ca_pem = ""  # the CA nodes verify an https daemon URL by (their boot metadata); "": the system's
        self._wake = trio.Event()
        self._creating: set[str] = set()
        self._deleting: set[str] = set()
        self._serial = 0
        self._notes: dict[str, str] = {}
        self._cooldown: dict[int, tuple[float, float]] = {}  # group -> (no standby creates until, last delay)
        self._boot_failures: dict[int, int] = {}  # group -> nodes in a row that did not come up
        self.failures: list[str] = []  # recent growth failures, newest last, for `burla cluster nodes`

    # ---- what others tell it --------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def instance_of(self, token: str) -> str | None:
        """The name of the instance whose registration token this is (None: not an instance token)."""
        digest = self.hash_token(token)
        return next((n.name for n in self.records.values() if n.token_hash == digest), None)

    def registered(self, name: str, agent_id: str) -> None:
        node = self.records.get(name)
        if node is None or node.state in (NodeState.DELETING, NodeState.FAILED):
            return
        if node.state == NodeState.BUSY and node.job is not None:  # registered again (a daemon restart)
            self._set(node, NodeState.BUSY, f"its agent registered again; held by job {node.job}", agent_id=agent_id)
            if self.cluster is not None:
                self.cluster.hold(agent_id, node.job)
        else:
            self._set(node, NodeState.READY, "its agent registered", agent_id=agent_id)
        self._boot_failures.pop(node.group, None)
        self._cooldown.pop(node.group, None)
        self.wake()

    def booting(self) -> bool:
        """Whether a node is on its way (a job with no node waits for it rather than failing)."""
        return any(n.state == NodeState.BOOTING for n in self.records.values())

    def cannot_run(self, spec: m.JobSpec) -> str:
        """Why no node of any group could run one call of `spec` ("": some group can)."""
        ram = int(spec.func_ram * 1e9)
        if any(cpus + 1e-9 >= spec.func_cpu and ram_total >= ram for cpus, ram_total in self.sizes):
            return ""
        have = ", ".join(
            f"{g.machine_type} ({cpus} CPUs, {ram_total / 1e9:.0f} GB)"
            for g, (cpus, ram_total) in zip(self.config.groups, self.sizes, strict=True)
        )
        return (
            f"no node group of this cluster can run one call of func_cpu={spec.func_cpu:g}, func_ram={spec.func_ram:g} GB:"
            f" its groups are {have or 'none'}. Ask for less per call, or add a bigger group (burla cluster spec set)."
        )

    def agent_lost(self, agent_id: str) -> None:
        """The agent stopped answering: until the provider says more, the node is not usable."""
        for node in self.records.values():
            if node.agent_id == agent_id and node.state not in (NodeState.DELETING, NodeState.FAILED):
                self._fail(node, "its agent stopped answering")
        self.wake()

    def boot_failed(self, name: str, step: str, log_tail: str) -> None:
        node = self.records.get(name)
        if node is not None and node.state == NodeState.BOOTING:
            tail = log_tail.strip().splitlines()[-20:]
            self._boot_failed(
                node, f"its startup script failed at {step or 'a step it did not name'}: " + " | ".join(tail)
            )
            self.wake()

    def start(self) -> None:
        """`burla cluster start`: keep standby from now on."""
        self.standby_on = True
        self.book.set_standby_on(True)
        self.wake()

    async def stop(self) -> None:
        """`burla cluster stop`: standby off, every node deleted (the control plane cancels their jobs)."""
        self.standby_on = False
        self.book.set_standby_on(False)
        for node in list(self.records.values()):
            if node.state != NodeState.DELETING:
                self._set(node, NodeState.DELETING, "the cluster was stopped")
        async with trio.open_nursery() as nursery:
            for node in list(self.records.values()):
                nursery.start_soon(self._delete, node.name)

    # ---- the spec, live ------------------------------------------------------------------------

    def spec(self) -> m.ClusterSpec:
        c = self.config
        groups = tuple(m.NodeGroup(**dataclasses.asdict(g)) for g in c.groups)
        return m.ClusterSpec(groups, tuple(c.zones), c.max_cpus, c.grow, c.idle_timeout, c.standby_idle_timeout,
                             c.boot_timeout)  # fmt: skip

    async def update(self, spec: m.ClusterSpec) -> None:
        """Use another spec from now on (`burla cluster spec set`): groups, zones, limits. Nodes of a group
        that keeps its machine type stay; free nodes of a group that left are deleted. ProviderError, saying
        which, when a group's machine type cannot be had."""
        for zone in spec.zones:
            if not re.fullmatch(m.ZONE, zone):
                raise ProviderError(f"ClusterSpec.zones: {zone[:80]!r} is not a zone name like us-central1-a")
        config = with_spec(self.config, spec)
        groups = config.groups
        use_zones = getattr(self.provider, "use_zones", None)
        if use_zones is not None:
            use_zones(config.zones)
        try:
            sizes = [await self.provider.machine(g) for g in groups]  # before anything else changes
        except BaseException:
            if use_zones is not None:
                use_zones(self.config.zones)  # a refused spec leaves nothing behind
            raise
        old = self.config.groups
        for node in self.records.values():
            machine = old[node.group].machine_type if 0 <= node.group < len(old) else None
            node.group = next((i for i, g in enumerate(groups) if g.machine_type == machine), -1)
        self.config, self.sizes = config, sizes
        if self.book.standby_on() is None:  # never started or stopped by hand: standby follows the spec
            self.standby_on = any(g.standby for g in groups)
        self.wake()

    # ---- the loop ---------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._size_groups()
        await self.adopt()
        if self.cluster is not None:  # the holds of a daemon that restarted
            for node in self.records.values():
                if node.state == NodeState.BUSY and node.job and node.agent_id:
                    self.cluster.hold(node.agent_id, node.job)
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch)
            self._nursery = nursery
            while True:
                with trio.move_on_after(ROUND_SECONDS):
                    await self._wake.wait()
                self._wake = trio.Event()
                self.round()

    async def _size_groups(self) -> None:
        self.sizes = []
        for group in self.config.groups:
            self.sizes.append(await self.provider.machine(group))

    def policy(self) -> scaling.Policy:
        groups = [
            scaling.Group(str(i), cpus, ram, g.standby, g.accelerator_count)
            for i, (g, (cpus, ram)) in enumerate(zip(self.config.groups, self.sizes, strict=True))
        ]
        return scaling.Policy(
            groups,
            max_cpus=self.config.max_cpus,
            idle_timeout=self.config.idle_timeout,
            standby_idle_timeout=self.config.standby_idle_timeout or None,
            boot_timeout=self.config.boot_timeout,
            standby_on=self.standby_on,
        )

    def round(self) -> scaling.Plan:
        """One round: plan, then start what the plan says (creates and deletes run in the background)."""
        now = self.clock()
        cluster = self.cluster
        demands = cluster.demands() if cluster is not None else []
        nodes = [
            scaling.Node(n.name, str(n.group), n.state, n.since, n.job)
            for n in self.records.values()
            if 0 <= n.group < len(self.sizes)
        ]
        wanted = {d.job_id for d in demands}
        for n in list(self.records.values()):  # a group that left the spec: each of its nodes goes once free
            if 0 <= n.group < len(self.sizes) or n.state in (NodeState.DELETING, NodeState.FAILED):
                continue
            if n.job is not None and n.job in wanted and n.state == NodeState.BUSY:
                continue  # its job still runs there
            if n.state == NodeState.BUSY and cluster is not None and n.agent_id:
                cluster.release(n.agent_id)
            self._set(n, NodeState.DELETING, "its group is no longer in the cluster spec", job=None)
        out = scaling.plan(self.policy(), nodes, demands, now)
        if out.standby_off:
            self.standby_on = False
            self.book.set_standby_on(False)
            log.info("the cluster was unused for %.0f s: standby nodes are deleted", self.config.standby_idle_timeout)
        for name in out.release:
            node = self.records[name]
            if node.state == NodeState.BUSY:
                self._set(node, NodeState.IDLE, f"job {node.job} ended", job=None)
                if cluster is not None and node.agent_id:
                    cluster.release(node.agent_id)
            else:
                self._set(node, node.state, f"job {node.job} ended before it booted", job=None)
        for name, job in out.assign:
            node = self.records[name]
            self._set(node, NodeState.BUSY, f"held by job {job}", job=job)
            if cluster is not None and node.agent_id:
                cluster.hold(node.agent_id, job)
        for name, job in out.handover:  # fair share: the node finishes the old job's leases, then runs the new
            node = self.records[name]
            why = f"handed from job {node.job} to job {job} (fair share between users)"
            self._set(node, NodeState.BUSY, why, job=job)
            if cluster is not None and node.agent_id:
                cluster.hold(node.agent_id, job)
        for name, why in out.failed:
            node = self.records[name]
            self._boot_failed(node, why)
        for name, why in out.delete:
            node = self.records[name]
            self._set(node, NodeState.DELETING, why)
        for create in out.create:
            group = int(create.group)
            if create.job is None and self._cooldown.get(group, (0.0, 0.0))[0] > now:
                continue  # standby of a group the cloud refused lately: not every round
            for _ in range(create.count):
                self._create(group, create.job)
        if cluster is not None:
            for demand in demands:
                text = out.notes.get(demand.job_id, "")
                if self._notes.get(demand.job_id, "") != text:
                    cluster.note(demand.job_id, text)
            self._notes = {d.job_id: out.notes.get(d.job_id, "") for d in demands}
        for node in list(self.records.values()):
            if node.state in (NodeState.DELETING, NodeState.FAILED) and node.name not in self._deleting:
                self._start(self._delete, node.name)
        return out

    def _start(self, fn: Callable[..., object], *args: object) -> None:
        nursery = getattr(self, "_nursery", None)
        if nursery is None:
            return  # not running (a test of one round): nothing is carried out
        nursery.start_soon(fn, *args)

    def _create(self, group: int, job: str | None) -> None:
        self._serial += 1
        name = f"burla-{self.config.name}-{secrets.token_hex(3)}{self._serial}"[:63]
        token = f"burla_instance_{secrets.token_urlsafe(32)}"
        now = self.clock()
        node = NodeRecord(name, group, NodeState.BOOTING, now, job=job, created=now, token_hash=self.hash_token(token))
        self.records[name] = node
        self.book.put_node(node, f"created for job {job}" if job else "created for standby")
        self._creating.add(name)  # now, not when the task starts: a delete meanwhile waits for the create
        self._start(self._create_instance, node, token)

    async def _create_instance(self, node: NodeRecord, token: str) -> None:
        group = self.config.groups[node.group]
        try:
            pip_args = "--no-index" if self.config.wheelhouse else ""
            boot = Boot(self.url, token, self.version, pip_args, self.ca_pem)
            made = await self.provider.create(node.name, node.group, group, boot)
        except Exception as e:  # noqa: BLE001 - whatever the cloud or the machine says, the daemon goes on
            fatal = isinstance(e, ProviderError)  # quota, permission, no zone: waiting will not fix it
            why = str(e) if fatal else f"{type(e).__name__}: {e} (retried)"
            log.warning("node %s (%s) could not be created: %s", node.name, group.machine_type, why)
            self.failures = [*self.failures[-19:], why]
            job = node.job
            self._back_off(node.group)
            self._fail(node, why, delete=False)
            self.records.pop(node.name, None)
            self.book.drop_node(node.name, f"could not be created: {why}")
            if fatal and job is not None and self.cluster is not None:
                self.cluster.growth_failed(job, why)  # the control plane fails the job: it wants no more nodes
            self.wake()
            return
        finally:
            self._creating.discard(node.name)
        self._cooldown.pop(node.group, None)
        if node.name in self.records:
            node.zone = made.zone
            self.book.put_node(node, f"instance created in {made.zone or 'this machine'}")

    async def _delete(self, name: str) -> None:
        if name in self._deleting:
            return
        self._deleting.add(name)
        try:
            while name in self._creating:  # an insert still in flight: delete what it makes
                await trio.sleep(0.5)
            try:
                await self.provider.delete(name)
            except Exception as e:  # noqa: BLE001 - a failed delete is retried by the next round
                log.warning("deleting node %s failed (%s); trying again", name, e)
                await trio.sleep(5)
                return
            node = self.records.pop(name, None)
            if node is not None:
                self.book.drop_node(name, f"deleted ({node.reason})")
        finally:
            self._deleting.discard(name)
        self.wake()

    # ---- the provider's view ---------------------------------------------------------------------

    async def adopt(self) -> None:
        """After a restart: take on the provider's instances of this cluster, forget records it lacks."""
        instances = await self.provider.list()
        self._reconcile(instances, adopting=True)

    async def _watch(self) -> None:
        while True:
            await trio.sleep(WATCH_SECONDS)
            asked = self.clock()
            try:
                instances = await self.provider.list()
            except Exception as e:  # noqa: BLE001 - the cloud API unreachable: try again later
                log.warning("listing the cluster's instances failed: %s", e)
                continue
            self._reconcile(instances, asked=asked)

    def _reconcile(self, instances: Sequence[Instance], adopting: bool = False, asked: float | None = None) -> None:
        seen = {i.name: i for i in instances}
        now = self.clock()
        for name, node in list(self.records.items()):
            if asked is not None and node.created >= asked - 1.0 and name not in seen:
                continue  # created while the list was on its way: its absence says nothing yet
            instance = seen.get(name)
            if name in self._creating or node.state == NodeState.DELETING and instance is None:
                if instance is None and name not in self._creating:
                    self.records.pop(name)
                    self.book.drop_node(name, "gone")
                continue
            if instance is None:
                self._gone(node, "its instance is gone (deleted outside Burla, or never created)")
            elif instance.status in GONE_STATUSES:
                why = f"the cloud stopped it ({instance.status}{': ' + instance.detail if instance.detail else ''})"
                self._gone(node, why)
        for name, instance in seen.items():
            if name in self.records or instance.status in GONE_STATUSES:
                if name not in self.records and adopting:
                    self._start(self._delete, name)
                continue
            if 0 <= instance.group < len(self.config.groups):
                node = NodeRecord(name, instance.group, NodeState.BOOTING, now, zone=instance.zone, created=now)
                node.reason = "adopted after a daemon restart: waiting for its agent"
                self.records[name] = node
                self.book.put_node(node, node.reason)
        self.wake()

    def _gone(self, node: NodeRecord, why: str) -> None:
        self._fail(node, why)  # its agent is forgotten, and what it ran runs elsewhere

    # ---- records ------------------------------------------------------------------------

    def _set(self, node: NodeRecord, state: NodeState, why: str, **changes: object) -> None:
        for key, value in changes.items():
            setattr(node, key, value)
        node.state, node.since, node.reason = state, self.clock(), why
        self.book.put_node(node, why)

    def _back_off(self, group: int) -> None:
        """No standby creates for `group` for a while: 30 s, 60 s, ... 10 min after each failure in a row."""
        delay = min(600.0, 2 * self._cooldown.get(group, (0.0, 15.0))[1])
        self._cooldown[group] = (self.clock() + delay, delay)

    def _boot_failed(self, node: NodeRecord, why: str) -> None:
        """A node that did not come up (timeout, or its startup script failed): its group backs off, and
        after `BOOT_FAILURES_TO_GIVE_UP` in a row the job it booted for fails with the reason."""
        job = node.job
        failures = self._boot_failures.get(node.group, 0) + 1
        self._boot_failures[node.group] = failures
        self._back_off(node.group)
        self.failures = [*self.failures[-19:], f"{node.name}: {why}"]
        self._fail(node, why)
        if job is not None and failures >= BOOT_FAILURES_TO_GIVE_UP and self.cluster is not None:
            self.cluster.growth_failed(job, f"{failures} nodes in a row did not come up; the last: {why}")

    def _fail(self, node: NodeRecord, why: str, delete: bool = True) -> None:
        if node.agent_id and self.cluster is not None:
            if delete:
                self.cluster.node_gone(node.agent_id, why)  # what it ran runs elsewhere now
            else:
                self.cluster.release(node.agent_id)
        self._set(node, NodeState.FAILED, why, job=None)
        if delete:
            self._start(self._delete, node.name)

    # ---- what it tells ----------------------------------------------------------------------

    def cpus(self) -> int:
        return sum(self.sizes[n.group][0] for n in self.records.values() if 0 <= n.group < len(self.sizes))

    def describe(self) -> list[dict[str, object]]:
        """One row per node for `burla cluster nodes`."""
        now = self.clock()
        rows: list[dict[str, object]] = []
        for n in sorted(self.records.values(), key=lambda n: n.created):
            group: NodeGroupConfig | None = (
                self.config.groups[n.group] if 0 <= n.group < len(self.config.groups) else None
            )
            rows.append({
                "name": n.name,
                "state": n.state.value,
                "machine_type": group.machine_type if group else "",
                "zone": n.zone,
                "age": math.floor(now - n.created),
                "job": n.job or "",
                "reason": n.reason,
                "agent_id": n.agent_id,
            })  # fmt: skip
        return rows


def with_spec(config: ClusterConfig, spec: m.ClusterSpec) -> ClusterConfig:
    """`config` with the groups, zones and limits of `spec` (what `burla cluster spec set` changes)."""
    return dataclasses.replace(
        config, groups=[NodeGroupConfig(**g.to_wire()) for g in spec.groups], zones=list(spec.zones),
        max_cpus=spec.max_cpus, grow=spec.grow, idle_timeout=spec.idle_timeout,
        standby_idle_timeout=spec.standby_idle_timeout, boot_timeout=spec.boot_timeout,
    )  # fmt: skip
