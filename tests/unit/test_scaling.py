"""The scaling decisions (daemon/scaling.py): rules one by one, then a simulated cluster of 1,000 nodes."""

from __future__ import annotations

import collections
import dataclasses
import random

import pytest

from burla.daemon.scaling import Create, Demand, Group, Node, NodeState, Plan, Policy, plan

GB = 10**9
BIG = Group("n2-96", cpus=96, ram_bytes=384 * GB, standby=5)


def free_nodes(group: Group, count: int, since: float = 0.0, prefix: str = "s") -> list[Node]:
    return [Node(f"{prefix}{i}", group.name, NodeState.READY, since) for i in range(count)]


def test_the_seeds_example_five_standby_nodes_and_a_thousand_calls_start_eleven() -> None:
    """ "How Burla works", section 3: 5 free 96-CPU nodes, 1,000 calls of 1 CPU: 6 for the job, 5 for standby."""
    policy = Policy([BIG], max_cpus=10_000)
    out = plan(policy, free_nodes(BIG, 5), [Demand("j", calls=1000, grow=True)], now=1.0)
    assert sorted(job for _, job in out.assign) == ["j"] * 5
    assert out.create == [Create("n2-96", 6, "j"), Create("n2-96", 5, None)]
    assert out.created() == 11 and not out.delete and not out.notes


def test_without_grow_a_job_takes_what_is_free_and_waits_saying_why_when_nothing_is() -> None:
    policy = Policy([dataclasses.replace(BIG, standby=1)], max_cpus=10_000)
    out = plan(policy, free_nodes(BIG, 1), [Demand("a", calls=500), Demand("b", calls=10)], now=1.0)
    assert out.assign == [("s0", "a")]
    assert "waiting for a free node" in out.notes["b"]
    assert out.create == [Create("n2-96", 1, None)]  # standby is restored for the next job


def test_nodes_are_single_tenant_and_jobs_are_served_in_order() -> None:
    small = Group("e2-4", cpus=4, ram_bytes=16 * GB, standby=3)
    policy = Policy([small], max_cpus=100)
    out = plan(policy, free_nodes(small, 3), [Demand("first", calls=8), Demand("second", calls=8)], now=1.0)
    assert [job for _, job in out.assign] == ["first", "first", "second"]


def test_the_first_group_one_call_fits_is_grown_and_a_call_no_group_fits_is_named() -> None:
    small = Group("e2-4", cpus=4, ram_bytes=16 * GB)
    big = Group("n2-32", cpus=32, ram_bytes=128 * GB)
    policy = Policy([small, big], max_cpus=1000)
    out = plan(policy, [], [Demand("j", calls=3, func_cpu=8, func_ram=20 * GB, grow=True)], now=0.0)
    assert out.create == [Create("n2-32", 1, "j")]  # 3 calls of 8 CPUs on one 32-CPU node; e2-4 too small
    out = plan(policy, [], [Demand("huge", calls=1, func_cpu=64, grow=True)], now=0.0)
    assert out.create == [] and "no node group" in out.notes["huge"]
    out = plan(policy, [], [Demand("gpu", calls=1, func_gpu=1, grow=True)], now=0.0)
    assert "no node group" in out.notes["gpu"]


def test_ram_per_call_bounds_the_calls_of_a_node() -> None:
    assert BIG.calls(func_cpu=1, func_ram=100 * GB) == 3
    assert BIG.calls(func_cpu=0.5, func_ram=0) == 192
    assert BIG.calls(func_cpu=97, func_ram=0) == 0


def test_the_cpu_cap_is_never_passed_and_the_job_is_told() -> None:
    group = Group("e2-8", cpus=8, ram_bytes=32 * GB, standby=2)
    policy = Policy([group], max_cpus=40)
    out = plan(policy, free_nodes(group, 2), [Demand("j", calls=100, grow=True)], now=0.0)
    assert out.create == [Create("e2-8", 3, "j")]  # 2 held + 3 new = 40 CPUs: no room left for standby
    assert "at most 40 CPUs" in out.notes["j"] and "8 more e2-8 nodes" in out.notes["j"]  # 11 wanted


def test_nodes_booting_for_a_job_are_counted_not_started_again_and_are_its_own_once_ready() -> None:
    group = Group("e2-8", cpus=8, ram_bytes=32 * GB)
    policy = Policy([group], max_cpus=1000)
    booting = [Node(f"b{i}", "e2-8", NodeState.BOOTING, 0.0, job="j") for i in range(2)]
    assert plan(policy, booting, [Demand("j", calls=16, grow=True)], now=5.0).created() == 0
    ready = [dataclasses.replace(booting[0], state=NodeState.READY), booting[1]]
    assert plan(policy, ready, [Demand("j", calls=16, grow=True)], now=6.0).assign == [("b0", "j")]


