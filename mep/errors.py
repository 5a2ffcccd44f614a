"""Error types shared by every mep process, and the codes that carry them over the wire.

A refusal or failure travels between processes as a ``(code, message)`` pair
(see ``docs/protocol.md``). The SDK turns the pair back into the exception class
registered for that code, so a researcher can ``except mep.MappingError`` and
read a message that says what to do next. Admin-only detail (which rule, which
step, which errno) goes to the admin's log, never into these messages.
"""

from __future__ import annotations

from enum import StrEnum

from mep.root.errors import (  # noqa: F401 -- re-exported: the root half's errors, one hierarchy with the rest
    AccountRefusedError,
    AssertionRefusedError,
    ConfigurationError,
    MappingError,
    MepError,
    ProtocolError,
    QuotaExceededError,
    SpawnError,
    TaskRefusedError,
    UnmappedIdentityError,
)


class ErrorCode(StrEnum):
    """Stable wire codes for every failure a task can end with.

    The root half's codes (``mep.root.errors.ErrorCode``, the ones the root
    process can report) are among these with the same values; a test keeps
    them so.
    """

    UNAUTHENTICATED = "unauthenticated"
    NOT_REGISTERED = "not_registered"
    BAD_REQUEST = "bad_request"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNKNOWN_ENDPOINT = "unknown_endpoint"
    UNKNOWN_FUNCTION = "unknown_function"
    UNMAPPED = "unmapped"
    MAPPING_ERROR = "mapping_error"
    ACCOUNT_REFUSED = "account_refused"
    CONFIG_INVALID = "config_invalid"
    TEMPLATE_ERROR = "template_error"
    SPAWN_FAILED = "spawn_failed"
    ENDPOINT_LOST = "endpoint_lost"
    TASK_ERROR = "task_error"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    WALLTIME_EXCEEDED = "walltime_exceeded"
    WORKER_LOST = "worker_lost"
    ENDPOINT_BUSY = "endpoint_busy"
    QUOTA_EXCEEDED = "quota_exceeded"
    AUTH_THROTTLED = "auth_throttled"
    # The service's signed identity assertion failed a check where the tasks were to run (docs/identity.md).
    ASSERTION_MISSING = "assertion_missing"
    ASSERTION_INVALID = "assertion_invalid"
    ASSERTION_EXPIRED = "assertion_expired"
    ASSERTION_REPLAYED = "assertion_replayed"
    ASSERTION_MISMATCH = "assertion_mismatch"
    SERVICE_UNAVAILABLE = "service_unavailable"
    LARGE_RESULT_UNAVAILABLE = "large_result_unavailable"  # its file is gone or unreadable, its manager offline
    LARGE_RESULT_NO_READER = "large_result_no_reader"  # no endpoint of the account runs to read its file
    LARGE_ARGS_UNAVAILABLE = "large_args_unavailable"  # a task's uploaded arguments are gone, incomplete or not its
    INTERNAL = "internal"


class ConfigInvalidError(TaskRefusedError):
    """The user endpoint config was rejected by the admin's schema or the endpoint model."""

    code = ErrorCode.CONFIG_INVALID


class AuthenticationError(MepError):
    """The caller's token is unknown or revoked, or a key did not match."""

    code = ErrorCode.UNAUTHENTICATED


class AuthenticationThrottledError(AuthenticationError):
    """Too many failed authentications came from this address lately; it is refused for a while."""

    code = ErrorCode.AUTH_THROTTLED


class NotRegisteredError(ProtocolError):
    """A manager spoke before registering on this connection; it must send REGISTER."""

    code = ErrorCode.NOT_REGISTERED


class EndpointBusyError(ProtocolError):
    """Another manager holds the endpoint's lease; this one must wait for it to lapse."""

    code = ErrorCode.ENDPOINT_BUSY


class ServiceUnavailableError(MepError):
    """The service can't store anything right now (its disk is full, or its database can't be written).

    Nothing of the refused request was stored; send it again later. What the
    service acknowledged before stays safe.
    """

    code = ErrorCode.SERVICE_UNAVAILABLE


class PayloadTooLargeError(MepError):
    """A task's serialised function or arguments exceed the service's limit."""

    code = ErrorCode.PAYLOAD_TOO_LARGE


class UnknownEndpointError(MepError):
    """The endpoint id names no endpoint registered with the service."""

    code = ErrorCode.UNKNOWN_ENDPOINT


