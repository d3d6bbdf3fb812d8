"""The fake Compute Engine (tests/fake_compute.py) against the real google-cloud-compute client."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

compute_v1 = pytest.importorskip("google.cloud.compute_v1")
from google.api_core import exceptions  # noqa: E402
from google.protobuf import json_format  # noqa: E402

from tests.fake_compute import FakeCompute, NetnsUnavailable, _is_zombie, _matches, _parse_filter  # noqa: E402

P, A, B = "p", "us-central1-a", "us-central1-b"


@dataclass
class Clients:
    instances: Any
    operations: Any
    machine_types: Any
    zones: Any
    regions: Any

    def insert(self, zone: str = A, **kwargs: Any) -> Any:
        return self.instances.insert(project=P, zone=zone, instance_resource=instance(zone=zone, **kwargs))

    def wait(self, op: Any, zone: str = A) -> Any:
        """Wait as a provider must: with its own ZoneOperationsClient, until DONE."""
        while True:
            op = self.operations.wait(project=P, zone=zone, operation=op.name)
            if op.status == compute_v1.Operation.Status.DONE:
                return op


def instance(
    name: str = "node-1",
    zone: str = A,
    machine_type: str = "e2-standard-2",
    labels: dict[str, str] | None = None,
    script: str | None = None,
    metadata: dict[str, str] | None = None,
    spot_delete: bool = False,
) -> Any:
    items = dict(metadata or {})
    if script is not None:
        items["startup-script"] = script
    disk = compute_v1.AttachedDisk(
        boot=True,
        auto_delete=True,
        initialize_params=compute_v1.AttachedDiskInitializeParams(
            source_image="projects/debian-cloud/global/images/family/debian-12", disk_size_gb=20
        ),
    )
    inst = compute_v1.Instance(
        name=name,
        machine_type=f"zones/{zone}/machineTypes/{machine_type}",
        labels=labels or {"burla-cluster": "c1"},
        disks=[disk],
        network_interfaces=[compute_v1.NetworkInterface(network="global/networks/default")],
        metadata=compute_v1.Metadata(items=[compute_v1.Items(key=k, value=v) for k, v in items.items()]),
    )
    if spot_delete:
        inst.scheduling = compute_v1.Scheduling(provisioning_model="SPOT", instance_termination_action="DELETE")
    return inst


@pytest.fixture
def gce() -> Iterator[FakeCompute]:
    with FakeCompute(project=P, zones=[A, B], boot_delay=0.05, delete_delay=0.01) as fake:
        yield fake


@pytest.fixture
def clients(gce: FakeCompute) -> Clients:
    kw = gce.client_kwargs()
    return Clients(
        compute_v1.InstancesClient(**kw),
        compute_v1.ZoneOperationsClient(**kw),
        compute_v1.MachineTypesClient(**kw),
        compute_v1.ZonesClient(**kw),
        compute_v1.RegionsClient(**kw),
    )


def alive(pid: int) -> bool:
    return not _is_zombie(pid)


def test_insert_wait_get_delete(gce: FakeCompute, clients: Clients) -> None:
    op = clients.insert(labels={"burla-cluster": "c1", "burla-node-group": "g0"})
    assert op.status == compute_v1.Operation.Status.RUNNING
    assert op.operation_type == "insert" and op.target_link.endswith(f"/zones/{A}/instances/node-1")
    done = clients.wait(op)
    assert not done.error.errors
    got = clients.instances.get(project=P, zone=A, instance="node-1")
    assert got.status == "RUNNING"
    assert got.machine_type.endswith(f"/zones/{A}/machineTypes/e2-standard-2")
    assert got.labels == {"burla-cluster": "c1", "burla-node-group": "g0"}
    assert got.network_interfaces[0].network_i_p == "127.0.0.1"
    assert gce.instances()["node-1"].status == "RUNNING"

    deleting = clients.instances.delete(project=P, zone=A, instance="node-1")
    assert deleting.operation_type == "delete"
    clients.wait(deleting)
    with pytest.raises(exceptions.NotFound, match="was not found"):
        clients.instances.get(project=P, zone=A, instance="node-1")
    with pytest.raises(exceptions.NotFound):
        clients.instances.delete(project=P, zone=A, instance="node-1")
    assert gce.instances() == {}
    assert [r.api for r in gce.requests][:2] == ["instances.insert", "zoneOperations.wait"]
    assert gce.calls("instances.insert")[0].body["labels"]["burla-node-group"] == "g0"


def test_list_filter_pages_and_aggregated_list(gce: FakeCompute, clients: Clients) -> None:
    ops = [
        (clients.insert(name="a1"), A),
        (clients.insert(name="a2", labels={"burla-cluster": "other"}), A),
        (clients.insert(zone=B, name="b1"), B),
    ]
    for op, zone in ops:
        clients.wait(op, zone)

    def names(pager: Any) -> list[str]:
        return [i.name for i in pager]

    req = compute_v1.ListInstancesRequest
    assert names(clients.instances.list(project=P, zone=A)) == ["a1", "a2"]
    assert names(clients.instances.list(request=req(project=P, zone=A, filter="labels.burla-cluster=c1"))) == ["a1"]
    assert names(clients.instances.list(request=req(project=P, zone=A, filter='labels.burla-cluster = "other"'))) == [
        "a2"
    ]
    assert names(clients.instances.list(request=req(project=P, zone=A, filter="(status = RUNNING) (name != a1)"))) == [
        "a2"
    ]
    assert names(clients.instances.list(request=req(project=P, zone=A, max_results=1))) == ["a1", "a2"]
    assert [r.query.get("pageToken") for r in gce.calls("instances.list")][-2:] == [None, "1"]
    with pytest.raises(exceptions.BadRequest, match="filter"):
        list(clients.instances.list(request=req(project=P, zone=A, filter="name = a1 OR name = a2")))

    agg = compute_v1.AggregatedListInstancesRequest(project=P, filter="labels.burla-cluster=c1")
    found = {scope: [i.name for i in scoped.instances] for scope, scoped in clients.instances.aggregated_list(agg)}
    assert found == {f"zones/{A}": ["a1"], f"zones/{B}": ["b1"]}


def test_responses_parse_strictly_into_the_library_types(gce: FakeCompute, clients: Clients) -> None:
    """Every field the fake answers is one the library knows (no misspelt camelCase)."""
    op = clients.insert(script="true")
    clients.wait(op)
    gce.wait_for(lambda: gce.instance("node-1").exit_code is not None)
    base = f"{gce.endpoint}/compute/v1/projects/{P}"
    for path, kind in [
        (f"zones/{A}/instances/node-1", compute_v1.Instance),
        (f"zones/{A}/instances", compute_v1.InstanceList),
        ("aggregated/instances", compute_v1.InstanceAggregatedList),
        (f"zones/{A}/operations/{op.name}", compute_v1.Operation),
        (f"zones/{A}/operations", compute_v1.OperationList),
        (f"zones/{A}/instances/node-1/serialPort", compute_v1.SerialPortOutput),
        (f"zones/{A}/machineTypes/g2-standard-4", compute_v1.MachineType),
        (f"zones/{A}/machineTypes", compute_v1.MachineTypeList),
        ("aggregated/machineTypes", compute_v1.MachineTypeAggregatedList),
        ("zones", compute_v1.ZoneList),
        (f"zones/{A}", compute_v1.Zone),
        ("regions/us-central1", compute_v1.Region),
        ("regions", compute_v1.RegionList),
    ]:
        with urllib.request.urlopen(f"{base}/{path}") as response:
            raw = response.read()
        json_format.Parse(raw, kind.pb(kind()), ignore_unknown_fields=False)

    gce.exhaust(A)
    failed = clients.wait(clients.insert(name="node-2"))
    failed_raw = json.dumps(compute_v1.Operation.to_dict(failed))  # parsed already; check the error parts too
    assert "ZONE_RESOURCE_POOL_EXHAUSTED" in failed_raw
    with urllib.request.urlopen(f"{base}/zones/{A}/operations/{failed.name}") as response:
        json_format.Parse(response.read(), compute_v1.Operation.pb(compute_v1.Operation()), ignore_unknown_fields=False)


def test_machine_types_zones_and_regions() -> None:
    zones = {A: {}, B: {"machine_types": ["e2-standard-2"]}, "us-east1-b": {"status": "DOWN"}}
    with FakeCompute(project=P, zones=zones) as gce:
        kw = gce.client_kwargs()
        types = compute_v1.MachineTypesClient(**kw)
        a2 = types.get(project=P, zone=A, machine_type="a2-highgpu-1g")
        assert (a2.guest_cpus, a2.memory_mb) == (12, 87040)
        assert [(x.guest_accelerator_type, x.guest_accelerator_count) for x in a2.accelerators] == [
            ("nvidia-tesla-a100", 1)
        ]
        n2 = types.get(project=P, zone=A, machine_type="n2-standard-96")
        assert (n2.guest_cpus, n2.memory_mb, n2.zone) == (96, 393216, A)
        listed = {t.name: t.guest_cpus for t in types.list(project=P, zone=A)}
        assert listed["e2-standard-8"] == 8 and listed["n2-highcpu-32"] == 32 and "g2-standard-4" in listed
        assert [t.name for t in types.list(project=P, zone=B)] == ["e2-standard-2"]
        with pytest.raises(exceptions.NotFound, match="machineTypes/n2-standard-2"):
            types.get(project=P, zone=B, machine_type="n2-standard-2")
        with pytest.raises(exceptions.NotFound):
            types.get(project=P, zone=A, machine_type="e2-standard-3")
        in_b = {scope for scope, scoped in types.aggregated_list(project=P) if scoped.machine_types}
        assert in_b == {f"zones/{A}", f"zones/{B}", "zones/us-east1-b"}

        listed_zones = [
            (z.name, z.region.rsplit("/", 1)[1], z.status) for z in compute_v1.ZonesClient(**kw).list(project=P)
        ]
        assert listed_zones == [(A, "us-central1", "UP"), (B, "us-central1", "UP"), ("us-east1-b", "us-east1", "DOWN")]
        assert compute_v1.ZonesClient(**kw).get(project=P, zone=A).name == A
        with pytest.raises(exceptions.NotFound):
            compute_v1.ZonesClient(**kw).get(project=P, zone="mars-north1-a")
        regions = compute_v1.RegionsClient(**kw)
        assert [z.rsplit("/", 1)[1] for z in regions.get(project=P, region="us-central1").zones] == [A, B]
        assert [r.name for r in regions.list(project=P)] == ["us-central1", "us-east1"]


def test_insert_refusals_as_google(gce: FakeCompute, clients: Clients) -> None:
    bare = instance()
    bare.machine_type = "e2-standard-2"
    with pytest.raises(exceptions.BadRequest, match="Must be a URL"):
        clients.instances.insert(project=P, zone=A, instance_resource=bare)
    with pytest.raises(exceptions.BadRequest, match="Machine type with name 'e2-standard-3' does not exist"):
        clients.insert(machine_type="e2-standard-3")
    with pytest.raises(exceptions.BadRequest, match="Unknown zone"):
        clients.instances.insert(project=P, zone="us-central1-z", instance_resource=instance())
    with pytest.raises(exceptions.BadRequest, match="resource.name"):
        clients.insert(name="Node_1")
    with pytest.raises(exceptions.BadRequest, match="too large"):
        clients.insert(metadata={"wheel": "x" * 300_000})
    clients.wait(clients.insert())
    with pytest.raises(exceptions.Conflict, match="already exists"):
        clients.insert()
    assert list(gce.instances()) == ["node-1"]


def test_exhausted_zone_fails_the_operation_and_the_next_zone_works(gce: FakeCompute, clients: Clients) -> None:
    gce.exhaust(A)
    op = clients.wait(clients.insert())
    assert op.status == compute_v1.Operation.Status.DONE
    assert [e.code for e in op.error.errors] == ["ZONE_RESOURCE_POOL_EXHAUSTED"]
    assert "does not have enough resources" in op.error.errors[0].message
    assert op.http_error_status_code == 503
    assert gce.instances() == {}
    clients.wait(clients.insert(zone=B), B)
    assert gce.instance("node-1").zone == B

    gce.exhaust(A, machine_type="n2-standard-4")
    gce.exhaust(A, False)
    clients.wait(clients.insert(name="node-2"))
    assert not clients.wait(clients.insert(name="node-3", machine_type="e2-standard-4")).error.errors
    assert clients.wait(clients.insert(name="node-4", machine_type="n2-standard-4")).error.errors[0].code == (
        "ZONE_RESOURCE_POOL_EXHAUSTED"
    )


def test_quota_exceeded(gce: FakeCompute, clients: Clients) -> None:
    gce.quota_exceeded("CPUS", region="us-central1", limit=24)
    op = clients.wait(clients.insert())
    error = op.error.errors[0]
    assert error.code == "QUOTA_EXCEEDED"
    assert error.message == "Quota 'CPUS' exceeded.  Limit: 24.0 in region us-central1."
    assert error.error_details[0].quota_info.metric_name == "compute.googleapis.com/cpus"
    assert op.http_error_status_code == 403
    gce.quota_exceeded("CPUS", region="us-central1", exceeded=False)

    gce.set_quota("CPUS", 4)
    clients.wait(clients.insert(name="n1"))
    clients.wait(clients.insert(name="n2", zone=B), B)
    assert clients.wait(clients.insert(name="n3")).error.errors[0].message == (
        "Quota 'CPUS' exceeded.  Limit: 4.0 in region us-central1."
    )
    quotas = clients.regions.get(project=P, region="us-central1").quotas
    assert [(q.metric, q.limit, q.usage) for q in quotas] == [("CPUS", 4.0, 4.0)]
    clients.wait(clients.instances.delete(project=P, zone=A, instance="n1"))
    assert not clients.wait(clients.insert(name="n3")).error.errors


def test_permission_denied_is_forbidden(gce: FakeCompute, clients: Clients) -> None:
    gce.deny("instances.insert")
    with pytest.raises(exceptions.Forbidden, match="Required 'compute.instances.create' permission") as info:
        clients.insert()
    assert info.value.code == 403
    assert info.value.errors[0]["reason"] == "forbidden"
    # Google's ErrorInfo detail: read it from .details; .reason raises AttributeError on older google-api-core (2.33)
    assert info.value.details[0]["reason"] == "IAM_PERMISSION_DENIED"
    assert list(clients.instances.list(project=P, zone=A)) == []
    gce.deny(None)
    with pytest.raises(exceptions.Forbidden):
        clients.zones.list(project=P)
    gce.reset_faults()
    clients.wait(clients.insert())


def test_startup_script_reads_its_metadata(gce: FakeCompute, clients: Clients) -> None:
    script = """set -eu
