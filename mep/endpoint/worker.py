"""Code that runs inside a worker process: load the function once, call it, package the outcome."""

from __future__ import annotations

import ctypes
import os
import signal
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from mep.errors import ErrorCode
from mep.protocol.messages import SUCCESS, TASK_ERROR
from mep.sdk.serialize import deserialize, serialize

_functions: dict[str, Callable[..., Any]] = {}
PR_SET_PDEATHSIG = 1



class Outcome(NamedTuple):
    """What became of one task, ready to become a wire ``Result``."""

    status: str
    payload: bytes = b""
    error_type: str = ""
    message: str = ""
    traceback: str = ""
    code: str = ""


def _die_with_parent() -> None:
    """If the endpoint's forkserver goes (the endpoint died), this worker goes too: no orphaned user code."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() == 1:  # the parent died before the prctl took effect
        os._exit(1)


def run_task(fn_hash: str, fn_body: bytes | None, args: bytes) -> Outcome:
    """Run one task; ``fn_body`` is None when this worker already loaded ``fn_hash``."""
    try:
        fn = _functions.get(fn_hash)
        if fn is None:
            fn = _functions[fn_hash] = deserialize(fn_body)
        call_args, call_kwargs = deserialize(args)
        return Outcome(SUCCESS, serialize(fn(*call_args, **call_kwargs)))
    except BaseException as exc:  # the task's failure is data to send back, whatever it is
        return _failure(exc)


def _failure(exc: BaseException) -> Outcome:
    kind = type(exc)
    type_name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    text = "".join(traceback.format_exception(exc))
    try:
        payload = serialize(exc)
    except Exception:  # unpicklable exception: the SDK raises RemoteError from the text
        payload = b""
    return Outcome(TASK_ERROR, payload, type_name, str(exc), text, code=ErrorCode.TASK_ERROR)


def serve(connection: Connection) -> None:
    """A worker process's life: run tasks from the endpoint until it hangs up (or kills us)."""
    _die_with_parent()
    while True:
        try:
            task_id, fn_hash, fn_body, args = connection.recv()
        except EOFError:
            return
        connection.send((task_id, run_task(fn_hash, fn_body, args)))
