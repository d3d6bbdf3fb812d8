"""Nodes on Google Compute Engine, with the real `google-cloud-compute` client (REST transport).

Each node is one instance labelled `burla-cluster=<cluster name>` and `burla-group=<group index>`, so
a restarted daemon finds and adopts its own instances (`list`). Its metadata carries the daemon's
URL, a token valid for this one instance, the Burla version, and a startup script (`startup_script`)
that installs that version from the daemon and runs `burlad agent` as a service.

The client library is synchronous: every call runs in a worker thread, a few at a time, so creating
many nodes at once never blocks the daemon's event loop. Creating a node tries the zones in order:
one without capacity (ZONE_RESOURCE_POOL_EXHAUSTED and the like) or that lacks the machine type is
skipped for the next; a refusal that another zone cannot fix (quota, permission) fails at once with
`ProviderError`, naming the machine type, the zones tried and Google's reason.

`endpoint` points the clients elsewhere than Google (the tests' fake Compute Engine server); with
it and no credentials, anonymous credentials are used.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import trio

from burla.common.config import NodeGroupConfig

from .boot_script import startup_script
from .providers import Boot, Instance, ProviderError

log = logging.getLogger("burla.daemon")
T = TypeVar("T")

CLUSTER_LABEL = "burla-cluster"
GROUP_LABEL = "burla-group"
# Answers of a zone that another zone may not give: try the next one.
NEXT_ZONE = {
    "ZONE_RESOURCE_POOL_EXHAUSTED",
    "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
    "RESOURCE_POOL_EXHAUSTED",
    "UNSUPPORTED_OPERATION",
    "RESOURCE_NOT_FOUND",  # the machine type or accelerator is not offered in this zone
    "NOT_FOUND",
    "ZONE_UNAVAILABLE",
    "SERVICE_UNAVAILABLE",
}
_THREADS = trio.CapacityLimiter(16)


class GceProvider:
    name = "gce"

    def __init__(
        self,
        project: str,
        region: str,
        zones: Sequence[str],
        cluster: str,
        network: str = "default",
        service_account: str = "",
        endpoint: str = "",
        credentials: Any = None,
    ) -> None:
        from google.api_core.client_options import ClientOptions
        from google.cloud import compute_v1

        if not project:
            raise ProviderError('[cluster] provider = "gce" needs project = "your-project-id"')
        if not region and not zones:
            raise ProviderError('[cluster] provider = "gce" needs region = "us-central1" (or zones = [...])')
        if credentials is None and endpoint:
            from google.auth.credentials import AnonymousCredentials

            credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
        options = ClientOptions(api_endpoint=endpoint) if endpoint else None
        kwargs: dict[str, Any] = {"credentials": credentials, "transport": "rest", "client_options": options}
        self.compute = compute_v1
        self.instances = compute_v1.InstancesClient(**kwargs)
        # Built ourselves: the one `insert(...).result()` builds does not keep these client options.
        self.operations = compute_v1.ZoneOperationsClient(**kwargs)
        self.machine_types = compute_v1.MachineTypesClient(**kwargs)
        self.zones_client = compute_v1.ZonesClient(**kwargs)
        self.project, self.region, self.cluster = project, region, cluster
        self.network, self.service_account = network, service_account
        self._zones = list(zones)
        self._where: dict[str, str] = {}  # instance -> zone
        self._machines: dict[str, tuple[int, int]] = {}
        self._offers: dict[tuple[str, str], bool] = {}

    def use_zones(self, zones: Sequence[str]) -> None:
        """The zones to try from now on (empty: the region's)."""
        self._zones = list(zones)

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=_THREADS)

    async def zones(self) -> list[str]:
        """The zones to try, in order: the configured ones, else the region's zones that are UP."""
        if not self._zones:
            found = await self._call(lambda: list(self.zones_client.list(project=self.project)))
            self._zones = sorted(
                z.name for z in found if z.region.rsplit("/", 1)[-1] == self.region and z.status in ("UP", "")
            )
            if not self._zones:
                raise ProviderError(f"the project {self.project} has no zone in region {self.region} that is UP")
        return self._zones

    async def _offered(self, zone: str, group: NodeGroupConfig) -> bool:
        """Whether `zone` offers the group's machine type (cached); its size is kept on the way."""
        key = (zone, group.machine_type)
        if key not in self._offers:
            from google.api_core import exceptions

            try:
                mt = await self._call(
                    self.machine_types.get, project=self.project, zone=zone, machine_type=group.machine_type
                )
            except exceptions.NotFound:
                self._offers[key] = False
            except exceptions.GoogleAPICallError as e:
                raise _refused(group, [zone], e) from None
            else:
                self._offers[key] = True
                self._machines[group.machine_type] = (int(mt.guest_cpus), int(mt.memory_mb) * 1024 * 1024)
        return self._offers[key]

    async def machine(self, group: NodeGroupConfig) -> tuple[int, int]:
        if group.machine_type not in self._machines:
            zones = await self.zones()
            for zone in zones:
                if await self._offered(zone, group):
                    break
            else:
                raise _not_offered(group, zones)
        return self._machines[group.machine_type]

    def _instance(self, name: str, zone: str, group_index: int, group: NodeGroupConfig, boot: Boot) -> Any:
        c = self.compute
        disk = c.AttachedDisk(
            boot=True,
            auto_delete=True,
            initialize_params=c.AttachedDiskInitializeParams(source_image=group.image, disk_size_gb=group.disk_gb),
        )
        network = self.network if "/" in self.network else f"global/networks/{self.network}"
        nic = c.NetworkInterface(
            network=network, access_configs=[c.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")]
        )
        items = {
            "startup-script": startup_script(),
            "burla-url": boot.url,
            "burla-token": boot.token,
            "burla-version": boot.version,
            "burla-instance": name,
            "burla-pip-args": boot.pip_args,
            "burla-ca": boot.ca_pem,  # the CA of an https burla-url ("": the system's trust)
        }
        instance = c.Instance(
            name=name,
            machine_type=f"zones/{zone}/machineTypes/{group.machine_type}",
            disks=[disk],
            network_interfaces=[nic],
            metadata=c.Metadata(items=[c.Items(key=k, value=v) for k, v in items.items()]),
            labels={CLUSTER_LABEL: self.cluster, GROUP_LABEL: str(group_index)},
            service_accounts=[
                c.ServiceAccount(
                    email=self.service_account or "default", scopes=["https://www.googleapis.com/auth/cloud-platform"]
                )
            ],
        )
        if group.spot:
            instance.scheduling = c.Scheduling(
                provisioning_model="SPOT", instance_termination_action="DELETE", automatic_restart=False
            )
        if group.accelerator_type and group.accelerator_count:
            instance.guest_accelerators = [
                c.AcceleratorConfig(
                    accelerator_type=f"zones/{zone}/acceleratorTypes/{group.accelerator_type}",
                    accelerator_count=group.accelerator_count,
                )
            ]
            instance.scheduling = instance.scheduling or c.Scheduling()
            instance.scheduling.on_host_maintenance = "TERMINATE"  # GPUs cannot live-migrate
        return instance

    async def create(self, name: str, group_index: int, group: NodeGroupConfig, boot: Boot) -> Instance:
        from google.api_core import exceptions

        tried: list[str] = []
        skipped: list[str] = []
        zones = await self.zones()
        for zone in zones:
            if not await self._offered(zone, group):
                continue
            tried.append(zone)
            body = self._instance(name, zone, group_index, group, boot)
            try:
                op = await self._call(
                    self.instances.insert_unary, project=self.project, zone=zone, instance_resource=body
                )
            except exceptions.GoogleAPICallError as e:
                reason = _reason(e)
                if reason in NEXT_ZONE or isinstance(e, exceptions.ServiceUnavailable):
                    skipped.append(f"{zone}: {reason or type(e).__name__}: {getattr(e, 'message', e)}")
                    continue
                raise _refused(group, tried, e) from None
            # Accepted: the instance exists in this zone now. A hiccup while waiting is no reason to make
            # another of the same name elsewhere: wait again, a few times.
            for attempt in range(5):
                try:
                    op = await self._wait(zone, op)
                    break
                except (exceptions.ServiceUnavailable, exceptions.InternalServerError, exceptions.TooManyRequests):
                    if attempt == 4:
                        raise
                    await trio.sleep(2.0 * (attempt + 1))
            errors = list(op.error.errors) if op.error and op.error.errors else []
            if errors:
                code, message = errors[0].code, errors[0].message
                if code in NEXT_ZONE:
                    log.info("zone %s cannot take %s now (%s): trying the next zone", zone, group.machine_type, code)
                    skipped.append(f"{zone}: {code}")
                    continue
                raise ProviderError(
                    f"Compute Engine refused a {group.machine_type} node in {zone}: {code}: {message}",
                    code,
                    tuple(tried),
                )
            self._where[name] = zone
            return Instance(name, group_index, zone, status="PROVISIONING")
        if not tried:
            raise _not_offered(group, zones)
        raise ProviderError(
            f"no zone could start a {group.machine_type} node: " + "; ".join(skipped),
            "ZONE_RESOURCE_POOL_EXHAUSTED",
            tuple(tried),
        )

    async def _wait(self, zone: str, op: Any) -> Any:
        """The operation, once DONE (the wait call returns after at most about 2 minutes: ask again)."""
        for _ in range(30):
            if str(op.status) in ("DONE", "Status.DONE") or getattr(op.status, "name", "") == "DONE":
                return op
            op = await self._call(self.operations.wait, project=self.project, zone=zone, operation=op.name)
        raise ProviderError(f"the operation {op.name} in {zone} did not finish within an hour", "TIMEOUT", (zone,))

    async def delete(self, name: str) -> None:
        from google.api_core import exceptions

        zone = self._where.get(name)
        if zone is None:
            zone = next((i.zone for i in await self.list() if i.name == name), None)
            if zone is None:
                return  # gone already
        try:
            op = await self._call(self.instances.delete_unary, project=self.project, zone=zone, instance=name)
            await self._wait(zone, op)
        except exceptions.NotFound:
            pass
        self._where.pop(name, None)

    async def list(self) -> list[Instance]:
        request = self.compute.AggregatedListInstancesRequest(
            project=self.project, filter=f"labels.{CLUSTER_LABEL}={self.cluster}"
        )

        def fetch() -> list[Instance]:
            found = []
            for scope, listed in self.instances.aggregated_list(request=request):
                zone = scope.rsplit("/", 1)[-1]
                for i in listed.instances:
                    if i.labels.get(CLUSTER_LABEL) != self.cluster:
                        continue
                    try:
                        group = int(i.labels.get(GROUP_LABEL, "-1"))
                    except ValueError:
                        group = -1
                    found.append(Instance(i.name, group, zone, str(i.status), i.status_message))
            return found

        instances = await self._call(fetch)
        for i in instances:
            self._where[i.name] = i.zone
        return instances

    async def aclose(self) -> None:
        for client in (self.instances, self.operations, self.machine_types, self.zones_client):
            transport = getattr(client, "transport", None)
            if transport is not None:
                await self._call(transport.close)


def _reason(error: Any) -> str:
    """Google's reason code of a refused request ("QUOTA_EXCEEDED", "forbidden", ...).

    From `errors` and `details`, never `error.reason`: google-api-core 2.33 raises AttributeError
    there when the error carries Google's ErrorInfo detail.
    """
    for detail in [*(getattr(error, "errors", None) or []), *(getattr(error, "details", None) or [])]:
        if isinstance(detail, dict) and detail.get("reason"):
            return str(detail["reason"])
    return ""


def _not_offered(group: NodeGroupConfig, zones: Sequence[str]) -> ProviderError:
    return ProviderError(
        f"machine type {group.machine_type} exists in none of the zones tried ({', '.join(zones)})",
        "MACHINE_TYPE_NOT_FOUND",
        tuple(zones),
    )


def _refused(group: NodeGroupConfig, zones: Sequence[str], error: Any) -> ProviderError:
    code = getattr(error, "code", "")
    reason = _reason(error) or (str(code) if code else type(error).__name__)
    message = getattr(error, "message", "") or str(error)
    return ProviderError(
        f"Compute Engine refused a {group.machine_type} node (zones tried: {', '.join(zones)}): {reason}: {message}",
        reason,
        tuple(zones),
    )
