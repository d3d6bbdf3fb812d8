"""Burla: call a Python function on every input at once, on a cluster.

    from burla import remote_parallel_map
    results = remote_parallel_map(my_function, my_inputs)

Importing burla is cheap: each name below loads on first use, and the network stack on the
first call. So `burla.daemon`, `burla.node_agent` and `burla.schemas`, which live inside this
package, do not load the client when they are imported.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from . import _source_layout  # noqa: F401  (first: in a source checkout it maps burla.schemas & co.)


class _DeferredModule(types.ModuleType):
    """Stands in for a module until one of its other names is used, then loads it and answers from it."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        from importlib import import_module

        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(import_module(self.__name__), name)


def _httpx_main(*args: Any, **kwargs: Any) -> Any:
    """`httpx.main`, the `httpx` command: httpx's command-line client, loaded now."""
    return _HTTPX_CLI.__getattr__("main")(*args, **kwargs)


# `import httpx` imports `httpx._main`, its command-line client, which imports click, rich and pygments
# (Burla's dependencies install all three): some 50 ms of the start of the client and of every node agent,
# for a tool neither runs. A stand-in takes its place until its `main` is called or another name used.
_HTTPX_CLI = _DeferredModule("httpx._main")
_HTTPX_CLI.main = _httpx_main  # type: ignore[attr-defined]


if "httpx" not in sys.modules:  # loaded already: the real one is there too
    sys.modules.setdefault("httpx._main", _HTTPX_CLI)

__version__ = "0.1.0"

__all__ = [
    "BurlaError",
    "CallError",
    "CallTimeoutError",
    "Client",
    "ClusterError",
    "ClusterUnavailableError",
    "ImageError",
    "InstallError",
    "InvalidArgumentError",
    "Job",
    "JobCancelledError",
    "JobNotFoundError",
    "MemoryLimitError",
    "NodeLostError",
    "RemoteError",
    "ResultTooLargeError",
    "UnsatisfiableError",
    "VersionMismatchError",
    "WorkerDiedError",
    "__version__",
    "job",
    "remote_parallel_map",
]
_WHERE = {"remote_parallel_map": "._api", "Client": "._client", "Job": "._handle", "job": "._handle"}  # others: .errors

if TYPE_CHECKING:
    from ._api import remote_parallel_map
    from ._client import Client
    from ._handle import Job, job
    from .errors import (
        BurlaError,
        CallError,
        CallTimeoutError,
        ClusterError,
        ClusterUnavailableError,
        ImageError,
        InstallError,
        InvalidArgumentError,
        JobCancelledError,
        JobNotFoundError,
        MemoryLimitError,
        NodeLostError,
        RemoteError,
        ResultTooLargeError,
        UnsatisfiableError,
        VersionMismatchError,
        WorkerDiedError,
    )


def __getattr__(name: str) -> Any:
    from importlib import import_module

    if name not in __all__:  # a subpackage or public module, as `burla.errors` after `import burla`
        if not name.startswith("_"):
            try:
                return import_module(f"{__name__}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{__name__}.{name}":
                    raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_WHERE.get(name, ".errors"), __name__), name)
    globals()[name] = value  # once: later look-ups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
