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
            fn = _functions[fn_hash] = _load("the function", fn_body, dill)
        call_args, call_kwargs = _load("the arguments", args, dill)
        value = fn(*call_args, **call_kwargs)
    except BaseException as exc:  # the task's failure is data to send back, whatever it is
        return _failure(exc, dill)
    try:
        return (SUCCESS, dill.dumps(value), "", "", "", "")
    except Exception as exc:  # dill's frames say nothing to the researcher: name the stage instead
        name = getattr(fn, "__qualname__", type(fn).__name__)
        stage = TypeError(f"the return value of {name} could not be serialised: {type(exc).__name__}: {exc} "
                          "(return plain data, or save the object to a file and return its path)")
        return _failure(stage, dill, "".join(traceback.format_exception_only(type(stage), stage)))


def _load(what: str, payload: bytes, dill: types.ModuleType) -> object:
    """``dill.loads``, with a missing module explained: the usual reason a task can't even start."""
    try:
        return dill.loads(payload)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"{what} could not be loaded on the endpoint: {exc}, in the workers' Python ({sys.executable}). Install "
            "the module there or pick an environment that has it (python_env in user_endpoint_config, where the "
            "admin's template offers it); or, if it is your own code, define the function in your script or "
            "notebook so that it travels by value", name=exc.name) from None


def _failure(exc: BaseException, dill: types.ModuleType, text: str = "") -> tuple:
    kind = type(exc)
    type_name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    text = text or "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        payload = dill.dumps(exc)
    except Exception:  # unpicklable exception: the SDK raises RemoteError from the text
        payload = b""
    # MemoryError() and friends have no message; a stored failure must still state a reason
    return (TASK_ERROR, payload, type_name, str(exc) or f"{type_name} (no message)", text, TASK_ERROR_CODE)


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
