"""mep: send Python functions to a cluster; each runs as its submitter's own Unix account.

The researcher-facing API lives here; everything else is in subpackages, one
job each: ``sdk`` (Executor, serialisation), ``service`` (durable broker),
``manager`` (root spawner and unprivileged router), ``endpoint`` (runs tasks
as the user), ``protocol`` (wire envelopes), ``config`` (models, templates),
``cli`` (the ``mep`` command).
"""

from __future__ import annotations

__version__ = "0.1.0"

# The SDK's names and their modules; every other name in __all__ is an error type from mep.errors.
_SDK = {"Client": "mep.sdk.client", "Executor": "mep.sdk.executor", "MPIFunction": "mep.sdk.mpi",
        "ShellFunction": "mep.sdk.shell", "TaskPendingError": "mep.sdk.client", "Tasks": "mep.sdk.client",
        "progress": "mep.sdk.progress"}
__all__ = [
    "AccountRefusedError", "AuthenticationError", "AuthenticationThrottledError", "Client", "ConfigInvalidError",
    "EndpointLostError", "Executor", "LargeResultNoReaderError", "LargeResultUnavailableError", "MPIFunction",
    "MappingError", "MepError", "QuotaExceededError", "RemoteError", "SerializationError", "ServiceUnavailableError",
    "ServiceUnreachableError", "ShellFunction", "SpawnError", "TaskCancelledError", "TaskExpiredError",
    "TaskPendingError", "TaskRefusedError", "Tasks", "TemplateError", "UnknownEndpointError", "UnmappedIdentityError",
    "WalltimeExceededError", "WorkerLostError", "progress",
]


def __getattr__(name: str):  # lazy: the root process imports mep without mep.errors, the others without the SDK
    if name not in __all__:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(_SDK.get(name, "mep.errors")), name)
