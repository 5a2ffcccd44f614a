"""The worker bootstrap: run tasks with nothing but the standard library and dill.

This module is what travels to a ``worker_python`` interpreter (a
researcher's conda or virtual environment that has neither mep nor Parsl):
``mep.endpoint.interpreters`` starts that interpreter with a one-line loader
that receives this file's text over the worker's connection and runs it,
which calls ``serve``. So it must stay self-contained: standard library and
dill only, no mep import, and source that the oldest Python a researcher may
pick can compile (a version mismatch is caught before a task gets here, but
the bootstrap still has to start to say so).

The wire between the endpoint and this worker is a
``multiprocessing.connection.Connection`` of plain tuples: the endpoint sends
``(task id, function hash, function body or None, args)`` and gets back
``(task id, (status, payload, error type, message, traceback, code))``, the
fields of ``mep.endpoint.worker.Outcome``. Tasks' own output goes to the
worker's stdout and stderr, which is the endpoint's log.
"""

from __future__ import annotations

import sys
import traceback
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

# The wire values of mep.protocol.messages.SUCCESS/TASK_ERROR/FAILED and of mep.errors.ErrorCode,
# repeated because this module may not import mep (tests/test_parsl_engine.py keeps them equal).
SUCCESS = "success"
TASK_ERROR = "error"
FAILED = "failed"
TASK_ERROR_CODE = "task_error"
CONFIG_INVALID_CODE = "config_invalid"

_functions: dict = {}


def run_task(fn_hash: str, fn_body: bytes | None, args: bytes) -> tuple:
    """Run one task; ``fn_body`` is None when this worker already loaded ``fn_hash``."""
    try:
        import dill
    except ImportError:
        message = (f"the worker interpreter {sys.executable} has no dill: install it there "
                   f"(`{sys.executable} -m pip install dill`), with the version your client uses")
        return (FAILED, b"", "", message, "", CONFIG_INVALID_CODE)
    try:
        fn = _functions.get(fn_hash)
        if fn is None:
            fn = _functions[fn_hash] = dill.loads(fn_body)
        call_args, call_kwargs = dill.loads(args)
        return (SUCCESS, dill.dumps(fn(*call_args, **call_kwargs)), "", "", "", "")
    except BaseException as exc:  # the task's failure is data to send back, whatever it is
        return _failure(exc, dill)


def _failure(exc: BaseException, dill: types.ModuleType) -> tuple:
    kind = type(exc)
    type_name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        payload = dill.dumps(exc)
    except Exception:  # unpicklable exception: the SDK raises RemoteError from the text
        payload = b""
    return (TASK_ERROR, payload, type_name, str(exc), text, TASK_ERROR_CODE)


def serve(connection: Connection) -> None:
    """A worker's life: run tasks from the endpoint until it hangs up (or kills us)."""
    while True:
        try:
            task_id, fn_hash, fn_body, args = connection.recv()
        except EOFError:
            return
        connection.send((task_id, run_task(fn_hash, fn_body, args)))


if __name__ == "__mep_bootstrap__":  # run by interpreters.LOADER, which defines __connection__
    serve(__connection__)  # noqa: F821
