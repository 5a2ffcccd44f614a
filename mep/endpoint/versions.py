"""Refuse a task at once when its client's Python or dill differs from the workers' that would run it.

dill's output is tied to the Python minor version (code objects) and, less
often, to dill's own version. A mismatch otherwise shows up as a baffling
deserialisation error or a worker crash mid-task, Globus Compute's most common
complaint; here the task fails before it runs, with a message naming both
sides' versions and how to get a matching pair.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from mep.endpoint.interpreters import WorkerEnvironmentError, worker_runtime
from mep.endpoint.worker import Outcome
from mep.errors import ErrorCode
from mep.protocol.messages import FAILED, Runtime, TaskRef

if TYPE_CHECKING:
    from mep.endpoint.settings import EndpointConfig


def refuse_mismatch(runtimes: Sequence[Runtime], task: TaskRef, config: EndpointConfig,
                    on_done: Callable[[str, Outcome], None]) -> bool:
    """Fail ``task`` through ``on_done`` if its client can't exchange payloads with the workers; True if it did."""
    if not 0 <= task.runtime < len(runtimes):
        return False  # the router sent no runtime: nothing to compare
    client = runtimes[task.runtime]
    message = mismatch(client.python, client.dill, config.worker_python)
    if message:
        on_done(task.task_id, Outcome(FAILED, code=ErrorCode.CONFIG_INVALID, message=message))
    return bool(message)


@functools.cache
def mismatch(client_python: str, client_dill: str, worker_python: str | None) -> str:
    """Why a client with these versions can't use workers running ``worker_python``, or ""."""
    try:
        workers = worker_runtime(worker_python)
    except WorkerEnvironmentError as exc:
        return str(exc)
    client_minor = ".".join(client_python.split(".")[:2])
    differences = []
    if client_minor != workers.python_minor:
        differences.append(f"Python {client_minor} (workers: Python {workers.python_minor})")
    if client_dill != workers.dill:
        differences.append(f"dill {client_dill} (workers: dill {workers.dill})")
    if not differences:
        return ""
    where = f" in {worker_python}" if worker_python else ""
    return (
        f"version mismatch: your client runs {' and '.join(differences)}{where}; functions and results can't be "
        f"exchanged reliably across them. Submit from an environment with Python {workers.python_minor} and "
        f"dill {workers.dill}, or ask for an endpoint whose worker_python matches yours (if the admin's template "
        "offers one, set it in user_endpoint_config)"
    )
