"""`Client`: a connection to one Burla cluster, and the map that runs on it.

`remote_parallel_map` is ``Client.default(api_key).map(...)``, as httpx's
top-level `request()` is a one-shot `Client`. A client keeps its portal
thread, HTTP connections and the cluster's limits between calls, so a second
map on a warm cluster costs a few round trips and nothing more.

Imports go one way: `_api` -> `_client` -> `_job` -> `_events` -> `_responses`, `_portal`.
The network stack (httpx, trio, `_job`) is imported inside the methods that use it, so that
`import burla` stays cheap.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from . import _local, _settings
from ._responses import RECONNECT_SECONDS, request
from .errors import ClusterUnavailableError, InvalidArgumentError, VersionMismatchError

if TYPE_CHECKING:
    import httpx

_DEFAULT_LOCK = threading.Lock()
_DEFAULTS: dict[tuple[str | None, str | None, str | None], Client] = {}


def check_version(info: dict[str, Any], url: str) -> None:
    """Refuse a cluster whose `/v1/info` states another Burla version and protocol than this process's."""
    from burla.common import version as _version
    from burla.schemas.messages import compatible

    theirs, their_protocol = str(info.get("version") or "(unknown)"), int(info.get("protocol") or 0)
    ours, our_protocol = _version.version(), _version.protocol()
    if not compatible(ours, our_protocol, theirs, their_protocol):
        raise VersionMismatchError(
            f"the Burla cluster at {url} runs Burla {theirs} (protocol {their_protocol}) and this process Burla "
            f"{ours} (protocol {our_protocol}): they are not promised to work together, so nothing was sent. "
            f"Install burla=={theirs} here, or upgrade the cluster's burlad and node agents to burla=={ours}."
        )


