"""Burla: call a Python function on every input at once, on a cluster.

    from burla import remote_parallel_map
    results = remote_parallel_map(my_function, my_inputs)

Importing burla is cheap: the network stack loads on the first call.
"""

__version__ = "0.1.0"

from . import _source_layout  # noqa: F401  (first: in a source checkout it maps burla.schemas & co.)
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
