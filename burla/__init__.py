"""Burla: call a Python function on every input at once, on a cluster.

    from burla import remote_parallel_map
    results = remote_parallel_map(my_function, my_inputs)

Importing burla is cheap: each name below loads on first use, and the network stack on the
first call. So `burla.daemon`, `burla.node_agent` and `burla.schemas`, which live inside this
package, do not load the client when they are imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _source_layout  # noqa: F401  (first: in a source checkout it maps burla.schemas & co.)

__version__ = "0.1.0"

__all__ = [
    "BurlaError",
    "CallError",
    "Client",
    "ClusterError",
    "ClusterUnavailableError",
    "ImageError",
    "InstallError",
    "InvalidArgumentError",
    "JobCancelledError",
    "MemoryLimitError",
    "RemoteError",
    "ResultTooLargeError",
    "UnsatisfiableError",
    "VersionMismatchError",
    "WorkerDiedError",
    "__version__",
    "remote_parallel_map",
]
_WHERE = {"remote_parallel_map": "._api", "Client": "._client"}  # the others: .errors

if TYPE_CHECKING:
    from ._api import remote_parallel_map
    from ._client import Client
    from .errors import (
        BurlaError,
        CallError,
        ClusterError,
        ClusterUnavailableError,
        ImageError,
        InstallError,
        InvalidArgumentError,
        JobCancelledError,
        MemoryLimitError,
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