def test_a_node_booting_for_a_job_that_ended_serves_standby() -> None:
    group = Group("e2-8", cpus=8, ram_bytes=32 * GB, standby=1)
    policy = Policy([group], max_cpus=1000)
    out = plan(policy, [Node("b0", "e2-8", NodeState.BOOTING, 0.0, job="gone")], [], now=5.0)
    assert out.created() == 0 and out.release == ["b0"]  # it counts as the standby node


def test_a_job_that_ended_releases_its_nodes_and_extra_idle_nodes_go_after_the_idle_timeout() -> None:
    group = Group("e2-8", cpus=8, ram_bytes=32 * GB, standby=1)
    policy = Policy([group], max_cpus=1000, idle_timeout=60)
    busy = [Node(f"n{i}", "e2-8", NodeState.BUSY, 0.0, job="j") for i in range(3)]
    out = plan(policy, busy, [], now=100.0)
    assert sorted(out.release) == ["n0", "n1", "n2"] and not out.delete and not out.create
    idle = [Node("n0", "e2-8", NodeState.IDLE, 100.0), Node("n1", "e2-8", NodeState.IDLE, 101.0)]
    idle.append(Node("n2", "e2-8", NodeState.IDLE, 102.0))
    assert plan(policy, idle, [], now=150.0).delete == []
    out = plan(policy, idle, [], now=161.5)
    assert [name for name, _ in out.delete] == ["n1", "n0"]  # the most recently active stays on standby
    assert out.delete[0][1] == "idle for 60 s"  # n1, idle since 101


def test_a_node_with_leases_is_never_deleted() -> None:
    group = Group("e2-8", cpus=8, ram_bytes=32 * GB)
    out = plan(Policy([group], max_cpus=100), [Node("n0", "e2-8", NodeState.IDLE, 0.0, leases=1)], [], now=1e6)
    assert out.delete == []


def test_standby_idle_timeout_stops_the_cluster_after_that_long_unused() -> None:
    group = Group("e2-8", cpus=8, ram_bytes=32 * GB, standby=2)
    policy = Policy([group], max_cpus=100, standby_idle_timeout=3600)
    nodes = free_nodes(group, 2, since=0.0)
    assert plan(policy, nodes, [], now=3000).delete == []
    out = plan(policy, nodes, [], now=3600)
    assert out.standby_off and sorted(n for n, _ in out.delete) == ["s0", "s1"]
    out = plan(dataclasses.replace(policy, standby_on=False), [], [], now=3601)
    assert out.create == []  # stopped: no standby until `burla cluster start`


def test_a_node_that_does_not_boot_in_time_fails_and_is_replaced() -> None:
    group = Group("e2-8", cpus=8, ram_bytes=32 * GB, standby=1)
    policy = Policy([group], max_cpus=100, boot_timeout=600)
    out = plan(policy, [Node("b0", "e2-8", NodeState.BOOTING, 0.0)], [], now=600.0)
    assert out.failed == [("b0", "its agent did not register within 600 s of boot")]
    assert out.create == [Create("e2-8", 1, None)]


def test_failed_and_deleting_nodes_count_against_the_cap_until_gone() -> None:
    group = Group("e2-8", cpus=8, ram_bytes=32 * GB, standby=2)
    policy = Policy([group], max_cpus=16)
    nodes = [Node("d0", "e2-8", NodeState.DELETING, 0.0), Node("f0", "e2-8", NodeState.FAILED, 0.0)]
    assert plan(policy, nodes, [], now=1.0).created() == 0


# -- fair share between users ---------------------------------------------------------------------

SMALL = Group("e2-4", cpus=4, ram_bytes=16 * GB)  # 4 calls of 1 CPU a node


def busy(count: int, job: str, prefix: str | None = None, group: Group = SMALL) -> list[Node]:
    return [Node(f"{prefix or job}{i}", group.name, NodeState.BUSY, 0.0, job=job) for i in range(count)]


def holders(nodes: list[Node], out: Plan) -> dict[str, str]:
    """Which job each node holds once `out` is applied."""
    held = {n.name: n.job for n in nodes if n.job is not None}
    held.update(dict(out.assign))
    held.update(dict(out.handover))
    return {name: job for name, job in held.items() if job is not None}