class UnknownFunctionError(MepError):
    """A task referenced a function hash the service has never been sent."""

    code = ErrorCode.UNKNOWN_FUNCTION


class TemplateError(TaskRefusedError):
    """The admin's template failed to render (names file and line)."""

    code = ErrorCode.TEMPLATE_ERROR


class EndpointLostError(TaskRefusedError):
    """The user endpoint exited before the task finished."""

    code = ErrorCode.ENDPOINT_LOST


class WalltimeExceededError(TaskRefusedError):
    """The task ran longer than the walltime it was submitted with and was stopped."""

    code = ErrorCode.WALLTIME_EXCEEDED


class WorkerLostError(TaskRefusedError):
    """The worker process running the task died (killed, out of memory, crashed the interpreter)."""

    code = ErrorCode.WORKER_LOST


class TaskExpiredError(MepError):
    """The task's result was not collected within the service's retention period."""

    code = ErrorCode.EXPIRED


class TaskCancelledError(MepError):
    """The task was cancelled (from another client, or before this one attached to it)."""

    code = ErrorCode.CANCELLED


class SerializationError(MepError):
    """A function or its arguments could not be turned into bytes on the submitting side (raised by submit)."""

    code = ErrorCode.BAD_REQUEST


class LargeResultUnavailableError(MepError):
    """A result kept in a file on the endpoint's host can't be had: the file is gone or unreadable, or no
    endpoint is running to read it; the message says which."""

    code = ErrorCode.LARGE_RESULT_UNAVAILABLE


class LargeResultNoReaderError(LargeResultUnavailableError):
    """No endpoint of the account is running to read a large result's file; any task to the endpoint starts
    one (an Executor does that itself and fetches again)."""

    code = ErrorCode.LARGE_RESULT_NO_READER


class LargeArgsUnavailableError(MepError):
    """A task's uploaded arguments can't be had: the upload is incomplete, expired, not the caller's, or its
    bytes did not match their SHA-256; the message says which."""

    code = ErrorCode.LARGE_ARGS_UNAVAILABLE


class UploadNotStoredError(MepError):
    """The service could not store an upload's chunk on its disk (full, failing); nothing of it was kept."""

    code = ErrorCode.SERVICE_UNAVAILABLE


class ServiceUnreachableError(MepError):
    """The service did not answer in time; what became of the tasks concerned is in the message."""

    code = ErrorCode.INTERNAL


class RemoteError(MepError):
    """The function raised an exception whose class could not be rebuilt locally.

    ``remote_type`` is the exception's qualified type name on the endpoint and
    ``remote_traceback`` its formatted traceback.
    """

    code = ErrorCode.TASK_ERROR

    def __init__(self, remote_type: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"{self.message}\n\nRemote traceback:\n{self.remote_traceback}"


_BY_CODE: dict[ErrorCode, type[MepError]] = {
    cls.code: cls
    for cls in (
        AuthenticationError,
        AuthenticationThrottledError,
        ProtocolError,
        ServiceUnavailableError,
        PayloadTooLargeError,
        UnknownEndpointError,
        UnknownFunctionError,
        UnmappedIdentityError,
        MappingError,
        AccountRefusedError,
        ConfigInvalidError,
        TemplateError,
        SpawnError,
        AssertionRefusedError,
        EndpointLostError,
        WalltimeExceededError,
        WorkerLostError,
        QuotaExceededError,
        TaskExpiredError,
        TaskCancelledError,
        LargeResultUnavailableError,
        LargeResultNoReaderError,
        LargeArgsUnavailableError,
    )
}
# One class for every way an identity assertion is refused; the code says which (mep.root.errors).
_ASSERTION_CODES = (ErrorCode.ASSERTION_MISSING, ErrorCode.ASSERTION_EXPIRED, ErrorCode.ASSERTION_REPLAYED,
                    ErrorCode.ASSERTION_MISMATCH)
_BY_CODE.update(dict.fromkeys(_ASSERTION_CODES, AssertionRefusedError))


def error_for_code(code: str, message: str) -> MepError:
    """Rebuild the exception a wire ``(code, message)`` pair stands for."""
    try:
        cls = _BY_CODE[ErrorCode(code)]
    except (ValueError, KeyError):
        return MepError(message)
    if cls is AssertionRefusedError:
        return AssertionRefusedError(message, ErrorCode(code))
    return cls(message)
