"""Turn a wire ``Result`` into what the caller gets: the value, or the exception to raise."""

from __future__ import annotations

import sys
from typing import Any, BinaryIO

from mep.errors import RemoteError, error_for_code
from mep.protocol.messages import SUCCESS, TASK_ERROR, Result
from mep.sdk.serialize import deserialize


def outcome(result: Result, payload: bytes | BinaryIO | None) -> tuple[Any, BaseException | None]:
    """(value, None) for a success, (None, exception) for anything else."""
    if result.status == SUCCESS:
        try:
            return deserialize(payload), None
        except ModuleNotFoundError as exc:
            return None, ModuleNotFoundError(
                f"the result could not be loaded here: {exc}: it holds objects of module {exc.name!r}, which this "
                f"Python ({sys.executable}) cannot import. Install it here, or have the function return plain data "
                "(numbers, strings, lists, dicts)", name=exc.name)
        except Exception as exc:
            return None, RemoteError(type(exc).__name__, f"the result could not be loaded here: {exc}", "")
    if result.status == TASK_ERROR:
        return None, _remote_exception(result, payload)
    return None, error_for_code(result.code, result.message)


def _remote_exception(result: Result, payload: bytes | BinaryIO | None) -> BaseException:
    """The function's own exception when this side can rebuild it, else a RemoteError."""
    try:
        exc = deserialize(payload)
        if not isinstance(exc, BaseException):
            raise TypeError("not an exception")
    except Exception:
        return RemoteError(result.error_type, result.message, result.traceback)
    exc.add_note(f"Remote traceback:\n{result.traceback}")
    return exc