class Client:
    """A connection to a Burla cluster.

    With no URL (and none in ``BURLA_CLUSTER_URL`` or from `burla login`),
    the client uses the embedded local cluster, started on first use.
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, ca_file: str | None = None) -> None:
        """`ca_file`: a PEM CA that signed an https cluster's certificate (default: ``BURLA_CA_FILE``)."""
        self.settings = _settings.resolve(url, api_key, ca_file)
        self._lock = threading.Lock()
        self._portal: Any = None
        self._http: Any = None
        self._events: Any = None
        self._known_blobs: set[str] = set()  # blobs this cluster has (uploaded, or known to be there)
        self._url = self.settings.url or ""
        self._key = self.settings.api_key or ""
        self.limits: dict[str, Any] = {}
        self._starting: Any = None  # the local cluster `_start_local` began, for `connect` to wait on

    @classmethod
    def default(cls, api_key: str | None = None) -> Client:
        settings = _settings.resolve(None, api_key)
        key = (settings.url, settings.api_key, settings.ca_file)
        with _DEFAULT_LOCK:
            client = _DEFAULTS.get(key)
            if client is None:
                client = _DEFAULTS[key] = cls(settings.url, settings.api_key, settings.ca_file)
                atexit.register(client.close)  # sends the last job's ack, so the daemon forgets it now
            return client

    # ---- connection ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._url

    def connect(self) -> None:
        """Reach the cluster (starting the local one if need be) and learn its limits."""
        with self._lock:
            reopen = self._http is None
            starting, self._starting = self._starting, None
            if starting is not None and starting.poll() is not None:
                starting = None  # begun by a map that failed before it connected, and gone since: start afresh
            if starting is None and self.settings.embedded and _local.discover() is None:
                starting = _local.start()  # boots while this process imports its network stack below
            if self._start_portal():
                reopen = True
            if self.settings.embedded:
                info = _local.ensure_started(starting=starting)  # of this Burla version, or one it can use
                if info["url"] != self._url:  # first use, or the local cluster was restarted
                    self._url, self._key = info["url"], info["admin_token"]
                    self.limits = {}
                    self._known_blobs.clear()
                    reopen = True
            if reopen:
                self._portal.run(self._open)
            if not self.limits:
                try:
                    limits = self._portal.run(self._info)
                except ClusterUnavailableError:
                    if not self.settings.embedded:
                        raise
                    info = _local.ensure_started()  # the local cluster went idle and stopped: start it again
                    self._url, self._key = info["url"], info["admin_token"]
                    self._portal.run(self._open)
                    limits = self._portal.run(self._info)
                if not self.settings.embedded:  # the local cluster's version was checked as it was found
                    check_version(limits, self._url)
                self.limits = limits

    def _start_local(self) -> None:
        """Begin starting the local cluster if this client needs it and none runs; `connect` waits for it.

        Called first thing in `map`, so that it boots while this process imports its network stack,
        pickles the function and describes its environment.
        """
        if self.settings.embedded and self._starting is None and not self.limits and _local.discover() is None:
            with self._lock:
                self._starting = _local.start()

    def request(self, method: str, path: str, what: str, check: bool = True, **kwargs: Any) -> httpx.Response:
        """Send one request to the cluster at this client's URL and return the daemon's answer.

        The `burla` commands' way in: no limits read, no version check, no local cluster started.
        An unreachable cluster raises ClusterUnavailableError; with `check`, an answer other than
        200 raises the BurlaError it means, `what` completing "the cluster answered 500 to ...".
        `kwargs` go to httpx (json=, timeout=).
        """
        with self._lock:
            if self._start_portal() or self._http is None:
                self._portal.run(self._open)

        async def send() -> httpx.Response:
            return await request(self._http, self._url, method, path, what, check=check, **kwargs)

        answer: httpx.Response = self._portal.run(send)
        return answer

    def _start_portal(self) -> bool:
        """Start the portal thread unless it runs (with the lock held); whether it was (re)started."""
        if self._portal is not None and self._portal.alive():
            return False
        from ._portal import Portal

        self._portal = Portal()
        self._http = self._events = None
        return True

    async def _open(self) -> None:
        import httpx

        from burla.common import tls
        from burla.common.http import async_client

        from ._events import EventStream

        if self._events is not None:
            self._events.close()
        if self._http is not None:
            await self._http.aclose()
        self._http = async_client(
            self._url,
            {"authorization": f"Bearer {self._key}", "user-agent": "burla-client"},
            httpx.Timeout(120.0, connect=10.0),
            httpx.Limits(max_connections=32, max_keepalive_connections=16),
            verify=tls.client_context(
                self.settings.ca_file or "", "the CA file (BURLA_CA_FILE or `burla login --ca-file`)"
            )
            if self._url.startswith("https://")
            else None,
        )
        self._events = EventStream(self._http, self._portal.nursery, RECONNECT_SECONDS)

    async def _info(self) -> dict[str, Any]:
        r = await request(self._http, self._url, "GET", "/v1/info", "read the cluster's limits")
        return dict(r.json())

    def _snapshot(self, function_: Any, exclude: Iterable[str] | None, requirements: Iterable[str] | None) -> Any:
        """This environment, as the workers should replicate it (None: replication is off)."""
        from burla.common.config import Config

        settings = Config.load().client  # a bad burla.toml raises burla.errors.ConfigError, naming the key
        if not settings.replicate_environment:
            return None
        from ._environment import snapshot

        return snapshot(
            function_,
            exclude=[*settings.exclude_packages, *(exclude or ())],
            requirements=[*settings.requirements, *(requirements or ())],
        )

    async def _upload_environment(self, snapshot: Any) -> None:
        """Send the manifest and the blobs it names that the cluster does not have yet."""
        blobs: dict[str, Any] = {snapshot.digest: snapshot.manifest.canonical(), **snapshot.blobs}
        unknown = [d for d in blobs if d not in self._known_blobs]
        if not unknown:
            return
        missing = await self._missing(unknown)
        for digest in missing:
            data = blobs[digest]
            await self._put_blob(digest, data() if callable(data) else data)
        self._known_blobs.update(unknown)

    async def _missing(self, digests: list[str]) -> list[str]:
        r = await request(
            self._http, self._url, "POST", "/v1/blobs/missing", "check what the cluster has", json={"digests": digests}
        )
        return list(r.json()["missing"])

    async def _put_blob(self, digest: str, data: bytes) -> None:
        await request(
            self._http, self._url, "PUT", f"/v1/blobs/{digest}", "upload the environment",
            content=data, headers={"content-type": "application/octet-stream"},
        )  # fmt: skip

    async def _upload_build(self, context: Any) -> None:
        """Send a dockerfile= build context, unless the cluster has it already (same digest)."""

        if await self._missing([context.digest]):
            await self._put_blob(context.digest, context.tarball)

    def _local_payloads(self) -> tuple[str, str, int] | None:
        """The daemon's payload dir, its proof and inline limit, if this process can write there."""
        from burla.common import local

        info = self.limits.get("payloads") or {}
        proof = local.read_probe(info.get("dir", ""), info.get("host", ""))
        return (info["dir"], proof, int(info.get("inline_limit", 0))) if proof else None

    def close(self) -> None:
        with self._lock:
            if self._portal is not None:
                if self._http is not None:
                    import httpx
                    import trio

                    try:
                        if self._events is not None:  # a finished job's ack may still wait for a next job
                            self._portal.run(self._events.flush_acks)
                        self._portal.run(self._http.aclose)
                    except (trio.RunFinishedError, httpx.HTTPError, OSError):
                        pass  # the loop or the connection is gone already: nothing left to close
                self._portal.close()
            self._portal = None
            self._http = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the map ---------------------------------------------------------------------

    def map(
        self,
        function_: Callable[[Any], Any],
        inputs: Iterable[Any],
        func_cpu: float = 1,
        func_ram: float = 4,
        max_parallelism: int | None = None,
        spinner: bool = True,
        generator: bool = False,
        image: str | None = None,
        dockerfile: str | os.PathLike[str] | None = None,
        exclude_packages: Iterable[str] | None = None,
        requirements: Iterable[str] | None = None,
        grow: bool = False,
        timeout: float | None = None,
        retries: int = 0,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] | None = None,
        retry_delay: float = 1.0,
        return_exceptions: bool = False,
        detach: bool = False,
    ) -> Any:
        """Call `function_` on every input at once on the cluster. See `remote_parallel_map`."""
        from burla.common.trace import trace

        trace("client", "map")
        _check_resources(func_cpu, func_ram, max_parallelism)
        failures = _check_failures(timeout, retries, retry_on, retry_delay, return_exceptions)
        if not isinstance(grow, bool):
            raise InvalidArgumentError(f"grow must be True or False, got {grow!r}")
        if not isinstance(detach, bool):
            raise InvalidArgumentError(f"detach must be True or False, got {detach!r}")
        if detach and generator:
            raise InvalidArgumentError(
                "pass detach=True or generator=True, not both: a detached call returns a burla.Job, whose "
                "as_completed() yields the results as they arrive"
            )
        if image is not None and dockerfile is not None:
            raise InvalidArgumentError("pass image= or dockerfile=, not both")
        if image is not None and (not isinstance(image, str) or not image.strip()):
            raise InvalidArgumentError(f"image must be an image name like 'python:3.11-slim', got {image!r}")
        self._start_local()  # before the imports, the pickling and the snapshot below: it boots meanwhile

        from burla.common import version as _version
        from burla.schemas import messages as m

        from ._job import JobRun, ResultIterator, collect
        from ._pickling import InputBatcher, function_hash, function_name, pickle_function

        context = None
        if dockerfile is not None:
            from ._build_context import pack_build_context

            context = pack_build_context(dockerfile)  # checks the Dockerfile before anything starts
        blob = pickle_function(function_, self.limits.get("max_function_bytes"))
        environment = self._snapshot(function_, exclude_packages, requirements)
        batcher = InputBatcher(inputs, self.limits.get("max_input_bytes"))
        first = batcher.next_batch()
        if first is None and detach:
            raise InvalidArgumentError("detach=True needs at least one input: inputs is empty, so there is no job")
        if first is None:
            return iter(()) if generator else []
        self.connect()
        if self.limits.get("max_function_bytes") and len(blob) > self.limits["max_function_bytes"]:
            pickle_function(function_, self.limits["max_function_bytes"])  # raises with the full message
        env_digest = ""
        if environment is not None:
            if not self._known_blobs.issuperset([environment.digest, *environment.blobs]):
                self._portal.run(self._upload_environment, environment)
            env_digest = environment.digest
        build = ""
        if context is not None:
            limit = self.limits.get("max_build_context_bytes")
            if limit and context.size > limit:
                pack_build_context(dockerfile, max_bytes=limit)  # type: ignore[arg-type]  # raises, naming the big files
            self._portal.run(self._upload_build, context)
            build = context.digest
            image = f"localhost/burla-build:{context.digest[:16]}"
        batcher.max_input_bytes = self.limits.get("max_input_bytes")
        if batcher.max_input_bytes and len(first[1]) > batcher.max_input_bytes:
            batcher.check_sizes(first)  # the first batch was pickled before the limits were known
        spec = m.JobSpec(
            job_id=uuid.uuid4().hex,
            function_name=function_name(function_),
            function_hash=function_hash(blob),
            python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
            func_cpu=float(func_cpu),
            func_ram=float(func_ram),
            max_parallelism=max_parallelism,
            client_version=_version.version(),
            image=image or "",
            build=build,
            env=env_digest,
            grow=grow,
            **failures,
            detach=detach,
        )
        job = JobRun(
            self._portal, self._http, self._events, spec, blob, first, batcher, spinner, self._local_payloads()
        )
        job.return_exceptions = return_exceptions
        trace("client", "map start")
        job.start()
        if detach:
            return self._detached(job, spinner)
        if generator:
            return ResultIterator(job)
        return collect(job)

    def _detached(self, run: Any, spinner: bool) -> Any:
        """Wait until every input of a detached job is uploaded, then hand back its `burla.Job`.

        Until then nothing was promised: Ctrl-C (or an error uploading) cancels the job.
        """
        from ._handle import Job
        from ._job import _finish

        try:
            while True:
                item = run.get()
                if item[0] == "uploaded":
                    break
                raise item[1]
        except KeyboardInterrupt:
            run.cancel("cancelled by Ctrl-C while its inputs were uploading (detach=True)")
            raise
        finally:
            _finish(run)
        if spinner:
            print(f"burla: job {run.job_id} runs detached. Reattach with burla.job({run.job_id!r}), or "
                  f"`burla jobs show {run.job_id}`", file=sys.stderr, flush=True)  # fmt: skip
        return Job(self, run.job_id)


