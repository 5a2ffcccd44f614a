"""mep: send Python functions to a cluster; each runs as its submitter's own Unix account.

The researcher-facing API lives here; everything else is in subpackages, one
job each: ``sdk`` (Executor, serialisation), ``service`` (durable broker),
``manager`` (root spawner and unprivileged router), ``endpoint`` (runs tasks
as the user), ``protocol`` (wire envelopes), ``config`` (models, templates),
``cli`` (the ``mep`` command).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "AccountRefusedError",
    "AuthenticationError",
    "AuthenticationThrottledError",
    "Client",
    "ConfigInvalidError",
    "EndpointLostError",
    "Executor",
    "LargeResultNoReaderError",
    "LargeResultUnavailableError",
    "ShellFunction",
    "MPIFunction",
    "MappingError",
    "MepError",
    "QuotaExceededError",
    "RemoteError",
    "SerializationError",
    "ServiceUnavailableError",
    "ServiceUnreachableError",
    "SpawnError",
    "TaskCancelledError",
    "TaskExpiredError",
    "TaskPendingError",
    "Tasks",
    "TaskRefusedError",
    "TemplateError",
    "UnknownEndpointError",
    "UnmappedIdentityError",
    "WalltimeExceededError",
    "WorkerLostError",
    "progress",
]


_SDK = frozenset({"Client", "Executor", "MPIFunction", "ShellFunction", "TaskPendingError", "Tasks", "progress"})


def __getattr__(name: str):  # lazy: the root process imports mep without mep.errors, the others without the SDK
    if name in __all__ and name not in _SDK:
        import mep.errors

        return getattr(mep.errors, name)
    if name == "Executor":
        from mep.sdk.executor import Executor

        return Executor
    if name in ("Client", "TaskPendingError", "Tasks"):
        from mep.sdk import client

        return getattr(client, name)
    if name == "MPIFunction":
        from mep.sdk.mpi import MPIFunction

        return MPIFunction
    if name == "ShellFunction":
        from mep.sdk.shell import ShellFunction

        return ShellFunction
    if name == "progress":
        from mep.sdk.progress import progress

        return progress
    raise AttributeError(name)