def applied(nodes: list[Node], out: Plan) -> list[Node]:
    held = holders(nodes, out)
    return [dataclasses.replace(n, state=NodeState.BUSY, job=held[n.name]) if n.name in held else n for n in nodes]


def test_free_nodes_go_to_users_in_turn_not_first_come_first_served() -> None:
    policy = Policy([SMALL], max_cpus=1000)
    demands = [Demand("a1", 100, user="alice"), Demand("a2", 100, user="alice"), Demand("b1", 100, user="bob")]
    out = plan(policy, free_nodes(SMALL, 4), demands, now=1.0)
    assert [job for _, job in out.assign] == ["a1", "b1", "a1", "b1"]  # alice's own jobs: in arrival order
    assert out.handover == [] and "waiting for a free node" in out.notes["a2"]


def test_a_user_holding_every_node_hands_half_to_a_user_who_comes_later_and_then_it_is_stable() -> None:
    policy = Policy([SMALL], max_cpus=1000)
    nodes = busy(6, "huge")
    demands = [Demand("huge", 10_000_000, user="alice"), Demand("small", 40, user="bob")]
    out = plan(policy, nodes, demands, now=1.0)
    assert out.assign == [] and len(out.handover) == 3 and {job for _, job in out.handover} == {"small"}
    assert "small" not in out.notes  # it has nodes: they take its leases as theirs end
    again = plan(policy, applied(nodes, out), demands, now=2.0)
    assert again.handover == [] and again.assign == [] and again.release == []


def test_three_users_get_a_third_of_the_nodes_each() -> None:
    policy = Policy([SMALL], max_cpus=1000)
    nodes = busy(9, "a")
    demands = [Demand("a", 1000, user="ann"), Demand("b", 1000, user="ben"), Demand("c", 1000, user="cat")]
    out = plan(policy, nodes, demands, now=1.0)
    counts = collections.Counter(holders(nodes, out).values())
    assert counts == {"a": 3, "b": 3, "c": 3}


def test_a_job_of_ten_gets_what_it_needs_and_no_more() -> None:
    policy = Policy([SMALL], max_cpus=1000)
    nodes = busy(8, "huge")
    out = plan(policy, nodes, [Demand("huge", 10_000_000, user="alice"), Demand("ten", 10, user="bob")], now=1.0)
    assert collections.Counter(holders(nodes, out).values()) == {"huge": 5, "ten": 3}  # 10 calls: 3 nodes of 4


def test_a_user_with_two_jobs_gets_no_double_share_and_its_newest_job_gives_back_first() -> None:
    policy = Policy([SMALL], max_cpus=1000)
    nodes = busy(4, "old") + busy(4, "new")
    demands = [Demand("old", 1000, user="alice"), Demand("new", 1000, user="alice"), Demand("b", 1000, user="bob")]
    out = plan(policy, nodes, demands, now=1.0)
    assert sorted(name for name, _ in out.handover) == ["new0", "new1", "new2", "new3"]
    assert collections.Counter(holders(nodes, out).values()) == {"old": 4, "b": 4}


def test_nodes_a_job_does_not_need_are_given_first() -> None:
    policy = Policy([SMALL], max_cpus=1000)
    nodes = busy(4, "done-soon") + busy(4, "big")  # done-soon has 4 calls left: one node runs them
    demands = [Demand("done-soon", 4, user="alice"), Demand("big", 1000, user="alice"), Demand("b", 1000, user="bob")]
    out = plan(policy, nodes, demands, now=1.0)
    names = [name for name, _ in out.handover]
    assert len(names) == 4  # bob's half
    assert all(n.startswith("done-soon") for n in names[:3]) and names[3].startswith("big")  # done-soon keeps 1


def test_a_node_is_handed_only_to_a_job_whose_call_fits_it() -> None:
    big = Group("n2-32", cpus=32, ram_bytes=128 * GB)
    policy = Policy([SMALL, big], max_cpus=1000)
    nodes = busy(4, "a") + busy(2, "a", prefix="big", group=big)
    demands = [Demand("a", 1000, user="alice"), Demand("wide", 10, func_cpu=16, user="bob")]
    out = plan(policy, nodes, demands, now=1.0)
    # bob's share is 3 of the 6 nodes, but a call of 16 CPUs fits only the 2 big ones
    assert sorted(name for name, _ in out.handover) == ["big0", "big1"]
    out = plan(Policy([SMALL], max_cpus=1000), nodes[:4], demands, now=1.0)
    assert out.handover == [] and "no node group" in out.notes["wide"]


