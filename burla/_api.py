"""`remote_parallel_map`, the one function of Burla."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._client import Client

if TYPE_CHECKING:
    from ._handle import Job


def remote_parallel_map(
    function_: Callable[[Any], Any],
    inputs: Iterable[Any],
    func_cpu: float = 1,
    func_ram: float = 4,
    max_parallelism: int | None = None,
    spinner: bool = True,
    generator: bool = False,
    api_key: str | None = None,
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
) -> list[Any] | Iterator[Any] | Job:
    """Call `function_` on every input in `inputs`, all at once, on a Burla cluster.

    Each input is passed whole as the function's one argument, as with the
    built-in ``map`` (a tuple is passed as a tuple). What the calls print
    appears here while they run; an exception raised by a call is raised here
    as itself, with the remote frames in its traceback and the input's index
    in a note, and the rest of the job is cancelled (unless `retries=` runs it
    again, or `return_exceptions=True` keeps its exception in its slot).

    Args:
        function_: any picklable callable of one argument.
        inputs: any iterable (list, range, generator); read lazily in batches.
        func_cpu: CPUs reserved per call.
        func_ram: GB of RAM per call; a call that uses more is killed.
        max_parallelism: the most calls running at once (default: as many as fit).
        spinner: show a live status line when stdout is a terminal.
        generator: return an iterator that yields each result as it arrives
            (in completion order) instead of a list in input order.
        api_key: the cluster's API key (default: BURLA_API_KEY or `burla login`).
        image: run the calls in containers of this OCI image (nodes with the Podman
            runtime; its python3 must be this client's minor version). Pulled on
            first use, then kept.
        dockerfile: build the image from this Dockerfile (its folder is the build
            context, honouring .dockerignore) on the nodes; built once per context.
        exclude_packages: distributions of this environment not to install on the
            workers (added to burla.toml's [client] exclude_packages).
        requirements: extra exact pins ("name==version") to install on the workers.
        grow: on a cluster whose daemon starts its own nodes (a [cluster] provider),
            start the nodes this job's parallelism needs beyond the free ones, at
            once; the job starts on what is free and takes on each new node as it
            joins. Without it, the job runs on free nodes and waits for one when
            none is free. New nodes are deleted after the cluster's idle_timeout.
        timeout: seconds one call may run. A call past it is killed on its node (the
            worker is replaced) and its input fails with `burla.CallTimeoutError`,
            naming the input, the limit and the node. The node enforces it, so it
            holds while this process is away. Default: no limit.
        retries: how many times a call that fails is run again (default 0: its
            failure fails the job). A call that kills its own worker (a segfault,
            `os._exit`, over `func_ram`) and a timeout count as its failures too.
            Each retry is shown by the spinner and `burla status`.
        retry_on: an exception class, or a tuple of them, that a failure must be
            an instance of to be retried (default: every Exception). Matched on
            the cluster by the classes' qualified names.
        retry_delay: seconds before the first retry of an input; each next one
            waits twice as long, up to 60 s. The input waits on the cluster, not
            on a worker.
        return_exceptions: the job does not stop at the first failure: each
            input's slot in the results holds its return value or, if it failed,
            its exception (rebuilt as raised, with the remote traceback and
            `burla_input_index`, or a `burla.CallError`). Works with generator=True.
            A function or inputs that cannot be loaded on the workers still fail
            the job at once (`burla.errors.UnpicklingError`): every input would.
        detach: return a `burla.Job` as soon as every input is uploaded, and let the
            job run to completion on the cluster without this process (which may exit,
            or its machine sleep). Its id (``Job.id``, printed on stderr with the
            spinner on) reattaches from any process of the same user: ``burla.job(ID)``
            with ``.status()``, ``.results()``, ``.as_completed()``, ``.logs()`` and
            ``.cancel()``, or ``burla jobs ...``. Its results stay on the daemon's disk,
            fetchable again and again, until ``daemon.job_retention`` after it ends.
            Ctrl-C while the inputs upload cancels the job; nothing is printed here
            of what its calls print (``Job.logs()`` has it).

    Burla runs a call again by itself when its node is lost (its agent stops
    heartbeating or restarts, the machine is preempted): up to the cluster's
    `daemon.infra_retries` times (3), then its input fails with
    `burla.NodeLostError`. A call may therefore run more than once, in part or
    whole: functions should be idempotent.

    This environment is replicated on the workers: every installed distribution,
    pinned (nodes install what their workers lack, once, then cache it), and the
    local code that is not installed (modules beside the script, a src folder).

    Returns:
        The return values in input order, an iterator of them with
        ``generator=True``, or a `burla.Job` with ``detach=True``.

    With no cluster configured (BURLA_CLUSTER_URL, `burla login`), Burla starts
    a local cluster in the background on first use and reuses it.
    """
    client = Client.default(api_key)
    return client.map(  # type: ignore[no-any-return]
        function_,
        inputs,
        func_cpu=func_cpu,
        func_ram=func_ram,
        max_parallelism=max_parallelism,
        spinner=spinner,
        generator=generator,
        image=image,
        dockerfile=dockerfile,
        exclude_packages=exclude_packages,
        requirements=requirements,
        grow=grow,
        timeout=timeout,
        retries=retries,
        retry_on=retry_on,
        retry_delay=retry_delay,
        return_exceptions=return_exceptions,
        detach=detach,
    )
