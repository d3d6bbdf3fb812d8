"""`remote_parallel_map`, the one function of Burla."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._client import Client


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
) -> list[Any] | Iterator[Any]:
    """Call `function_` on every input in `inputs`, all at once, on a Burla cluster.

    Each input is passed whole as the function's one argument, as with the
    built-in ``map`` (a tuple is passed as a tuple). What the calls print
    appears here while they run; an exception raised by a call is raised here
    as itself, with the remote frames in its traceback and the input's index
    in a note, and the rest of the job is cancelled.

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

    This environment is replicated on the workers: every installed distribution,
    pinned (nodes install what their workers lack, once, then cache it), and the
    local code that is not installed (modules beside the script, a src folder).

    Returns:
        The return values in input order, or an iterator of them with
        ``generator=True``.

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
    )
