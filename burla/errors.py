"""Every error Burla raises, rooted at `BurlaError`.

An exception raised by *your* function is not wrapped: it is raised in your
process as itself, with the remote frames in its traceback. These are the
errors of Burla itself::

    BurlaError
    ├── ConfigError                 bad burla.toml, login file or cluster URL
    ├── InvalidArgumentError        a bad argument to remote_parallel_map (also a TypeError or ValueError)
    │   ├── NotCallableError        function_ is not callable
    │   ├── NotIterableError        inputs is not an iterable of inputs
    │   ├── UnpicklableError        the function or an input cannot be pickled
    │   └── TooLargeError           the function or an input is over the cluster's size limits
    ├── UnsatisfiableError          no node can ever run the job (Python version, func_cpu, func_ram)
    ├── ImageError                  image= or dockerfile= cannot be used: no pull, no build, no python3
    ├── InstallError                a package of the client's environment cannot be installed on a node
    ├── ClusterError                the cluster cannot be reached or refused the request
    │   ├── ClusterUnavailableError the daemon is unreachable, or the local cluster failed to start
    │   ├── AuthenticationError     the cluster refused the API key (unknown, rotated, revoked)
    │   ├── PermissionDeniedError   the key's user may not do that (an admin's command)
    │   ├── NoNodesError            no node joined the cluster in time
    │   ├── NodeStartError          the nodes a job needs cannot be started (quota, permission, no zone has them)
    │   ├── VersionMismatchError    the cluster runs a Burla version this one cannot work with
    │   └── JobNotFoundError        burla.job(ID): no such job of yours (never made, another user's, or deleted)
    ├── JobCancelledError           the job was cancelled on the cluster
    └── CallError                   one call failed inside Burla, not inside your code
        ├── RemoteError             your function raised something that cannot be rebuilt here
        ├── UnpicklingError         the worker could not load the function or an input
        ├── UnpicklableResultError  a return value cannot be pickled
        ├── ResultTooLargeError     a return value is over the cluster's max_result_bytes
        ├── CallTimeoutError        the call ran past timeout= and was killed on its worker
        ├── NodeLostError           the node running the call was lost more than infra_retries times
        └── WorkerDiedError         the worker process died mid-call (exit code or signal)
            └── MemoryLimitError    the call went over func_ram and was killed

Every `CallError` has `input_index`, the index of the input whose call failed.
"""

from __future__ import annotations


class BurlaError(Exception):
    """Base class of every error Burla raises."""


class ConfigError(BurlaError, ValueError):
    """The configuration is invalid: the message names the setting and the fix."""


class InvalidArgumentError(BurlaError):
    """An argument to remote_parallel_map is invalid."""


class NotCallableError(InvalidArgumentError, TypeError):
    pass


class NotIterableError(InvalidArgumentError, TypeError):
    pass


class UnpicklableError(InvalidArgumentError, TypeError):
    """The function, or one input, cannot be pickled to send it to the cluster."""

    def __init__(self, message: str, input_index: int | None = None) -> None:
        super().__init__(message)
        self.input_index = input_index


class TooLargeError(InvalidArgumentError, ValueError):
    def __init__(self, message: str, input_index: int | None = None) -> None:
        super().__init__(message)
        self.input_index = input_index


class UnsatisfiableError(BurlaError):
    """No node of the cluster can ever run this job as asked."""


class ImageError(BurlaError):
    """The image cannot run the job: it cannot be pulled or built, or its python3 is missing or another version.

    The message names the image, the node, and (for a failed build) ends with the build log's tail.
    """


class InstallError(BurlaError):
    """A package of the client's environment cannot be installed on a node.

    The message names the package and the node, and ends with the installer's error tail; a
    package built for another platform or Python version is refused before any call runs.
    """


class ClusterError(BurlaError):
    """The cluster could not be reached or refused the request."""


class ClusterUnavailableError(ClusterError):
    pass


class AuthenticationError(ClusterError):
    pass


class PermissionDeniedError(ClusterError):
    """The API key is valid, but its user may not do this: the cluster's settings and users are its admins'."""


class NoNodesError(ClusterError):
    pass


class NodeStartError(ClusterError):
    """The cluster could not start the nodes a job asked for (grow=True), for a reason that waiting will not fix:
    quota, permission, a machine type no zone has. The message names the machine type, the zones tried and
    the cloud's reason."""


class VersionMismatchError(ClusterError):
    """The cluster runs another Burla version, which does not state this one's protocol.

    The message names both versions and what to install (or, for the local cluster, what it runs).
    """


class JobNotFoundError(ClusterError, LookupError):
    """No job of this id that the caller may see: never made, another user's, or deleted after job_retention."""


class JobCancelledError(BurlaError):
    pass


class CallError(BurlaError):
    """A call failed inside Burla rather than inside the user's code."""

    def __init__(self, message: str, input_index: int = -1, node: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.input_index = input_index
        self.node = node
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        text = super().__str__()
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text


class RemoteError(CallError):
    """The function raised an exception that cannot be rebuilt in this process.

    `type_name` is the remote exception's class; `remote_traceback` its traceback.
    """

    def __init__(
        self, message: str, input_index: int = -1, node: str = "", remote_traceback: str = "", type_name: str = ""
    ) -> None:
        super().__init__(message, input_index, node, remote_traceback)
        self.type_name = type_name


class UnpicklingError(CallError):
    pass


class UnpicklableResultError(CallError):
    pass


class ResultTooLargeError(CallError):
    pass


class WorkerDiedError(CallError):
    pass


class CallTimeoutError(CallError):
    """The call ran longer than `timeout=` and was killed on its worker (which was replaced).

    The message names the input, the limit and the node. With `retries=` it is retried like any failure.
    """


class NodeLostError(CallError):
    """The node running the call was lost (its agent stopped heartbeating, it was preempted or deleted)
    more times than the cluster's `daemon.infra_retries`. The message names the input and each loss.

    Lost calls are run again from the start on another worker, so functions should be idempotent.
    """


class MemoryLimitError(WorkerDiedError):
    pass


__all__ = [
    "AuthenticationError",
    "BurlaError",
    "CallError",
    "CallTimeoutError",
    "ClusterError",
    "ClusterUnavailableError",
    "ConfigError",
    "ImageError",
    "InstallError",
    "InvalidArgumentError",
    "JobCancelledError",
    "JobNotFoundError",
    "MemoryLimitError",
    "NoNodesError",
    "NodeLostError",
    "NodeStartError",
    "NotCallableError",
    "NotIterableError",
    "PermissionDeniedError",
    "RemoteError",
    "ResultTooLargeError",
    "TooLargeError",
    "UnpicklableError",
    "UnpicklableResultError",
    "UnpicklingError",
    "UnsatisfiableError",
    "VersionMismatchError",
    "WorkerDiedError",
]