def _check_resources(func_cpu: Any, func_ram: Any, max_parallelism: Any) -> None:
    for name, value in (("func_cpu", func_cpu), ("func_ram", func_ram)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise InvalidArgumentError(f"{name} must be a positive number, got {value!r}")
    if max_parallelism is not None and (
        isinstance(max_parallelism, bool) or not isinstance(max_parallelism, int) or max_parallelism < 1
    ):
        raise InvalidArgumentError(f"max_parallelism must be a positive integer or None, got {max_parallelism!r}")


def _check_failures(
    timeout: Any, retries: Any, retry_on: Any, retry_delay: Any, return_exceptions: Any
) -> dict[str, Any]:
    """The JobSpec fields of timeout=, retries=, retry_on=, retry_delay= and return_exceptions=, checked."""
    import math

    from burla.schemas import messages as m

    def number(value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)

    if timeout is not None and not (number(timeout) and 0.001 <= timeout <= m.MAX_TIMEOUT):
        raise InvalidArgumentError(
            f"timeout must be None or a number of seconds from 0.001 to {m.MAX_TIMEOUT:.0f} (a year), got {timeout!r}"
        )
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= m.MAX_RETRIES:
        raise InvalidArgumentError(f"retries must be a whole number from 0 to {m.MAX_RETRIES}, got {retries!r}")
    if not (number(retry_delay) and 0 <= retry_delay <= m.MAX_RETRY_DELAY):
        raise InvalidArgumentError(
            f"retry_delay must be a number of seconds from 0 to {m.MAX_RETRY_DELAY:g}, got {retry_delay!r}"
        )
    classes = (retry_on,) if isinstance(retry_on, type) else retry_on
    if classes is None:
        classes = ()
    if (
        not isinstance(classes, tuple)
        or not all(isinstance(c, type) and issubclass(c, BaseException) for c in classes)
        or len(classes) > m.MAX_RETRY_ON
    ):
        raise InvalidArgumentError(
            "retry_on must be an exception class or a tuple of them (as in an except clause), "
            f"at most {m.MAX_RETRY_ON}, got {retry_on!r}"
        )
    if classes and not retries:
        raise InvalidArgumentError("retry_on= says which failures to retry: pass retries= too (how many times)")
    if not isinstance(return_exceptions, bool):
        raise InvalidArgumentError(f"return_exceptions must be True or False, got {return_exceptions!r}")
    names = tuple(f"{c.__module__}.{c.__qualname__}" for c in classes)
    if any(len(name) > m.TYPE_NAME for name in names):
        raise InvalidArgumentError(f"retry_on: a class name is over {m.TYPE_NAME} characters")
    return {
        "timeout": None if timeout is None else float(timeout),
        "retries": retries,
        "retry_on": names,
        "retry_delay": float(retry_delay),
        "return_exceptions": return_exceptions,
    }
