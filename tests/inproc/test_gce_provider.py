"""daemon/gce.py with the real google-cloud-compute client, against the fake Compute Engine (tests/fake_compute.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from burla.common.config import NodeGroupConfig
from burla.daemon.gce import CLUSTER_LABEL, GROUP_LABEL, GceProvider
from burla.daemon.providers import Boot, ProviderError
from tests.fake_compute import FakeCompute

pytest.importorskip("google.cloud.compute_v1")
ZONES = ["us-central1-a", "us-central1-b", "us-central1-c"]
BOOT = Boot("http://10.0.0.1:8080", "burla_instance_token", "0.1.0")


@pytest.fixture
def gce() -> Iterator[FakeCompute]:
    with FakeCompute(project="proj", zones=ZONES, boot_delay=0.05, startup_delay=3600) as fake:
        yield fake  # startup scripts never run here: these tests are about the API calls


def provider(gce: FakeCompute, zones: list[str] | None = None) -> GceProvider:
    return GceProvider("proj", "us-central1", zones if zones is not None else ZONES, "test", endpoint=gce.endpoint)


async def test_a_node_is_an_instance_with_the_clusters_labels_and_its_boot_metadata(gce: FakeCompute) -> None:
    p = provider(gce)
    group = NodeGroupConfig(machine_type="n2-standard-4", disk_gb=20, spot=True)
    assert await p.machine(group) == (4, 16 * 1024**3)
    made = await p.create("burla-test-1", 0, group, BOOT)
    assert (made.name, made.zone) == ("burla-test-1", "us-central1-a")
    inst = gce.instance("burla-test-1")
    assert inst.labels == {CLUSTER_LABEL: "test", GROUP_LABEL: "0"}
    assert inst.metadata["burla-url"] == BOOT.url and inst.metadata["burla-token"] == BOOT.token
    assert inst.metadata["burla-instance"] == "burla-test-1" and inst.metadata["burla-version"] == "0.1.0"
    assert inst.metadata["startup-script"].startswith("#!/bin/bash")
    assert inst.machine_type == "n2-standard-4"
    assert inst.resource["scheduling"]["provisioningModel"] == "SPOT"
    listed = await p.list()
    assert [(i.name, i.group, i.zone) for i in listed] == [("burla-test-1", 0, "us-central1-a")]
    await p.delete("burla-test-1")
    gce.wait_for(lambda: "burla-test-1" not in gce.instances())
    assert await p.list() == []
    await p.delete("burla-test-1")  # gone already: fine
    await p.aclose()


async def test_instances_of_another_cluster_are_not_listed(gce: FakeCompute) -> None:
    mine, theirs = provider(gce), GceProvider("proj", "us-central1", ZONES, "other", endpoint=gce.endpoint)
    await theirs.create("other-1", 0, NodeGroupConfig(machine_type="e2-standard-2"), BOOT)
    assert await mine.list() == []
    assert [i.name for i in await theirs.list()] == ["other-1"]


async def test_an_exhausted_zone_is_skipped_for_the_next(gce: FakeCompute) -> None:
    gce.exhaust("us-central1-a")
    made = await provider(gce).create("burla-test-2", 1, NodeGroupConfig(machine_type="e2-standard-2"), BOOT)
    assert made.zone == "us-central1-b"


async def test_every_zone_exhausted_names_the_zones_tried(gce: FakeCompute) -> None:
    for zone in ZONES:
        gce.exhaust(zone)
    with pytest.raises(ProviderError) as info:
        await provider(gce).create("burla-test-3", 0, NodeGroupConfig(machine_type="e2-standard-2"), BOOT)
    assert info.value.zones == tuple(ZONES)
    assert "e2-standard-2" in str(info.value) and "us-central1-c: ZONE_RESOURCE_POOL_EXHAUSTED" in str(info.value)


async def test_quota_exceeded_fails_at_once_with_googles_reason(gce: FakeCompute) -> None:
    gce.quota_exceeded("CPUS", region="us-central1", limit=24.0)
    with pytest.raises(ProviderError) as info:
        await provider(gce).create("burla-test-4", 0, NodeGroupConfig(machine_type="n2-standard-32"), BOOT)
    assert info.value.reason == "QUOTA_EXCEEDED" and info.value.zones == ("us-central1-a",)
    assert "n2-standard-32" in str(info.value) and "Quota 'CPUS' exceeded" in str(info.value)


async def test_permission_denied_fails_at_once(gce: FakeCompute) -> None:
    gce.deny("instances.insert")
    with pytest.raises(ProviderError) as info:
        await provider(gce).create("burla-test-5", 0, NodeGroupConfig(machine_type="e2-standard-2"), BOOT)
    assert "403" in str(info.value) or "forbidden" in str(info.value).lower()
    assert info.value.zones == ("us-central1-a",)


async def test_a_machine_type_no_zone_has_is_named(gce: FakeCompute) -> None:
    p = provider(gce)
    with pytest.raises(ProviderError, match="machine type n9-imaginary-8 exists in none of the zones tried"):
        await p.machine(NodeGroupConfig(machine_type="n9-imaginary-8"))
    with pytest.raises(ProviderError) as info:
        await p.create("burla-test-6", 0, NodeGroupConfig(machine_type="n9-imaginary-8"), BOOT)
    assert info.value.zones == tuple(ZONES)


async def test_the_regions_zones_are_found_when_none_are_configured(gce: FakeCompute) -> None:
    p = provider(gce, zones=[])
    assert await p.zones() == sorted(ZONES)


def test_a_provider_without_a_project_or_region_says_what_to_set() -> None:
    with pytest.raises(ProviderError, match="needs project"):
        GceProvider("", "us-central1", [], "c")
    with pytest.raises(ProviderError, match="needs region"):
        GceProvider("p", "", [], "c")
