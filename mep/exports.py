"""The names ``mep`` offers researchers (``mep.Executor``, ``mep.MappingError``...), each imported when first used.

They are listed here rather than in ``mep/__init__.py`` because every mep
process imports that package, the root process included, and none of it is
root's business: importing ``mep`` loads neither the SDK nor ``mep.errors``.
"""

from __future__ import annotations

import importlib
from typing import Any

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


def export(name: str) -> Any:
    """``mep.<name>``: one of ``__all__``, imported from its module; AttributeError for any other name."""
    if name not in __all__:
        raise AttributeError(f"module 'mep' has no attribute {name!r}")
    return getattr(importlib.import_module(_SDK.get(name, "mep.errors")), name)