md() { curl -sf -H 'Metadata-Flavor: Google' "http://${GCE_METADATA_HOST:-metadata.google.internal}/computeMetadata/v1/$1"; }
md instance/attributes/burla-token > token
md instance/name > name
md instance/zone > zone
md instance/hostname > hostname
md 'instance/attributes/?recursive=true' > attributes.json
curl -s -o /dev/null -w '%{http_code}' "http://$GCE_METADATA_HOST/computeMetadata/v1/instance/name" > without-header
md instance/attributes/missing || echo "missing: $?" > missing
echo "booted in $PWD"
"""
    clients.wait(clients.insert(script=script, metadata={"burla-token": "tok-123"}))
    inst = gce.wait_for(lambda: (i := gce.instance("node-1")).exit_code is not None and i)
    assert inst.exit_code == 0, gce.log("node-1")
    d = inst.dir
    assert (d / "token").read_text() == "tok-123"
    assert (d / "name").read_text() == "node-1"
    assert (d / "zone").read_text().endswith(f"/zones/{A}")
    assert (d / "hostname").read_text() == f"node-1.{A}.c.{P}.internal"
    assert json.loads((d / "attributes.json").read_text())["burla-token"] == "tok-123"
    assert (d / "without-header").read_text() == "403"
    assert (d / "missing").read_text().startswith("missing:")
    assert f"booted in {d}" in gce.log("node-1")
    serial = clients.instances.get_serial_port_output(project=P, zone=A, instance="node-1").contents
    assert f"startup-script: booted in {d}" in serial and "startup-script exit status 0" in serial


def test_fail_startup(gce: FakeCompute, clients: Clients) -> None:
    gce.fail_startup("node-1")
    clients.wait(clients.insert(script="echo should not run"))
    gce.wait_for(lambda: gce.instance("node-1").exit_code is not None)
    assert gce.instance("node-1").exit_code == 1
    assert "should not run" not in gce.log("node-1") and "fails" in gce.log("node-1")
    assert "startup-script exit status 1" in gce.serial_output("node-1")
    assert gce.instance("node-1").status == "RUNNING"  # as on GCE: a failed script does not stop the VM


SPAWNER = """echo $$ > pids
sleep 600 & echo $! >> pids
setsid sleep 600 & echo $! >> pids
(trap '' TERM HUP; exec sleep 600) & echo $! >> pids
echo started
wait
"""


def _pids(gce: FakeCompute, name: str) -> list[int]:
    gce.wait_for(lambda: "started" in gce.log(name))
    pids = [int(p) for p in (gce.instance(name).dir / "pids").read_text().split()]
    assert len(pids) == 4 and all(alive(p) for p in pids)
    return pids


def test_preempt_kills_every_process_of_the_instance(gce: FakeCompute, clients: Clients) -> None:
    clients.wait(clients.insert(script=SPAWNER))
    pids = _pids(gce, "node-1")
    gce.preempt("node-1")
    assert not any(alive(p) for p in pids)
    assert clients.instances.get(project=P, zone=A, instance="node-1").status == "TERMINATED"
    preempted = compute_v1.ListZoneOperationsRequest(
        project=P, zone=A, filter='operationType="compute.instances.preempted"'
    )
    assert [op.target_link.rsplit("/", 1)[1] for op in clients.operations.list(request=preempted)] == ["node-1"]

    clients.wait(clients.insert(name="spot", script=SPAWNER, spot_delete=True))
    pids = _pids(gce, "spot")
    gce.preempt("spot")
    assert not any(alive(p) for p in pids)
    assert "spot" not in gce.instances()


def test_delete_vanish_and_close_kill_every_process(clients: Clients, gce: FakeCompute) -> None:
    clients.wait(clients.insert(name="n1", script=SPAWNER))
    clients.wait(clients.insert(name="n2", script=SPAWNER))
    clients.wait(clients.insert(name="n3", script=SPAWNER))
    p1, p2, p3 = _pids(gce, "n1"), _pids(gce, "n2"), _pids(gce, "n3")
    clients.wait(clients.instances.delete(project=P, zone=A, instance="n1"))
    assert not any(alive(p) for p in p1) and all(alive(p) for p in p2 + p3)
    gce.vanish("n2")
    assert not any(alive(p) for p in p2) and sorted(gce.instances()) == ["n3"]
    with pytest.raises(exceptions.NotFound):
        clients.instances.get(project=P, zone=A, instance="n2")
    gce.close()
    assert not any(alive(p) for p in p3)


def test_slow_boot_and_delete_while_provisioning(gce: FakeCompute, clients: Clients) -> None:
    gce.boot_delay = 600
    op = clients.insert(script="echo ran > ran")
    assert gce.instance("node-1").status == "PROVISIONING"
    assert clients.operations.get(project=P, zone=A, operation=op.name).status == compute_v1.Operation.Status.RUNNING
    clients.wait(clients.instances.delete(project=P, zone=A, instance="node-1"))
    assert clients.wait(op).status == compute_v1.Operation.Status.DONE
    assert gce.instances() == {}


def test_filter_parser() -> None:
    resource = {"name": "n1", "status": "RUNNING", "labels": {"burla-cluster": "c1"}}
    for text, want in [
        ("labels.burla-cluster=c1", True),
        ("labels.burla-cluster = c2", False),
        ('labels.burla-cluster = "c1" AND status = RUNNING', True),
        ("(labels.burla-cluster = c1) (status != RUNNING)", False),
        ("labels.burla-cluster:*", True),
        ("labels.other:*", False),
        ("name eq n.*", True),
        ("name ne n.*", False),
    ]:
        assert _matches(resource, _parse_filter(text)) is want, text


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="network namespaces need root and `ip`")
def test_netns_instance_reaches_the_host_over_its_bridge() -> None:
    with FakeCompute(project=P, zones=[A], netns=True, boot_delay=0.05) as gce:
        kw = gce.client_kwargs()
        clients = Clients(compute_v1.InstancesClient(**kw), compute_v1.ZoneOperationsClient(**kw), None, None, None)
        with socket.create_server((gce.host_ip, 0)) as server:
            port = server.getsockname()[1]
            script = f"""set -eu
