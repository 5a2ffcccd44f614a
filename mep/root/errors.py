"""The errors the root half raises, and the wire codes every mep process shares.

They live here so that the root process imports no mep module outside this
package; ``mep.errors`` re-exports them, so there is one hierarchy for all of
mep (a researcher can ``except mep.MappingError`` whichever process raised it).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable wire codes for every failure a task can end with."""

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


class MepError(Exception):
    """Base of every error mep raises on purpose; ``str()`` is the actionable message."""

    code: ErrorCode = ErrorCode.INTERNAL
    admin_detail: str = ""  # what only the admin's log may see (which rule, which step, which errno)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigurationError(MepError):
    """A configuration file, key file or directory an admin owns is unusable."""

    code = ErrorCode.BAD_REQUEST


class ProtocolError(MepError):
    """A message did not follow ``docs/protocol.md`` (bad framing, version, or fields)."""

    code = ErrorCode.BAD_REQUEST


class TaskRefusedError(MepError):
    """The endpoint refused to run the task; subclasses say why."""

    code = ErrorCode.INTERNAL


class UnmappedIdentityError(TaskRefusedError):
    """No identity-mapping rule maps the submitter to a local account."""

    code = ErrorCode.UNMAPPED


class MappingError(TaskRefusedError):
    """The identity-mapping configuration failed while mapping the submitter (fails closed)."""

    code = ErrorCode.MAPPING_ERROR


class AccountRefusedError(TaskRefusedError):
    """The mapped account exists in the mapping but policy forbids running as it."""

    code = ErrorCode.ACCOUNT_REFUSED


class SpawnError(TaskRefusedError):
    """Starting the user endpoint failed (names the failed step)."""

    code = ErrorCode.SPAWN_FAILED


class AssertionRefusedError(TaskRefusedError):
    """The service's signed statement of who submitted the tasks is malformed, unknown-keyed or badly signed."""

    code = ErrorCode.ASSERTION_INVALID


class AssertionMissingError(AssertionRefusedError):
    """The tasks (or the spawn request for them) carry no signed identity assertion."""

    code = ErrorCode.ASSERTION_MISSING


class AssertionExpiredError(AssertionRefusedError):
    """The identity assertion is past its expiry (or dated in the future: check the clocks)."""

    code = ErrorCode.ASSERTION_EXPIRED


class AssertionReplayedError(AssertionRefusedError):
    """The identity assertion was already used for a spawn request."""

    code = ErrorCode.ASSERTION_REPLAYED


class AssertionMismatchError(AssertionRefusedError):
    """The request or task does not match what the service signed (identity, endpoint, config, task)."""

    code = ErrorCode.ASSERTION_MISMATCH


class QuotaExceededError(TaskRefusedError):
    """A limit the admin set was reached (queued tasks or stored results of an identity, endpoints of an
    account); the message names the limit and what to do."""

    code = ErrorCode.QUOTA_EXCEEDED