def test_users_of_the_same_name_are_one_user_and_nothing_moves_between_their_jobs() -> None:
    policy = Policy([SMALL], max_cpus=1000)
    nodes = busy(6, "first")
    out = plan(policy, nodes, [Demand("first", 1000), Demand("second", 1000)], now=1.0)
    assert out.handover == [] and "waiting for a free node" in out.notes["second"]


def test_under_the_cpu_cap_new_nodes_are_shared_between_users_in_turn() -> None:
    group = Group("e2-8", cpus=8, ram_bytes=32 * GB)
    policy = Policy([group], max_cpus=40)
    demands = [
        Demand("a1", 1000, grow=True, user="alice"),
        Demand("a2", 1000, grow=True, user="alice"),
        Demand("b1", 1000, grow=True, user="bob"),
    ]
    out = plan(policy, [], demands, now=1.0)
    assert out.create == [Create("e2-8", 3, "a1"), Create("e2-8", 2, "b1")]  # 5 nodes fit: alice came first
    assert all("at most 40 CPUs" in out.notes[j] for j in ("a1", "a2", "b1"))


def test_nodes_booting_for_a_user_count_as_theirs() -> None:
    policy = Policy([SMALL], max_cpus=1000)
    nodes = busy(4, "a") + [Node(f"boot{i}", SMALL.name, NodeState.BOOTING, 0.0, job="b") for i in range(2)]
    demands = [Demand("a", 1000, user="alice"), Demand("b", 16, grow=True, user="bob")]
    out = plan(policy, nodes, demands, now=1.0)
    assert out.created() == 2 and out.handover == []  # 16 calls, 4 nodes: 2 booting, 2 more; 4 each is even
    demands[1] = dataclasses.replace(demands[1], grow=False)
    out = plan(policy, nodes, demands, now=1.0)
    assert out.created() == 0 and len(out.handover) == 1  # 6 nodes: bob has 2 booting, and 1 of alice's


# -- a simulated cluster ---------------------------------------------------------------------------


@dataclasses.dataclass
class SimJob:
    job_id: str
    calls: int
    func_cpu: float
    grow: bool
    work: float  # node-seconds left: the job ends when its nodes have done this much
    user: str = ""


