"""Whether a failed call is retried under its job's `retries=` and `retry_on=`. Pure.

The daemon decides, not the client: it counts the attempts, and the decision must hold while the client
is away. It never unpickles what a worker sends: it matches the qualified names of the failure's classes
(`CallError.bases`, the raised exception's MRO as the worker saw it) against `JobSpec.retry_on`, which
the client sent as names. Burla's own failures of a call (a timeout, a worker that died by its call's own
hand, a memory kill) match by the classes the client raises for them (burla/errors.py).
"""

from __future__ import annotations

import functools

from burla import errors
from burla.schemas import messages as m

EXCEPTION = "builtins.Exception"  # retry_on=() means every Exception, as `except Exception` would

# Failures of a call that running it again may cure. The others (an unpicklable result, a result over the
# size limit, a function that cannot load) fail the same way every time.
_RETRIED_KINDS = {m.EXCEPTION, m.WORKER_DIED, m.MEMORY, m.TIMEOUT}


@functools.cache
def _burla_bases(type_name: str) -> tuple[str, ...]:
    module, _, name = type_name.rpartition(".")
    cls = getattr(errors, name, None) if module == errors.__name__ else None
    if not isinstance(cls, type):
        return (type_name,)
    return tuple(f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__)


def bases(error: m.CallError) -> tuple[str, ...]:
    """The qualified names of the classes the client would raise `error` as."""
    if error.kind == m.EXCEPTION:
        return error.bases or (error.type_name, EXCEPTION)  # an older worker sent no MRO: assume an Exception
    return _burla_bases(error.type_name)


def retryable_error(spec: m.JobSpec, error: m.CallError) -> bool:
    """Whether `error` is one that `spec`'s retries apply to (how many are left is the scheduler's count)."""
    if spec.retries <= 0 or error.kind not in _RETRIED_KINDS:
        return False
    names = bases(error)
    wanted = spec.retry_on or (EXCEPTION,)
    return any(name in wanted for name in names)


def fails_every_input(error: m.CallError) -> bool:
    """Whether `error` is not an input's own but the lease's: the function or its inputs could not be loaded
    on the worker. Each next input would fail the same way, so with return_exceptions the job fails at once
    rather than one input per lease."""
    return error.kind == m.SYSTEM and error.type_name == m.ErrorType.UNPICKLING