curl -sf -H 'Metadata-Flavor: Google' "http://$GCE_METADATA_HOST/computeMetadata/v1/instance/attributes/burla-token" > token
echo "hello from $(cat token)" > /dev/tcp/{gce.host_ip}/{port}
if echo nope > /dev/tcp/127.0.0.1/{port}; then echo "loopback reached the host"; else echo "no loopback shortcut"; fi
sleep 600
"""
            clients.wait(clients.insert(script=script, metadata={"burla-token": "t1"}))
            inst = gce.instance("node-1")
            assert inst.ip.startswith(gce.host_ip.rsplit(".", 1)[0] + ".") and inst.ip != gce.host_ip
            server.settimeout(30)
            conn, (peer, _) = server.accept()
            with conn:
                assert conn.makefile().readline() == "hello from t1\n"
            assert peer == inst.ip
            gce.wait_for(lambda: "no loopback shortcut" in gce.log("node-1"))
            ns = gce.instance("node-1").resource  # still RUNNING: its namespace exists
            assert ns["status"] == "RUNNING"
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert f"brl-{gce._net.suffix}" not in names + links if gce._net else True
    assert not Path(f"/run/fake-compute/{gce._net.suffix}").exists() if gce._net else True


def test_netns_without_root_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NetnsUnavailable, match="needs root"):
        FakeCompute(netns=True)


CRASHING = """
import json, os, signal, urllib.request
from tests.fake_compute import FakeCompute
gce = FakeCompute(project="p", zones=["us-central1-a"], netns=True, boot_delay=0)
body = {"name": "n1", "machineType": "zones/us-central1-a/machineTypes/e2-standard-2", "disks": [{"boot": True}],
        "metadata": {"items": [{"key": "startup-script", "value": "sleep 600"}]}}
url = f"{gce.endpoint}/compute/v1/projects/p/zones/us-central1-a/instances"
urllib.request.urlopen(urllib.request.Request(url, json.dumps(body).encode())).read()
print(gce._net.suffix, gce.wait_for(lambda: gce.instance("n1").pid), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="network namespaces need root and `ip`")
def test_netns_leftovers_of_a_killed_test_process_are_removed_by_the_next_fake() -> None:
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", CRASHING], cwd=root, capture_output=True, text=True, timeout=60)
    suffix, pid = run.stdout.split()
    assert f"brl-{suffix}-" in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    with FakeCompute(netns=True):
        assert f"brl-{suffix}" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not alive(int(pid))
