"""Which pools container nodes make: standby containers, or a job's own pool.

Between jobs a container node keeps warm the standby images the cluster names
(their shape is `StandbyImage.shape`, the one definition the agent uses too). A
job that no standby container fits (another image, a dockerfile=, more CPU or
RAM per call) claims container nodes, and each claimed node makes a pool in
that job's shape, or takes the one it parked after an earlier job of that image
(nodes with one are claimed first). A claim lasts until the job ends.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence

from burla.schemas import messages as m

from .placement import EPSILON, NodeState, ram_bytes


def standby_fits(standby: Sequence[m.StandbyImage], node: NodeState, spec: m.JobSpec) -> bool:
    """Can calls of `spec` run on `node`'s standby containers, as they are?"""
    if spec.build:
        return False
    for i, image in enumerate(standby):
        if image.image == spec.image or (not spec.image and i == 0):  # the first image is the default
            cpus, ram, _ = image.shape(node.info.cpus, node.info.ram_bytes)
            return spec.func_cpu <= cpus + EPSILON and ram_bytes(spec) <= ram
    return False


def parked_for(node: NodeState, spec: m.JobSpec) -> bool:
    """Does `node` keep warm a pool of `spec`'s image, parked after an earlier job?"""
    return any(p.state == "parked" and p.image == spec.image and not p.default for p in node.pools.values())


def want_for(standby: Sequence[m.StandbyImage], node: NodeState, spec: m.JobSpec) -> m.PoolWant | None:
    """The pool `node` would make to run `spec` (its image, one call per container)."""
    image = spec.image or m.default_image(standby)
    if not image:
        return None  # no image named and no standby image to default to
    count = node.capacity_for(spec)
    if spec.max_parallelism is not None:
        count = min(count, spec.max_parallelism)
    if count <= 0:
        return None
    return m.PoolWant(spec.job_id, image, spec.build, spec.func_cpu, ram_bytes(spec), count, spec.python_version)


def plan_wants(
    claims: MutableMapping[str, str],
    nodes: Mapping[str, NodeState],
    running: Mapping[str, m.JobSpec],
    standby: Sequence[m.StandbyImage],
) -> dict[str, tuple[m.PoolWant, ...]]:
    """The pools each container node should make now; nodes not named go back to standby.

    `claims` (agent id -> job id) is updated in place: claims of nodes or jobs
    that are gone are dropped, and each job in `running` (oldest first) claims
    free container nodes, those with a pool of its image parked first, then the least busy, until it has
    max_parallelism workers.
    """
    for agent_id, job_id in list(claims.items()):
        if agent_id not in nodes or job_id not in running:
            del claims[agent_id]
    containers = sorted((n for n in nodes.values() if n.containers), key=lambda n: (len(n.leases), n.agent_id))
    if not containers:
        return {}  # process nodes only (the usual case): nothing to plan, whatever the number of nodes
    for spec in running.values():
        needed = spec.max_parallelism or (1 << 30)
        have = 0
        for agent_id, job_id in claims.items():
            if job_id == spec.job_id:
                want = want_for(standby, nodes[agent_id], spec)
                have += want.count if want else 0
        for node in sorted(containers, key=lambda n: not (spec.image and parked_for(n, spec))):  # stable
            if have >= needed:
                break
            if node.agent_id in claims or standby_fits(standby, node, spec):
                continue
            want = want_for(standby, node, spec)
            if want is not None:
                claims[node.agent_id] = spec.job_id
                have += want.count
    out: dict[str, tuple[m.PoolWant, ...]] = {}
    for node in containers:
        claimed = claims.get(node.agent_id)
        planned = want_for(standby, node, running[claimed]) if claimed else None
        out[node.agent_id] = (planned,) if planned else ()
    return out