@dataclasses.dataclass
class Sim:
    policy: Policy
    rng: random.Random
    now: float = 0.0
    nodes: dict[str, Node] = dataclasses.field(default_factory=dict)
    boot_at: dict[str, float] = dataclasses.field(default_factory=dict)  # inf: never registers
    gone_at: dict[str, float] = dataclasses.field(default_factory=dict)
    jobs: list[SimJob] = dataclasses.field(default_factory=list)
    serial: int = 0
    most: int = 0

    def apply(self, out: Plan) -> None:
        before = dict(self.nodes)
        for name, _why in out.delete:
            node = before[name]
            assert node.state in (NodeState.READY, NodeState.IDLE) and node.job is None and node.leases == 0, node
        for name, _why in out.failed:
            assert before[name].state == NodeState.BOOTING
        for name, _why in [*out.delete, *out.failed]:
            self.nodes[name] = dataclasses.replace(self.nodes[name], state=NodeState.DELETING, since=self.now)
            self.gone_at[name] = self.now + self.rng.uniform(1, 30)
        for name in out.release:
            node = self.nodes[name]
            if node.state == NodeState.BUSY:
                node = dataclasses.replace(node, state=NodeState.IDLE, since=self.now)
            self.nodes[name] = dataclasses.replace(node, job=None)
        for name, job in out.assign:
            node = self.nodes[name]
            assert node.state in (NodeState.READY, NodeState.IDLE) and node.job in (None, job), node
            self.nodes[name] = dataclasses.replace(node, state=NodeState.BUSY, since=self.now, job=job, leases=1)
        user_of = {j.job_id: j.user for j in self.jobs}
        handed = [name for name, _ in out.handover]
        others = {name for name, _ in [*out.assign, *out.delete, *out.failed]} | set(out.release)
        assert len(handed) == len(set(handed)) and not others & set(handed), f"a node handed and more: {out}"
        for name, job in out.handover:
            node = before[name]
            assert node.state == NodeState.BUSY and node.job is not None and user_of[node.job] != user_of[job], node
            self.nodes[name] = dataclasses.replace(node, since=self.now, job=job)  # its leases finish first
        for create in out.create:
            for _ in range(create.count):
                self.serial += 1
                name = f"{create.group}-{self.serial}"
                self.nodes[name] = Node(name, create.group, NodeState.BOOTING, self.now, job=create.job)
                slow = self.rng.random() < 0.05
                self.boot_at[name] = float("inf") if slow else self.now + self.rng.uniform(20, 120)
        self.most = max(self.most, len(self.nodes))

    def tick(self, dt: float) -> None:
        self.now += dt
        for name, node in list(self.nodes.items()):
            if name in self.gone_at and self.now >= self.gone_at[name]:
                del self.nodes[name]
            elif node.state == NodeState.BOOTING and self.now >= self.boot_at[name]:
                self.nodes[name] = dataclasses.replace(node, state=NodeState.READY, since=self.now)
            elif node.state != NodeState.DELETING and self.rng.random() < 0.0005:  # preempted, or deleted by hand
                del self.nodes[name]
        for job in list(self.jobs):
            holding = sum(1 for n in self.nodes.values() if n.job == job.job_id and n.state == NodeState.BUSY)
            job.work -= holding * dt
            if job.work <= 0:
                self.jobs.remove(job)
                for name, n in self.nodes.items():
                    if n.job == job.job_id and n.state == NodeState.BUSY:
                        self.nodes[name] = dataclasses.replace(n, leases=0)  # its leases are done

    def demands(self) -> list[Demand]:
        return [Demand(j.job_id, j.calls, func_cpu=j.func_cpu, grow=j.grow, user=j.user) for j in self.jobs]

    def check(self, out: Plan) -> None:
        policy = self.policy
        cpus = sum(policy.group(n.group).cpus for n in self.nodes.values())  # type: ignore[union-attr]
        assert cpus <= policy.max_cpus, f"{cpus} CPUs kept, over max_cpus {policy.max_cpus}"
        for group in policy.groups:
            mine = [n for n in self.nodes.values() if n.group == group.name]
            free = [n for n in mine if n.state in (NodeState.READY, NodeState.IDLE) and n.job is None]
            booting = [n for n in mine if n.state == NodeState.BOOTING and n.job is None]
            if policy.standby_on and len(free) + len(booting) < group.standby:
                assert cpus + group.cpus > policy.max_cpus, f"standby of {group.name} not restored at {self.now}"
            stale = [n for n in free if self.now - n.since > policy.idle_timeout]
            assert len(stale) <= (group.standby if policy.standby_on else 0), f"idle past timeout: {stale}"


@pytest.mark.parametrize("seed", range(3))
def test_a_simulated_cluster_of_a_thousand_nodes_keeps_the_invariants(seed: int) -> None:
    groups = [
        Group("e2-4", cpus=4, ram_bytes=16 * GB, standby=20),
        Group("n2-16", cpus=16, ram_bytes=64 * GB, standby=10),
        Group("n2-96", cpus=96, ram_bytes=384 * GB, standby=2),
    ]
    policy = Policy(groups, max_cpus=24_000, idle_timeout=60, boot_timeout=600)
    sim = Sim(policy, random.Random(seed))
    for step in range(600):
        if sim.rng.random() < 0.15:
            sim.jobs.append(SimJob(
                f"job{step}", calls=sim.rng.choice([1, 10, 100, 1000, 5000]), func_cpu=sim.rng.choice([0.5, 1, 2, 8, 32]),
                grow=sim.rng.random() < 0.7, work=sim.rng.uniform(10, 20_000), user=sim.rng.choice("abc"),
            ))  # fmt: skip
        out = plan(policy, sim.nodes.values(), sim.demands(), sim.now)
        sim.apply(out)
        sim.check(out)
        sim.tick(5.0)
    assert sim.most >= 1000, f"the simulation reached only {sim.most} nodes"


def test_a_running_job_without_grow_does_not_take_the_standby_restored_for_the_next_job() -> None:
    group = Group("e2-2", cpus=2, ram_bytes=8 * GB, standby=1)
    policy = Policy([group], max_cpus=100)
    nodes = [Node("held", "e2-2", NodeState.BUSY, 0.0, job="j"), Node("new", "e2-2", NodeState.READY, 5.0)]
    assert plan(policy, nodes, [Demand("j", calls=40)], now=6.0).assign == []  # stays on standby
    nodes.append(Node("given-back", "e2-2", NodeState.IDLE, 5.5))
    assert plan(policy, nodes, [Demand("j", calls=40)], now=6.0).assign == [("given-back", "j")]
    assert plan(policy, nodes[1:], [Demand("k", calls=40)], now=6.0).assign == [("new", "k"), ("given-back", "k")]
